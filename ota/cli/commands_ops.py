"""Commands that talk to a control plane: bundle, fleet, rollout, report."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import grpc
from rich.console import Console
from rich.markup import escape

from ota.cli import report_render
from ota.cli.connect import connect
from ota.cli.helptext import ExamplesFormatter
from ota.cli.output import console, emit_json, emit_page, plain, table
from ota.cli.prefix import by_prefix, paged
from ota.cli.provision import (
    add_agent_options,
    check_agent_options,
    parse_labels,
    write_agent_config,
)
from ota.cli.watch import DEFAULT_RECONNECT_FOR, watch_rollout
from ota.client import Client, PendingSigning
from ota.domain.durations import DAYS_LIKE, parse_duration
from ota.domain.plan import MAX_DURATION_SECONDS, RolloutPlan, install_failure_gate, parse_stages
from ota.domain.plan_document import PLAN_LIMITS, parse_plan_document
from ota.domain.shares import parse_share, share_text
from ota.domain.states import ALL_STATES
from ota.errors import InvalidArgument
from ota.reports import html as report_html
from ota.signing.keys import load_public_key
from ota.v1 import (
    bundle_pb2,
    common_pb2,
    fleet_pb2,
    report_pb2,
    rollout_pb2,
)

T = TypeVar("T")

ROLLOUT_VERBS = {
    "start": "start a rollout in DRAFT",
    "pause": "stop exposing and advancing until resumed",
    "resume": "go on; the stage's soak and gate window start again",
    "promote": "skip the rest of the soak; approve an approval stage (admin or a plan approver)",
    "abort": "no new exposures; installed devices keep the bundle",
    "rollback": "exposed devices revert to their last-known-good bundle",
    "kill": "the kill switch: deactivate the feature on every exposed device at once",
}


def _client(args: argparse.Namespace) -> Client:
    return connect(args)


_CREATE_EXAMPLES = """examples:
  ota rollout create --plan plan.yaml --request-id rel-2026-11-lane
  ota rollout create --feature lane-assist --version 2.0.0 --selector 'model = ev6' \\
      --stages 1%,10%,100% --soak 30m --max-failure 5% --on-breach rollback
  ota rollout create --feature lane-assist --version 2.0.0 --stages 5000ppm,50%,100% \\
      --max-failure 25000ppm
