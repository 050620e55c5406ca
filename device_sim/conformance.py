"""The device's TUF client behind the CLI of the TUF conformance suite, over plain HTTP.

https://github.com/theupdateframework/tuf-conformance (CLIENT-CLI.md):

    python -m device_sim.conformance --metadata-dir DIR init ROOT_FILE
    python -m device_sim.conformance --metadata-dir DIR --metadata-url URL refresh
    python -m device_sim.conformance --metadata-dir DIR --metadata-url URL \\
        --target-name NAME --target-base-url URL --target-dir DIR download

The updater is built as a device builds it (`ota.device.trust.build_updater`),
with python-tuf's own urllib3 fetcher in place of the device's gRPC one and the
system clock as the device clock. Exit status 0 only on full success; 1 when
any part failed (the reason is printed on stderr, as the FailureReason a
device would report); 2 for a usage error.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from tuf.api import exceptions as tuf_errors
from tuf.ngclient.updater import Updater

from ota.clock import Clock, SystemClock
from ota.device.trust import as_verification_error, build_updater, write_atomically
from ota.errors import OtaError, VerificationError

PROG = "ota-tuf-client"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="The device's TUF client, speaking the TUF conformance-suite client CLI.",
    )
    parser.add_argument("--metadata-dir", type=Path, required=True, help="trusted metadata")
    parser.add_argument("--metadata-url", help="base URL of the repository's metadata")
    parser.add_argument("--target-name", help="TUF target path to download")
    parser.add_argument("--target-base-url", help="base URL of the repository's targets")
    parser.add_argument("--target-dir", type=Path, help="where verified targets are kept")
    verbs = parser.add_subparsers(dest="verb", required=True)
    init = verbs.add_parser("init", help="trust ROOT_FILE (no network)")
    init.add_argument("trusted_root", type=Path, metavar="ROOT_FILE")
    verbs.add_parser("refresh", help="update the top-level metadata")
    verbs.add_parser("download", help="download and verify one target")
    return parser


def init(metadata_dir: Path, trusted_root: Path) -> None:
    """Start trusting `trusted_root`; the suite expects no checks and no requests yet."""
    data = trusted_root.read_bytes()
    metadata_dir.mkdir(parents=True, exist_ok=True)
    root = metadata_dir / "root.json"
    root.unlink(missing_ok=True)  # may be python-tuf's symlink into root_history/
    write_atomically(root, data, durable=True)


def refresh(metadata_dir: Path, metadata_url: str, clock: Clock) -> None:
    """Update the top-level metadata following the TUF client workflow."""
    updater = _updater(metadata_dir, metadata_url, clock)
    with as_verification_error("refresh"):
        updater.refresh()


def download(
    metadata_dir: Path,
    metadata_url: str,
    *,
    target_name: str,
    target_base_url: str,
    target_dir: Path,
    clock: Clock,
) -> Path:
    """Refresh, then fetch `target_name` unless a verified copy is already in `target_dir`."""
    target_dir.mkdir(parents=True, exist_ok=True)
    updater = _updater(
        metadata_dir,
        metadata_url,
        clock,
        target_dir=target_dir,
        target_base_url=_with_slash(target_base_url),
    )
    with as_verification_error(target_name):
        info = updater.get_targetinfo(target_name)
        if info is None:
            raise VerificationError(
                "SIGNATURE_INVALID", f"{target_name} is not a target the repository signed"
            )
        cached = updater.find_cached_target(info)
        return Path(cached if cached is not None else updater.download_target(info))


def _updater(
    metadata_dir: Path,
    metadata_url: str,
    clock: Clock,
    *,
    target_dir: Path | None = None,
    target_base_url: str | None = None,
) -> Updater:
    try:
        return build_updater(
            metadata_dir,
            _with_slash(metadata_url),
            bootstrap=None,  # the root `init` stored, or a newer one since
            reference_time=clock.now(),
            target_dir=target_dir,
            target_base_url=target_base_url,
        )
    except tuf_errors.RepositoryError as exc:
        raise VerificationError(
            "METADATA_INVALID", f"the trusted root in {metadata_dir} is unusable: {exc}"
        ) from exc


def _with_slash(url: str) -> str:
    return url if url.endswith("/") else url + "/"


def _required(args: argparse.Namespace, *names: str) -> None:
    missing = [f"--{n.replace('_', '-')}" for n in names if not getattr(args, n)]
    if missing:
        build_parser().error(f"{args.verb} needs {' and '.join(missing)}")


def main(argv: Sequence[str] | None = None, *, clock: Clock | None = None) -> int:
    args = build_parser().parse_args(argv)
    clock = clock or SystemClock()
    try:
        if args.verb == "init":
            init(args.metadata_dir, args.trusted_root)
        elif args.verb == "refresh":
            _required(args, "metadata_url")
            refresh(args.metadata_dir, args.metadata_url, clock)
        else:
            _required(args, "metadata_url", "target_name", "target_base_url", "target_dir")
            path = download(
                args.metadata_dir,
                args.metadata_url,
                target_name=args.target_name,
                target_base_url=args.target_base_url,
                target_dir=args.target_dir,
                clock=clock,
            )
            print(path)
    except VerificationError as exc:
        print(f"{PROG}: {args.verb} failed: {exc.reason}: {exc}", file=sys.stderr)
        return 1
    except (OtaError, OSError, ValueError) as exc:
        print(f"{PROG}: {args.verb} failed: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
