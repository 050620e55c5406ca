"""Commands that talk to a control plane: bundle, fleet, rollout, report."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console

from ota.cli import report_render
from ota.cli.output import console, emit_json, table
from ota.cli.watch import watch_rollout
from ota.client import Client
from ota.domain.plan import FailureGate, parse_stages
from ota.errors import InvalidArgument
from ota.v1 import (
    bundle_pb2,
    fleet_pb2,
    report_pb2,
    rollout_pb2,
)

ROLLOUT_VERBS = ("start", "pause", "resume", "promote", "abort", "rollback")


def _client(args: argparse.Namespace) -> Client:
    return Client.connect(args.server, args.token)


def register(nouns: Any, client_options: Callable[[argparse.ArgumentParser], None]) -> None:
    bundle = nouns.add_parser("bundle", help="signed feature bundles").add_subparsers(
        dest="verb", required=True
    )
    p = bundle.add_parser("publish", help="sign with release key(s) and publish a bundle")
    p.add_argument("file", type=Path)
    p.add_argument("--feature", required=True)
    p.add_argument("--version", required=True)
    p.add_argument("--model", action="append", default=[], help="compatible model (repeat)")
    p.add_argument("--min-firmware", default="")
    p.add_argument("--key", action="append", type=Path, default=[], help="release key (repeat)")
    client_options(p)
    p.set_defaults(handler=bundle_publish)
    p = bundle.add_parser("list", help="published bundles")
    p.add_argument("--feature", default="")
    client_options(p)
    p.set_defaults(handler=bundle_list)
    p = bundle.add_parser("get", help="one bundle")
    p.add_argument("name", help="bundles/FEATURE/VERSION")
    client_options(p)
    p.set_defaults(handler=bundle_get)

    fleet = nouns.add_parser("fleet", help="devices").add_subparsers(dest="verb", required=True)
    p = fleet.add_parser("register", help="provision a device; prints its secret once")
    p.add_argument("device_id")
    p.add_argument("--model", required=True)
    p.add_argument("--region", required=True)
    p.add_argument("--firmware", required=True)
    client_options(p)
    p.set_defaults(handler=fleet_register)
    p = fleet.add_parser("list", help="devices matching a selector")
    p.add_argument("--selector", default="")
    p.add_argument("--limit", type=int, default=100)
    client_options(p)
    p.set_defaults(handler=fleet_list)
    p = fleet.add_parser("get", help="one device and its recent events")
    p.add_argument("device_id")
    client_options(p)
    p.set_defaults(handler=fleet_get)
    p = fleet.add_parser("revoke", help="revoke a device's credentials")
    p.add_argument("device_id")
    client_options(p)
    p.set_defaults(handler=fleet_revoke)

    rollout = nouns.add_parser("rollout", help="staged rollouts").add_subparsers(
        dest="verb", required=True
    )
    p = rollout.add_parser("create", help="a rollout in DRAFT")
    p.add_argument("--feature", required=True)
    p.add_argument("--version", required=True)
    p.add_argument("--stages", default="1%,10%,100%")
    p.add_argument("--soak", type=int, default=0, help="minimum soak per stage, seconds")
    p.add_argument("--selector", default="")
    p.add_argument("--max-failure", default="5%", help="install-failure gate threshold")
    p.add_argument("--min-sample", type=int, default=5)
    p.add_argument("--on-breach", choices=("pause", "rollback"), default="pause")
    p.add_argument("--request-id", default="")
    client_options(p)
    p.set_defaults(handler=rollout_create)
    for verb in ROLLOUT_VERBS:
        p = rollout.add_parser(verb, help=f"{verb} a rollout")
        p.add_argument("rollout_id")
        p.add_argument("--reason", default="")
        client_options(p)
        p.set_defaults(handler=rollout_command, command=verb)
    p = rollout.add_parser("status", help="a rollout's state and progress")
    p.add_argument("rollout_id")
    client_options(p)
    p.set_defaults(handler=rollout_status)
    p = rollout.add_parser("list", help="rollouts")
    p.add_argument("--feature", default="")
    client_options(p)
    p.set_defaults(handler=rollout_list)
    p = rollout.add_parser("watch", help="live progress until the rollout ends")
    p.add_argument("rollout_id")
    client_options(p)
    p.set_defaults(handler=rollout_watch)
    p = rollout.add_parser("history", help="the audit log")
    p.add_argument("rollout_id")
    client_options(p)
    p.set_defaults(handler=rollout_history)

    p = nouns.add_parser("report", help="adoption report of a rollout")
    p.add_argument("rollout_id")
    client_options(p)
    p.set_defaults(handler=report)
    # report has its own formats: table, csv, json
    for action in p._actions:
        if action.dest == "format":
            action.choices = ("table", "csv", "json")
    p.add_argument("--out", type=Path, help="write to a file instead of stdout")


def bundle_publish(args: argparse.Namespace) -> int:
    client = _client(args)
    result = client.publish_bundle(
        args.file,
        feature=args.feature,
        version=args.version,
        models=args.model,
        min_firmware=args.min_firmware,
        keys=args.key,
    )
    if args.format == "json":
        emit_json(result)
    else:
        console.print(
            f"published {result.name} ({result.length} bytes, sha256 {result.sha256.hex()[:16]}…)"
        )
    return 0


def _bundle_rows(bundles: list[bundle_pb2.Bundle]) -> list[list[object]]:
    return [[b.name, b.length, b.sha256.hex()[:16], ",".join(b.models)] for b in bundles]


def bundle_list(args: argparse.Namespace) -> int:
    client = _client(args)
    response = client.bundles.ListBundles(
        bundle_pb2.ListBundlesRequest(feature=args.feature), metadata=client.metadata
    )
    if args.format == "json":
        emit_json(list(response.bundles))
    else:
        table(
            "Bundles", ["name", "bytes", "sha256", "models"], _bundle_rows(list(response.bundles))
        )
    return 0


def bundle_get(args: argparse.Namespace) -> int:
    client = _client(args)
    b = client.bundles.GetBundle(
        bundle_pb2.GetBundleRequest(name=args.name), metadata=client.metadata
    )
    if args.format == "json":
        emit_json(b)
    else:
        table("Bundle", ["name", "bytes", "sha256", "models"], _bundle_rows([b]))
    return 0


def fleet_register(args: argparse.Namespace) -> int:
    client = _client(args)
    response = client.fleet.RegisterDevices(
        fleet_pb2.RegisterDevicesRequest(
            devices=[
                fleet_pb2.DeviceRegistration(
                    device_id=args.device_id,
                    model=args.model,
                    region=args.region,
                    firmware=args.firmware,
                )
            ]
        ),
        metadata=client.metadata,
    )
    if args.format == "json":
        emit_json(response)
    else:
        c = response.credentials[0]
        console.print(
            f"registered {c.device_id}; secret {c.secret} (shown once); broker {response.mqtt_url}"
        )
    return 0


def fleet_list(args: argparse.Namespace) -> int:
    client = _client(args)
    response = client.fleet.ListDevices(
        fleet_pb2.ListDevicesRequest(selector=args.selector, page_size=args.limit),
        metadata=client.metadata,
    )
    if args.format == "json":
        emit_json(response)
    else:
        table(
            f"Devices ({response.total_size} match)",
            ["device", "model", "region", "firmware", "online", "revoked"],
            [
                [d.device_id, d.model, d.region, d.firmware, d.online, d.revoked]
                for d in response.devices
            ],
        )
    return 0


def fleet_get(args: argparse.Namespace) -> int:
    client = _client(args)
    response = client.fleet.GetDevice(
        fleet_pb2.GetDeviceRequest(device_id=args.device_id), metadata=client.metadata
    )
    if args.format == "json":
        emit_json(response)
        return 0
    d = response.device
    console.print(
        f"{d.device_id}  model {d.model}  region {d.region}  firmware {d.firmware}  online {d.online}"
    )
    from ota.v1 import common_pb2

    table(
        "Events",
        ["seq", "rollout", "state", "reason"],
        [
            [
                e.seq,
                e.rollout_id,
                common_pb2.DeviceState.Name(e.state),
                common_pb2.FailureReason.Name(e.error_code) if e.error_code else "",
            ]
            for e in response.events
        ],
    )
    return 0


def fleet_revoke(args: argparse.Namespace) -> int:
    client = _client(args)
    d = client.fleet.RevokeDevice(
        fleet_pb2.RevokeDeviceRequest(device_id=args.device_id), metadata=client.metadata
    )
    if args.format == "json":
        emit_json(d)
    else:
        console.print(f"revoked {d.device_id}")
    return 0


def _parse_percent(text: str, field: str) -> int:
    try:
        return round(float(text.rstrip("%")) * 10_000)
    except ValueError as exc:
        raise InvalidArgument(f"{text!r} is not a percentage", field=field) from exc


def rollout_create(args: argparse.Namespace) -> int:
    client = _client(args)
    stages = parse_stages(args.stages, soak_seconds=args.soak)
    gate = FailureGate(
        max_failure_ppm=_parse_percent(args.max_failure, "max-failure"),
        min_sample=args.min_sample,
        action=args.on_breach,
    )
    r = client.rollouts.CreateRollout(
        rollout_pb2.CreateRolloutRequest(
            feature=args.feature,
            version=args.version,
            selector=args.selector,
            stages=[
                rollout_pb2.Stage(ppm=s.ppm, min_soak_seconds=s.min_soak_seconds) for s in stages
            ],
            gate=rollout_pb2.FailureGate(
                max_failure_ppm=gate.max_failure_ppm,
                min_sample=gate.min_sample,
                action=rollout_pb2.GATE_ACTION_ROLLBACK
                if gate.action == "rollback"
                else rollout_pb2.GATE_ACTION_PAUSE,
            ),
            request_id=args.request_id,
        ),
        metadata=client.metadata,
    )
    _print_rollout(args, r)
    return 0


def _state(r: rollout_pb2.Rollout) -> str:
    return rollout_pb2.RolloutState.Name(r.state).removeprefix("ROLLOUT_STATE_")


def _print_rollout(args: argparse.Namespace, r: rollout_pb2.Rollout) -> None:
    if args.format == "json":
        emit_json(r)
        return
    stage = f"{r.current_stage + 1}/{len(r.stages)}" if r.current_stage >= 0 else "-"
    console.print(
        f"rollout {r.rollout_id}  {r.feature} {r.version}  {_state(r)}  stage {stage}  "
        f"exposed {r.exposed}/{r.eligible}  {r.state_reason}"
    )
    if r.device_states:
        console.print("  " + "  ".join(f"{k} {v}" for k, v in sorted(r.device_states.items())))


def rollout_command(args: argparse.Namespace) -> int:
    client = _client(args)
    method = getattr(client.rollouts, f"{args.command.capitalize()}Rollout")
    r = method(
        rollout_pb2.RolloutCommandRequest(rollout_id=args.rollout_id, reason=args.reason),
        metadata=client.metadata,
    )
    _print_rollout(args, r)
    return 0


def rollout_status(args: argparse.Namespace) -> int:
    client = _client(args)
    r = client.rollouts.GetRollout(
        rollout_pb2.GetRolloutRequest(rollout_id=args.rollout_id), metadata=client.metadata
    )
    _print_rollout(args, r)
    return 0


def rollout_list(args: argparse.Namespace) -> int:
    client = _client(args)
    response = client.rollouts.ListRollouts(
        rollout_pb2.ListRolloutsRequest(feature=args.feature), metadata=client.metadata
    )
    if args.format == "json":
        emit_json(list(response.rollouts))
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
                    r.current_stage + 1,
                    f"{r.exposed}/{r.eligible}",
                ]
                for r in response.rollouts
            ],
        )
    return 0


def rollout_watch(args: argparse.Namespace) -> int:
    client = _client(args)
    final = watch_rollout(client, args.rollout_id, json_lines=args.format == "json")
    return 0 if final in ("COMPLETED",) else 3


def rollout_history(args: argparse.Namespace) -> int:
    client = _client(args)
    response = client.rollouts.ListRolloutEvents(
        rollout_pb2.ListRolloutEventsRequest(rollout_id=args.rollout_id), metadata=client.metadata
    )
    if args.format == "json":
        emit_json(list(response.events))
    else:
        table(
            f"History of {args.rollout_id}",
            ["time", "actor", "action", "stage", "to", "reason"],
            [
                [
                    e.time.ToDatetime().strftime("%Y-%m-%d %H:%M:%S"),
                    e.actor,
                    e.action,
                    e.stage + 1 if e.stage >= 0 else "-",
                    rollout_pb2.RolloutState.Name(e.to_state).removeprefix("ROLLOUT_STATE_"),
                    e.reason,
                ]
                for e in response.events
            ],
        )
    return 0


def report(args: argparse.Namespace) -> int:
    client = _client(args)
    value = client.reports.GetRolloutReport(
        report_pb2.GetRolloutReportRequest(rollout_id=args.rollout_id), metadata=client.metadata
    )
    if args.format == "table":
        if args.out is None:
            report_render.render_table(value, console)
        else:
            with args.out.open("w") as f:
                report_render.render_table(value, Console(file=f, width=120))
            console.print(f"wrote {args.out}")
        return 0
    text = (
        report_render.render_csv(value)
        if args.format == "csv"
        else report_render.render_json(value)
    )
    if args.out is not None:
        args.out.write_text(text)
        console.print(f"wrote {args.out}")
    else:
        sys.stdout.write(text)
    return 0
    text = (
        report_render.render_csv(value)
        if args.format == "csv"
        else report_render.render_json(value)
    )
    if args.format == "table":
        text = report_render.render_json(value)
    if args.out is not None:
        args.out.write_text(text)
        console.print(f"wrote {args.out}")
    else:
        sys.stdout.write(text)
    return 0