"""


def _rollout_ids(client: Client) -> Iterable[str]:
    def page(token: str) -> tuple[list[str], str]:
        r = client.rollouts.ListRollouts(
            rollout_pb2.ListRolloutsRequest(page_token=token), metadata=client.metadata
        )
        return [x.rollout_id for x in r.rollouts], r.next_page_token

    return paged(page)


def _device_ids(client: Client) -> Iterable[str]:
    def page(token: str) -> tuple[list[str], str]:
        r = client.fleet.ListDevices(
            fleet_pb2.ListDevicesRequest(page_size=1000, page_token=token),
            metadata=client.metadata,
        )
        return [d.device_id for d in r.devices], r.next_page_token

    return paged(page)


def _bundle_names(client: Client) -> Iterable[str]:
    def page(token: str) -> tuple[list[str], str]:
        r = client.bundles.ListBundles(
            bundle_pb2.ListBundlesRequest(page_token=token), metadata=client.metadata
        )
        return [b.name for b in r.bundles], r.next_page_token

    return paged(page)


def _rollout_id(client: Client, given: str) -> str:
    """The full id of the rollout `given` whole or as a unique prefix."""
    return _rollout_call(
        client,
        given,
        lambda rollout_id: client.rollouts.GetRollout(
            rollout_pb2.GetRolloutRequest(rollout_id=rollout_id), metadata=client.metadata
        ),
    ).rollout_id


def _rollout_call(client: Client, given: str, call: Callable[[str], T]) -> T:
    """`call(rollout_id)`, the id given whole or as a unique prefix."""
    return by_prefix(call, given, lambda: _rollout_ids(client), noun="rollout")


def register(nouns: Any, client_options: Callable[[argparse.ArgumentParser], None]) -> None:
    bundle = nouns.add_parser("bundle", help="signed feature bundles").add_subparsers(
        dest="verb", required=True
    )
    p = bundle.add_parser(
        "publish",
        help="sign with release key(s) and publish a bundle",
        description="Sign FILE into the next targets metadata with the release key(s) given "
        "and upload both. Signed by the release threshold, the bundle is visible to devices "
        "at once; with fewer signatures it stays PENDING (invisible) until `ota bundle sign` "
        "adds the rest, or is refused with --require-visible.",
    )
    p.add_argument("file", type=Path, help="the bundle's bytes, e.g. lane-assist.bin")
    p.add_argument("--feature", required=True, help="feature name, e.g. lane-assist")
    p.add_argument("--version", required=True, help="bundle version, e.g. 1.0.0 (immutable)")
    p.add_argument("--model", action="append", default=[], help="compatible model (repeat)")
    p.add_argument("--min-firmware", default="", help="lowest base firmware it runs on, e.g. 4.0")
    p.add_argument("--key", action="append", type=Path, default=[], help="release key (repeat)")
    p.add_argument(
        "--require-visible",
        action="store_true",
        help="refuse instead of leaving a pending publication when the keys given fall "
        "short of the release threshold",
    )
    client_options(p)
    p.set_defaults(handler=bundle_publish)
    p = bundle.add_parser(
        "sign",
        help="review a pending publication and add your release signature",
        description="Fetch the pending targets metadata of NAME, check it adds exactly the "
        "bundle it claims on top of the published targets, show it, sign it locally and "
        "upload the signature (the key never leaves this machine). The signature that meets "
        "the release threshold publishes the bundle.",
    )
    p.add_argument("name", help="bundles/FEATURE/VERSION, or a unique prefix of it")
    p.add_argument("--key", action="append", type=Path, default=[], help="release key (repeat)")
    p.add_argument("--file", type=Path, help="your copy of the bundle: must match what is signed")
    p.add_argument(
        "--trusted-root", type=Path, help="root.json you trust: verify the server's root chain"
    )
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation on a terminal")
    client_options(p)
    p.set_defaults(handler=bundle_sign)
    p = bundle.add_parser("discard", help="drop a pending publication and its signatures")
    p.add_argument("name", help="bundles/FEATURE/VERSION, or a unique prefix of it")
    client_options(p)
    p.set_defaults(handler=bundle_discard)
    p = bundle.add_parser("list", help="published and pending bundles")
    p.add_argument("--feature", default="", help="only this feature's bundles")
    p.add_argument(
        "--state",
        choices=("all", "published", "pending", "stale"),
        default="all",
        help="only bundles in this state (default all)",
    )
    _paging_options(p, "bundles")
    client_options(p)
    p.set_defaults(handler=bundle_list)
    p = bundle.add_parser("get", help="one bundle")
    p.add_argument("name", help="bundles/FEATURE/VERSION, or a unique prefix of it")
    client_options(p)
    p.set_defaults(handler=bundle_get)

    fleet = nouns.add_parser("fleet", help="devices").add_subparsers(dest="verb", required=True)
    p = fleet.add_parser(
        "register", help="provision a device; prints its secret (or enrollment token) once"
    )
    p.add_argument("device_id", help="the device's id, also its MQTT username, e.g. car-0001")
    p.add_argument("--model", required=True, help="hardware model, e.g. ev6")
    p.add_argument("--region", required=True, help="region, e.g. eu")
    p.add_argument("--firmware", required=True, help="base firmware version, e.g. 4.2.0")
    p.add_argument("--label", action="append", default=[], help="KEY=VALUE (repeat it)")
    add_agent_options(p)
    p.add_argument(
        "--identity",
        choices=("password", "certificate"),
        default="password",
        help="certificate: the device enrolls for an X.509 certificate with a one-time "
        "token and uses mutual TLS; password: a secret in the broker's password file",
    )
    client_options(p)
    p.set_defaults(handler=fleet_register)
    p = fleet.add_parser(
        "sign-csr",
        help="factory provisioning: have the device CA sign a registered device's CSR",
    )
    p.add_argument("device_id", help="the registered device the certificate names")
    p.add_argument("--csr", type=Path, required=True, help="the device's request (PEM)")
    p.add_argument("--out", type=Path, required=True, help="where to write the certificate")
    client_options(p)
    p.set_defaults(handler=fleet_sign_csr)
    p = fleet.add_parser("crl", help="the device CA's certificate revocation list, for brokers")
    p.add_argument("--out", type=Path, required=True, help="where to write the CRL (PEM)")
    client_options(p)
    p.set_defaults(handler=fleet_crl)
    p = fleet.add_parser("list", help="devices matching a selector (revoked ones too with --all)")
    p.add_argument("--selector", default="", help="which devices, e.g. 'region = \"eu\"'")
    p.add_argument(
        "--all",
        action="store_true",
        help="revoked devices too; by default only those a rollout could reach",
    )
    _paging_options(p, "devices")
    client_options(p)
    p.set_defaults(handler=fleet_list)
    p = fleet.add_parser(
        "get",
        help="one device and its timeline: its recent events, oldest first",
    )
    p.add_argument("device_id", help="the device's id, or a unique prefix of it")
    p.add_argument(
        "--events",
        type=int,
        default=50,
        metavar="N",
        help="the last N events (default %(default)s, at most 1000)",
    )
    client_options(p)
    p.set_defaults(handler=fleet_get)
    p = fleet.add_parser("revoke", help="revoke a device's credentials")
    p.add_argument("device_id", help="the device's id, or a unique prefix of it")
    client_options(p)
    p.set_defaults(handler=fleet_revoke)

    rollout = nouns.add_parser("rollout", help="staged rollouts").add_subparsers(
        dest="verb", required=True
    )
    p = rollout.add_parser(
        "create",
        help="a rollout in DRAFT, from a plan file or from flags",
        description="Create a rollout in DRAFT. Either --plan FILE (YAML or JSON: selector, "
        "cohort, stages, gates, holdout, maintenance windows, blackout dates, approvers, "
        "salt_from; see README.md) or --feature/--version/--stages. Every share carries its "
        "unit: 10% or 0.5% (a percentage), 100000ppm (parts per million; in a plan file also "
        "{ppm: 100000}); a bare number is refused. Prints how many devices stage 1 will expose.",
        epilog=_CREATE_EXAMPLES,
        formatter_class=ExamplesFormatter,
    )
    p.add_argument("--plan", type=Path, help="plan file (YAML or JSON), e.g. plan.yaml")
    p.add_argument("--feature", help="without --plan: the feature, e.g. lane-assist")
    p.add_argument("--version", help="without --plan: a published bundle's version, e.g. 2.0.0")
    p.add_argument(
        "--stages",
        default="1%,10%,100%",
        help="cumulative exposure of each stage, each with its unit, e.g. 1%%,10%%,100%% or "
        "0.5%%,50000ppm,100%% (default %(default)s)",
    )
    p.add_argument(
        "--soak",
        default="0",
        help="minimum soak per stage, as in a plan file: 1800 (seconds), 30m, 2h or 1d",
    )
    p.add_argument("--selector", default="", help="which devices, e.g. 'model in (ev6, ev9)'")
    p.add_argument(
        "--max-failure",
        default="5%",
        help="install-failure gate: the highest tolerated share of failed installs, with its "
        "unit, e.g. 5%% or 2.5%% or 50000ppm (default %(default)s)",
    )
    p.add_argument(
        "--min-sample",
        type=int,
        default=5,
        help="finished installs the gate needs before it judges, e.g. 20 (default %(default)s)",
    )
    p.add_argument(
        "--on-breach",
        choices=("pause", "hold", "rollback"),
        default="pause",
        help="what the gate does when it trips (default pause)",
    )
    p.add_argument(
        "--request-id",
        default="",
        help="makes create idempotent: the same id and plan return the same rollout",
    )
    client_options(p)
    p.set_defaults(handler=rollout_create)
    p = rollout.add_parser(
        "edit",
        help="a new plan version (only stages after the current one may change)",
    )
    p.add_argument(
        "rollout_id", help="the rollout, e.g. r-4a47dd90 (a unique prefix will do: r-4a47)"
    )
    p.add_argument("--plan", type=Path, required=True, help="the whole new plan file")
    p.add_argument("--reason", default="", help="why, for the audit log")
    p.add_argument("--etag", default="", help="refuse if the rollout changed since this etag")
    client_options(p)
    p.set_defaults(handler=rollout_edit)
    p = rollout.add_parser(
        "plan", help="dry run: who each stage exposes from the current fleet, who is left out"
    )
    p.add_argument(
        "rollout_id", help="the rollout, e.g. r-4a47dd90 (a unique prefix will do: r-4a47)"
    )
    client_options(p)
    p.set_defaults(handler=rollout_plan)
    for verb, text in ROLLOUT_VERBS.items():
        p = rollout.add_parser(verb, help=text)
        p.add_argument(
            "rollout_id", help="the rollout, e.g. r-4a47dd90 (a unique prefix will do: r-4a47)"
        )
        p.add_argument("--reason", default="", help="why, for the audit log")
        client_options(p)
        p.set_defaults(handler=rollout_command, command=verb)
    p = rollout.add_parser(
        "delete",
        help="delete a rollout in DRAFT (its history stays: `ota rollout history ID`)",
        description="Delete a rollout that was never started. A started one cannot be "
        "deleted: abort, roll back or kill it. The deletion is audited (who, when, --reason); "
        "`ota rollout history ID` still shows the rollout's log and `ota rollout list "
        "--deleted` lists deleted rollouts. Its request id is not reused.",
    )
    p.add_argument("rollout_id", help="the rollout, e.g. r-4a47dd90")
    p.add_argument("--reason", default="", help="why, for the audit log")
    p.add_argument("--etag", default="", help="refuse if the rollout changed since this etag")
    client_options(p)
    p.set_defaults(handler=rollout_delete)
    p = rollout.add_parser("status", help="a rollout's state and progress")
    p.add_argument(
        "rollout_id", help="the rollout, e.g. r-4a47dd90 (a unique prefix will do: r-4a47)"
    )
    client_options(p)
    p.set_defaults(handler=rollout_status)
    p = rollout.add_parser("list", help="rollouts")
    p.add_argument("--feature", default="", help="only this feature's rollouts")
    p.add_argument("--deleted", action="store_true", help="include deleted rollouts")
    _paging_options(p, "rollouts")
    client_options(p)
    p.set_defaults(handler=rollout_list)
    p = rollout.add_parser(
        "watch",
        help="live progress until the rollout ends",
        description="Live transitions and progress until the rollout ends. Exits 0 when it "
        "completes, 3 when it ends otherwise (aborted, rolled back, killed), 1 when the "
        "control plane stays out of reach for longer than --reconnect-for.",
    )
    p.add_argument(
        "rollout_id", help="the rollout, e.g. r-4a47dd90 (a unique prefix will do: r-4a47)"
    )
    p.add_argument(
        "--reconnect-for",
        type=_reconnect_for,
        default=DEFAULT_RECONNECT_FOR,
        metavar="DURATION",
        help="when the control plane goes away (a restart, an outage), keep reconnecting "
        "for this long before giving up, e.g. 90s, 10m, 1h (default 5m)",
    )
    client_options(p)
    p.set_defaults(handler=rollout_watch)
    p = rollout.add_parser(
        "devices",
        help="the devices a rollout exposed and how far each got (which ones failed, and why)",
    )
    p.add_argument(
        "rollout_id", help="the rollout, e.g. r-4a47dd90 (a unique prefix will do: r-4a47)"
    )
    p.add_argument(
        "--state",
        type=str.upper,
        choices=ALL_STATES,
        metavar="STATE",
        help="only devices in this state, e.g. FAILED (one of " + ", ".join(ALL_STATES) + ")",
    )
    p.add_argument("--limit", type=int, default=0, help="at most this many (default: all)")
    client_options(p)
    p.add_argument(
        "--page-token",
        default="",
        help="go on from the next_page_token a --limit'ed `--format json` printed",
    )
    p.set_defaults(handler=rollout_devices)
    p = rollout.add_parser("history", help="the audit log")
    p.add_argument(
        "rollout_id", help="the rollout, e.g. r-4a47dd90 (a unique prefix will do: r-4a47)"
    )
    client_options(p)
    p.set_defaults(handler=rollout_history)

    p = nouns.add_parser(
        "report",
        help="adoption report of a rollout, or of a feature across its rollouts",
        description="The adoption report (PROTOCOL §8) as terminal tables, CSV (section,key,value), "
        "JSON (the ReportService message) or one self-contained HTML file with charts that "
        "opens offline. With --feature, the versions devices run over time.",
    )
    p.add_argument("rollout_id", nargs="?", default="", help="the rollout (or give --feature)")
    p.add_argument("--feature", default="", help="report on a feature across its rollouts")
    client_options(p)
    p.set_defaults(handler=report)
    for action in p._actions:
        if action.dest == "format":
            action.choices = ("table", "csv", "json", "html")
            action.help = "terminal tables, CSV, JSON, or one HTML file (give --out)"
    p.add_argument("--out", type=Path, help="write to a file instead of stdout")


def _paging_options(p: argparse.ArgumentParser, noun: str) -> None:
    """`--limit` and `--page-token` for a list command, so every page can be reached."""
    p.add_argument(
        "--limit",
        type=int,
        default=100,
        help=f"at most this many {noun} per page (default 100, at most 1000)",
    )
    p.add_argument(
        "--page-token",
        default="",
        help="go on from the next_page_token the previous page printed",
    )


def _more(token: str) -> None:
    # A table shows one page; say how to get the next, on stderr so the table stays clean.
    if token:
        print(f"more: --page-token {token}", file=sys.stderr)


def bundle_publish(args: argparse.Namespace) -> int:
    client = _client(args)
    result = client.publish_bundle(
        args.file,
        feature=args.feature,
        version=args.version,
        models=args.model,
        min_firmware=args.min_firmware,
        keys=args.key,
        require_visible=args.require_visible,
    )
    if args.format == "json":
        emit_json(result)
    elif result.state == bundle_pb2.BUNDLE_STATE_PENDING:
        _say(f"pending {result.name}: {_signature_count(result)}; {_pending_hint(result)}")
    else:
        _say(
            f"published {result.name} ({result.length} bytes, sha256 {result.sha256.hex()[:16]}…), "
            "visible to devices"
        )
    return 0


def bundle_sign(args: argparse.Namespace) -> int:
    client = _client(args)
    if not args.key:
        raise InvalidArgument("at least one release key (--key) is required", field="key")
    trusted = _read_file(args.trusted_root) if args.trusted_root else None
    signing = by_prefix(
        lambda name: client.review_pending(name, file=args.file, trusted_root=trusted),
        args.name,
        lambda: _bundle_names(client),
        noun="bundle",
    )
    review = signing.review
    mine = [load_public_key(k).keyid for k in args.key]
    if args.format != "json":
        _show_review(signing, mine, checked_file=args.file)
        if not args.yes and sys.stdin.isatty() and not _confirm("sign it? [y/N] "):
            _say("not signed")
            return EXIT_DECLINED
    result = client.sign_bundle(signing, args.key)
    if args.format == "json":
        emit_json(result)
        return 0
    already = [k[:12] for k in mine if k in review.signer_keyids]
    if already:
        _say(f"{', '.join(already)} had already signed {result.name}: a key counts once")
    if result.state == bundle_pb2.BUNDLE_STATE_PUBLISHED:
        _say(f"published {result.name}: {_signature_count(result)}, visible to devices")
    else:
        _say(f"signed {result.name}: {_signature_count(result)}; {_pending_hint(result)}")
    return 0


def bundle_discard(args: argparse.Namespace) -> int:
    client = _client(args)
    result = by_prefix(
        lambda name: client.bundles.DiscardPendingBundle(
            bundle_pb2.DiscardPendingBundleRequest(name=name), metadata=client.metadata
        ),
        args.name,
        lambda: _bundle_names(client),
        noun="bundle",
    )
    if args.format == "json":
        emit_json(result)
    else:
        _say(f"discarded the pending publication {result.name}")
    return 0


EXIT_DECLINED = 3
_STATES = {
    "all": bundle_pb2.BUNDLE_STATE_UNSPECIFIED,
    "published": bundle_pb2.BUNDLE_STATE_PUBLISHED,
    "pending": bundle_pb2.BUNDLE_STATE_PENDING,
    "stale": bundle_pb2.BUNDLE_STATE_STALE,
}


def _state_name(b: bundle_pb2.Bundle) -> str:
    return bundle_pb2.BundleState.Name(b.state).removeprefix("BUNDLE_STATE_").lower()


def _signature_count(b: bundle_pb2.Bundle) -> str:
    who = f" ({', '.join(k[:12] for k in b.signer_keyids)})" if b.signer_keyids else ""
    return f"{len(b.signer_keyids)} of {b.signatures_required} release signatures{who}"


def _pending_hint(b: bundle_pb2.Bundle) -> str:
    missing = max(1, b.signatures_required - len(b.signer_keyids))
    return (
        f"not visible to devices until {missing} more release key(s) sign it "
        f"(`ota bundle sign {b.name} --key KEY`)"
    )


def _show_review(signing: PendingSigning, mine: list[str], *, checked_file: Path | None) -> None:
    review, target = signing.review, signing.review.target
    rows: list[tuple[str, object]] = [
        ("bundle", signing.pending.bundle.name),
        ("target", target.target_path),
        ("length", f"{target.length} bytes"),
        ("sha256", target.sha256_hex),
        *((f"custom.{k}", json.dumps(v)) for k, v in sorted(target.custom.items())),
        ("targets", f"version {review.targets_version}, expires {review.expires:%Y-%m-%d %H:%M}Z"),
        (
            "signed by",
            f"{len(review.signer_keyids)} of {review.threshold} "
            f"({', '.join(k[:12] for k in review.signer_keyids) or 'nobody yet'})",
        ),
        ("your key", ", ".join(k[:12] for k in mine)),
    ]
    if checked_file is not None:
        rows.append(("your file", f"{checked_file} matches"))
    _say("checked: the pending targets add exactly this bundle to the published ones")
    for label, value in rows:
        _say(f"  {label:<16} {value}")


def _say(text: str) -> None:
    # One unwrapped line per message, so scripts and people read the same text.
    console.print(text, soft_wrap=True, markup=False, highlight=False)


def _confirm(prompt: str) -> bool:
    try:
        return input(prompt).strip().lower() in ("y", "yes")
    except EOFError:
        return False


def _read_file(path: Path, *, limit: int | None = None) -> bytes:
    """The file's bytes; with `limit`, refused (naming the file) when it is larger."""
    try:
        with path.open("rb") as f:
            data = f.read() if limit is None else f.read(limit + 1)
    except OSError as exc:
        # The field is the path already: "plan.yaml: No such file or directory".
        raise InvalidArgument(str(exc.strerror), field=str(path)) from exc
    if limit is not None and len(data) > limit:
        raise InvalidArgument(f"is larger than the {limit} bytes accepted", field=str(path))
    return data


def _bundle_rows(bundles: list[bundle_pb2.Bundle], *, wide: bool) -> list[list[object]]:
    return [
        [
            b.name,
            _state_name(b),
            f"{len(b.signer_keyids)}/{b.signatures_required}",
            b.length,
            b.sha256.hex() if wide else b.sha256.hex()[:16],
            ",".join(b.models),
        ]
        for b in bundles
    ]


_BUNDLE_COLUMNS = ["name", "state", "signatures", "bytes", "sha256", "models"]


def bundle_list(args: argparse.Namespace) -> int:
    client = _client(args)
    response = client.bundles.ListBundles(
        bundle_pb2.ListBundlesRequest(
            feature=args.feature,
            state=_STATES[args.state],
            page_size=args.limit,
            page_token=args.page_token,
        ),
        metadata=client.metadata,
    )
    if args.format == "json":
        emit_page("bundles", response.bundles, response.next_page_token)
    else:
        table(
            "Bundles",
            _BUNDLE_COLUMNS,
            _bundle_rows(list(response.bundles), wide=args.wide),
        )
    if args.format != "json":
        _more(response.next_page_token)
    return 0


def bundle_get(args: argparse.Namespace) -> int:
    client = _client(args)
    b = by_prefix(
        lambda name: client.bundles.GetBundle(
            bundle_pb2.GetBundleRequest(name=name), metadata=client.metadata
        ),
        args.name,
        lambda: _bundle_names(client),
        noun="bundle",
    )
    if args.format == "json":
        emit_json(b)
    else:
        table("Bundle", _BUNDLE_COLUMNS, _bundle_rows([b], wide=True), wide=True)
    return 0


def fleet_register(args: argparse.Namespace) -> int:
    labels = parse_labels(args.label)
    check_agent_options(args)
    client = _client(args)
    response = client.fleet.RegisterDevices(
        fleet_pb2.RegisterDevicesRequest(
            devices=[
                fleet_pb2.DeviceRegistration(
                    device_id=args.device_id,
                    model=args.model,
                    region=args.region,
                    firmware=args.firmware,
                    labels=labels,
                )
            ],
            identity=(
                fleet_pb2.DEVICE_IDENTITY_CERTIFICATE
                if args.identity == "certificate"
                else fleet_pb2.DEVICE_IDENTITY_PASSWORD
            ),
        ),
        metadata=client.metadata,
    )
    c = response.credentials[0]
    written = None
    if args.agent_config is not None:
        written = write_agent_config(
            args,
            device_id=c.device_id,
            secret=c.secret,
            mqtt_url=response.mqtt_url,
            labels=labels,
            enrollment_token=c.enrollment_token,
        )
    if args.format == "json":
        emit_json(response)
    elif args.identity == "certificate" and written is not None:
        expires = c.enrollment_expire_time.ToDatetime().strftime("%Y-%m-%d %H:%M UTC")
        console.print(
            f"registered {c.device_id}; agent config with its enrollment token (until "
            f"{expires}) in {written} (mode 0600); start it with: ota-agent --config {written}"
        )
    elif args.identity == "certificate":
        expires = c.enrollment_expire_time.ToDatetime().strftime("%Y-%m-%d %H:%M UTC")
        console.print(
            f"registered {c.device_id}; enrollment token {c.enrollment_token} (shown once, "
            f"until {expires}); broker {response.mqtt_url}"
        )
    elif written is not None:
        console.print(
            f"registered {c.device_id}; agent config with its secret in {written} (mode 0600); "
            f"start it with: ota-agent --config {written}"
        )
    else:
        console.print(
            f"registered {c.device_id}; secret {c.secret} (shown once); broker {response.mqtt_url}"
        )
    return 0


def fleet_sign_csr(args: argparse.Namespace) -> int:
    try:
        csr = args.csr.read_text()
    except OSError as exc:
        raise InvalidArgument(f"cannot read {args.csr}: {exc.strerror}", field="csr") from exc
    except UnicodeDecodeError as exc:
        raise InvalidArgument(f"{args.csr} is not a PEM text file", field="csr") from exc
    client = _client(args)
    issued = client.fleet.SignDeviceCsr(
        fleet_pb2.SignDeviceCsrRequest(device_id=args.device_id, csr=csr),
        metadata=client.metadata,
    )
    args.out.write_text(issued.certificate)
    if args.format == "json":
        emit_json(issued)
    else:
        expires = issued.expire_time.ToDatetime().strftime("%Y-%m-%d")
        console.print(
            f"wrote {args.out}: {issued.device_id}, serial {issued.serial}, until {expires}"
        )
    return 0


def fleet_crl(args: argparse.Namespace) -> int:
    client = _client(args)
    crl = client.fleet.GetDeviceCrl(fleet_pb2.GetDeviceCrlRequest(), metadata=client.metadata)
    tmp = args.out.with_name(f".{args.out.name}.tmp")
    tmp.write_text(crl.crl)
    tmp.replace(args.out)  # a broker reloading meanwhile reads the old or the new, whole
    console.print(f"wrote {args.out}; send the broker SIGHUP to apply it")
    return 0


def fleet_list(args: argparse.Namespace) -> int:
    client = _client(args)
    response = client.fleet.ListDevices(
        fleet_pb2.ListDevicesRequest(
            selector=args.selector,
            page_size=args.limit,
            page_token=args.page_token,
            include_revoked=args.all,
        ),
        metadata=client.metadata,
    )
    if args.format == "json":
        emit_json(plain(response))
    else:
        table(
            f"Devices ({response.total_size} match)",
            ["device", "model", "region", "firmware", "online", "revoked"],
            [
                [d.device_id, d.model, d.region, d.firmware, d.online, d.revoked]
                for d in response.devices
            ],
        )
    if args.format != "json":
        _more(response.next_page_token)
    return 0


def fleet_get(args: argparse.Namespace) -> int:
    if not 1 <= args.events <= 1000:
        raise InvalidArgument("must be between 1 and 1000", field="--events")
    client = _client(args)
    response = by_prefix(
        lambda device_id: client.fleet.GetDevice(
            fleet_pb2.GetDeviceRequest(device_id=device_id, event_limit=args.events),
            metadata=client.metadata,
        ),
        args.device_id,
        lambda: _device_ids(client),
        noun="device",
    )
    if args.format == "json":
        emit_json(response)
        return 0
    d = response.device
    console.print(
        f"{d.device_id}  model {d.model}  region {d.region}  firmware {d.firmware}  online {d.online}"
    )
    if d.identity == fleet_pb2.DEVICE_IDENTITY_CERTIFICATE:
        if d.certificate_serial:
            until = d.certificate_expire_time.ToDatetime().strftime("%Y-%m-%d")
            state = "revoked" if d.revoked else f"valid until {until}"
            console.print(f"certificate {d.certificate_serial} ({state})")
        else:
            console.print("certificate: not enrolled yet")
    if response.rate_limited:
        console.print(
            f"rate limited: {response.rate_limited_drops} messages dropped for exceeding "
            "the per-device ingest rate"
        )
    table(
        f"Timeline (last {len(response.events)} events, oldest first)",
        ["time", "seq", "rollout", "feature", "state", "reason", "detail"],
        [
            [
                e.time.ToDatetime().strftime("%Y-%m-%d %H:%M:%S"),
                e.seq,
                e.rollout_id or "-",
                f"{e.feature} {e.version}".strip() or "-",
                common_pb2.DeviceState.Name(e.state),
                common_pb2.FailureReason.Name(e.error_code) if e.error_code else "",
                escape(e.detail),
            ]
            for e in response.events
        ],
        whole=(0, 2),
    )
    return 0


def fleet_revoke(args: argparse.Namespace) -> int:
    client = _client(args)
    d = by_prefix(
        lambda device_id: client.fleet.RevokeDevice(
            fleet_pb2.RevokeDeviceRequest(device_id=device_id), metadata=client.metadata
        ),
        args.device_id,
        lambda: _device_ids(client),
        noun="device",
    )
    if args.format == "json":
        emit_json(d)
    else:
        console.print(f"revoked {d.device_id}")
    return 0


# A plan's fields, as the flags that set them spell them.
_FLAG_OF_FIELD = {
    "min_soak_seconds": "--soak",
    "max": "--max-failure",
    "min_sample": "--min-sample",
    "action": "--on-breach",
}


def _plan_from_flags(args: argparse.Namespace) -> RolloutPlan:
    """The plan the flags describe, checked here with the errors naming the flags."""
    stages = parse_stages(
        args.stages,
        soak_seconds=parse_duration(args.soak, field="--soak", at_most=MAX_DURATION_SECONDS),
    )
    try:
        gate = install_failure_gate(
            max_failure_ppm=parse_share(args.max_failure, "--max-failure", mapping=False),
            min_sample=args.min_sample,
            action=args.on_breach,
        )
        return RolloutPlan(stages, (gate,))
    except InvalidArgument as exc:
        if exc.field and exc.field.startswith("--"):
            raise
        last = (exc.field or "").rpartition(".")[2]
        flag = _FLAG_OF_FIELD.get(last, "--stages")
        raise InvalidArgument(exc.message, field=flag) from exc


def rollout_create(args: argparse.Namespace) -> int:
    if args.plan is not None:
        if args.feature or args.version:
            raise InvalidArgument("comes from the plan file; drop it or --plan", field="feature")
        text = _read_file(args.plan, limit=PLAN_LIMITS.max_bytes).decode("utf-8", errors="replace")
        parse_plan_document(text)  # the same validation as the server, before connecting
        request = rollout_pb2.CreateRolloutRequest(plan_document=text, request_id=args.request_id)
    else:
        if not args.feature or not args.version:
            raise InvalidArgument("give --plan FILE, or --feature and --version", field="feature")
        plan = _plan_from_flags(args)
        stages, gate = plan.stages, plan.gates[0]
        request = rollout_pb2.CreateRolloutRequest(
            feature=args.feature,
            version=args.version,
            selector=args.selector,
            stages=[
                rollout_pb2.Stage(ppm=s.ppm, min_soak_seconds=s.min_soak_seconds) for s in stages
            ],
            gate=rollout_pb2.FailureGate(
                max_failure_ppm=gate.max_ppm,
                min_sample=gate.min_sample,
                action=_GATE_ACTIONS[gate.action],
            ),
            request_id=args.request_id,
        )
    client = _client(args)
    r = client.rollouts.CreateRollout(request, metadata=client.metadata)
    _print_rollout(args, r)
    if args.format != "json":
        _say_first_stage(client, r)
    return 0


def _say_first_stage(client: Client, r: rollout_pb2.Rollout) -> None:
    """What `start` would expose first, so a plan that means something else shows now."""
    try:
        preview = client.rollouts.PlanRollout(
            rollout_pb2.GetRolloutRequest(rollout_id=r.rollout_id), metadata=client.metadata
        )
    except grpc.RpcError as exc:
        _say(f"(no dry run: {exc.code().name}: {exc.details()})")
        return
    if not preview.stages:
        return
    first = preview.stages[0]
    held = sum(e.devices for e in preview.excluded if e.reason == "holdout")
    eligible = preview.candidates + held
    share = share_text(first.ppm) if first.ppm else f"cohort {first.label}"
    note = f", {held} held out" if held else ""
    _say(
        f"stage 1 of {len(preview.stages)} ({share}) will expose {first.exposed} of "
        f"{eligible} eligible devices{note}; `ota rollout plan {r.rollout_id}` shows every stage"
    )


_GATE_ACTIONS = {
    "pause": rollout_pb2.GATE_ACTION_PAUSE,
    "hold": rollout_pb2.GATE_ACTION_HOLD,
    "rollback": rollout_pb2.GATE_ACTION_ROLLBACK,
}


def rollout_edit(args: argparse.Namespace) -> int:
    text = _read_file(args.plan, limit=PLAN_LIMITS.max_bytes).decode("utf-8", errors="replace")
    parse_plan_document(text)
    client = _client(args)
    r = _rollout_call(
        client,
        args.rollout_id,
        lambda rollout_id: client.rollouts.EditRollout(
            rollout_pb2.EditRolloutRequest(
                rollout_id=rollout_id, plan_document=text, reason=args.reason, etag=args.etag
            ),
            metadata=client.metadata,
        ),
    )
    _print_rollout(args, r)
    return 0


def rollout_plan(args: argparse.Namespace) -> int:
    client = _client(args)
    preview = _rollout_call(
        client,
        args.rollout_id,
        lambda rollout_id: client.rollouts.PlanRollout(
            rollout_pb2.GetRolloutRequest(rollout_id=rollout_id), metadata=client.metadata
        ),
    )
    if args.format == "json":
        emit_json(preview)
        return 0
    held = sum(e.devices for e in preview.excluded if e.reason == "holdout")
    eligible = preview.candidates + held
    _say(
        f"rollout {preview.rollout_id} plan v{preview.plan_version}: fleet {preview.fleet}, "
        f"{eligible} eligible, {preview.candidates} may be exposed, "
        f"{preview.already_exposed} exposed so far"
    )

    def cohorts(counts: Sequence[rollout_pb2.PreviewCount]) -> str:
        return "  ".join(f"{c.dimension}={c.value}:{c.devices}" for c in counts)

    table(
        "Stages (cumulative exposure)",
        ["stage", "share", "exposed", "new", "by model / region / firmware"],
        [
            [
                s.index + 1 if s.label == share_text(s.ppm) else f"{s.index + 1} {s.label}",
                _share_cell(s),
                f"{s.exposed} of {eligible}",
                s.new,
                cohorts(s.cohorts),
            ]
            for s in preview.stages
        ],
    )
    table(
        "Excluded",
        ["reason", "devices", "by model / region / firmware"],
        [[e.reason, e.devices, cohorts(e.cohorts)] for e in preview.excluded],
    )
    return 0


def _share_cell(s: rollout_pb2.StagePreview) -> str:
    if not s.ppm:
        return "cohort"
    return f"{share_text(s.ppm)} ({s.ppm} ppm)"


def _state(r: rollout_pb2.Rollout) -> str:
    return rollout_pb2.RolloutState.Name(r.state).removeprefix("ROLLOUT_STATE_")


def _print_rollout(args: argparse.Namespace, r: rollout_pb2.Rollout) -> None:
    if args.format == "json":
        emit_json(r)
        return
    stage = f"{r.current_stage + 1}/{len(r.stages)}" if r.current_stage >= 0 else "-"
    phase = f" ({r.phase.replace('_', ' ')})" if r.phase else ""
    console.print(
        f"rollout {r.rollout_id}  {r.feature} {r.version}  {_state(r)}{phase}  stage {stage}  "
        f"plan v{r.plan_version}  exposed {r.exposed}/{r.eligible - r.holdout}"
        + (f" (holdout {r.holdout})" if r.holdout else "")
        + f"  {r.state_reason}",
        soft_wrap=True,
        markup=False,
        highlight=False,
    )
    if r.device_states:
        console.print("  " + "  ".join(f"{k} {v}" for k, v in sorted(r.device_states.items())))


def rollout_command(args: argparse.Namespace) -> int:
    client = _client(args)
    method = getattr(client.rollouts, f"{args.command.capitalize()}Rollout")
    r = _rollout_call(
        client,
        args.rollout_id,
        lambda rollout_id: method(
            rollout_pb2.RolloutCommandRequest(rollout_id=rollout_id, reason=args.reason),
            metadata=client.metadata,
        ),
    )
    _print_rollout(args, r)
    return 0


def rollout_delete(args: argparse.Namespace) -> int:
    client = _client(args)
    rollout_id = _rollout_id(client, args.rollout_id)
    client.rollouts.DeleteRollout(
        rollout_pb2.DeleteRolloutRequest(rollout_id=rollout_id, reason=args.reason, etag=args.etag),
        metadata=client.metadata,
    )
    if args.format == "json":
        emit_json({"deleted": rollout_id})
    else:
        console.print(
            f"deleted rollout {rollout_id}; `ota rollout history {rollout_id}` keeps its log",
            markup=False,
            highlight=False,
        )
    return 0


def rollout_status(args: argparse.Namespace) -> int:
    client = _client(args)
    r = _rollout_call(
        client,
        args.rollout_id,
        lambda rollout_id: client.rollouts.GetRollout(
            rollout_pb2.GetRolloutRequest(rollout_id=rollout_id), metadata=client.metadata
        ),
    )
    _print_rollout(args, r)
    return 0


def rollout_list(args: argparse.Namespace) -> int:
    client = _client(args)
    response = client.rollouts.ListRollouts(
        rollout_pb2.ListRolloutsRequest(
            feature=args.feature,
            show_deleted=args.deleted,
            page_size=args.limit,
            page_token=args.page_token,
        ),
        metadata=client.metadata,
    )
    if args.format == "json":
        emit_page("rollouts", response.rollouts, response.next_page_token)
    else:
        table(
            "Rollouts",
            ["rollout", "feature", "version", "state", "stage", "exposed"],
            [
                [
                    r.rollout_id,
                    r.feature,
                    r.version,
                    _state(r),
                    r.current_stage + 1 if r.current_stage >= 0 else "-",
                    f"{r.exposed}/{r.eligible}",
                ]
                for r in response.rollouts
            ],
        )
    if args.format != "json":
        _more(response.next_page_token)
    return 0


def rollout_watch(args: argparse.Namespace) -> int:
    client = _client(args)
    final = watch_rollout(
        client,
        _rollout_id(client, args.rollout_id),
        json_lines=args.format == "json",
        reconnect_for=args.reconnect_for,
        server=args.server,
    )
    return 0 if final in ("COMPLETED",) else 3


MAX_RECONNECT_FOR = 7 * 86_400


def _reconnect_for(text: str) -> float:
    """An argparse type: a duration such as 90s or 5m, as seconds."""
    try:
        seconds = parse_duration(text, field="--reconnect-for", like=DAYS_LIKE)
    except InvalidArgument as exc:
        raise argparse.ArgumentTypeError(exc.message) from exc
    if seconds > MAX_RECONNECT_FOR:
        raise argparse.ArgumentTypeError(f"at most 7d, got {text!r}")
    return float(seconds)


def rollout_devices(args: argparse.Namespace) -> int:
    if args.limit < 0:
        raise InvalidArgument("must not be negative (0: all)", field="--limit")
    client = _client(args)
    state = common_pb2.DeviceState.Value(args.state) if args.state else 0

    found: list[rollout_pb2.RolloutDevice] = []

    def page(rollout_id: str, token: str) -> rollout_pb2.ListRolloutDevicesResponse:
        # Never past --limit, so the page token printed continues right after the last one.
        left = args.limit - len(found) if args.limit > 0 else 1000
        return client.rollouts.ListRolloutDevices(
            rollout_pb2.ListRolloutDevicesRequest(
                rollout_id=rollout_id,
                state=state,  # type: ignore[arg-type]
                page_token=token,
                page_size=min(left, 1000),
            ),
            metadata=client.metadata,
        )

    resolved = _rollout_id(client, args.rollout_id)
    first = page(resolved, args.page_token)
    found.extend(first.devices)
    token = first.next_page_token
    while token and (args.limit <= 0 or len(found) < args.limit):
        more = page(resolved, token)
        found.extend(more.devices)
        token = more.next_page_token
    if args.format == "json":
        emit_page("devices", found, token)
        return 0
    table(
        f"Devices of {resolved}"
        + (f" in {args.state}" if args.state else "")
        + f" ({first.total_size})",
        ["device", "model", "region", "stage", "state", "reason", "detail", "changed"],
        [
            [
                d.device_id,
                d.model,
                d.region,
                d.stage + 1,
                common_pb2.DeviceState.Name(d.state),
                common_pb2.FailureReason.Name(d.reason) if d.reason else "",
                escape(d.detail),
                d.update_time.ToDatetime().strftime("%Y-%m-%d %H:%M:%S"),
            ]
            for d in found
        ],
    )
    return 0


def rollout_history(args: argparse.Namespace) -> int:
    client = _client(args)
    response = _rollout_call(
        client,
        args.rollout_id,
        lambda rollout_id: client.rollouts.ListRolloutEvents(
            rollout_pb2.ListRolloutEventsRequest(rollout_id=rollout_id), metadata=client.metadata
        ),
    )
    if args.format == "json":
        emit_page("events", response.events)
    else:
        table(
            f"History of {args.rollout_id}",
            ["time", "actor", "action", "stage", "to", "reason", "diff"],
            [
                [
                    e.time.ToDatetime().strftime("%Y-%m-%d %H:%M:%S"),
                    e.actor,
                    e.action,
                    e.stage + 1 if e.stage >= 0 else "-",
                    rollout_pb2.RolloutState.Name(e.to_state).removeprefix("ROLLOUT_STATE_"),
                    escape(e.reason),
                    escape(_short_diff(e.diff_json)),
                ]
                for e in response.events
            ],
        )
    return 0


def _short_diff(diff_json: str, limit: int = 100) -> str:
    """An audit diff in one short line for the table (`--format json` has it whole)."""
    if not diff_json:
        return ""
    diff = json.loads(diff_json)
    parts = []
    for key, value in diff.items():
        if key == "plan":
            parts.append(
                f"plan: {len(value['stages'])} stages, {len(value['gates'])} gates, "
                f"holdout {share_text(value['holdout_ppm'])}"
            )
        elif isinstance(value, list) and len(value) == 2:
            parts.append(f"{key}: {json.dumps(value[0])} → {json.dumps(value[1])}")
        else:
            parts.append(f"{key}: {json.dumps(value)}")
    text = "; ".join(parts)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def report(args: argparse.Namespace) -> int:
    if bool(args.rollout_id) == bool(args.feature):
        raise InvalidArgument("give a ROLLOUT_ID or --feature, not both", field="rollout_id")
    client = _client(args)
    if args.feature:
        feature = client.reports.GetFeatureReport(
            report_pb2.GetFeatureReportRequest(feature=args.feature), metadata=client.metadata
        )
        return _emit_report(
            args,
            feature,
            table=report_render.render_feature_table,
            csv=report_render.render_feature_csv,
            html=report_html.render_feature_html,
        )
    value = _rollout_call(
        client,
        args.rollout_id,
        lambda rollout_id: client.reports.GetRolloutReport(
            report_pb2.GetRolloutReportRequest(rollout_id=rollout_id), metadata=client.metadata
        ),
    )
    return _emit_report(
        args,
        value,
        table=report_render.render_table,
        csv=report_render.render_csv,
        html=report_html.render_html,
    )


def _emit_report(
    args: argparse.Namespace,
    value: Any,
    *,
    table: Callable[[Any, Console], None],
    csv: Callable[[Any], str],
    html: Callable[[Any], str],
) -> int:
    if args.format == "table":
        if args.out is None:
            table(value, console)
        else:
            with args.out.open("w") as f:
                table(value, Console(file=f, width=120))
            console.print(f"wrote {args.out}")
        return 0
    if args.format == "html" and args.out is None:
        raise InvalidArgument("an HTML report needs --out FILE", field="out")
    text = {"csv": csv, "json": report_render.render_json, "html": html}[args.format](value)
    if args.out is not None:
        args.out.write_text(text, encoding="utf-8")
        console.print(f"wrote {args.out}")
    else:
        sys.stdout.write(text)
    return 0
