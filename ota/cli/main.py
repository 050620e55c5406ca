"""`ota`: one entry point with nouns and verbs (PROTOCOL §11).

Errors a user can make print one line and exit non-zero; only a bug in ota
itself shows a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Callable, Sequence

# gRPC's core logs below ERROR to stderr until told otherwise (a failed TLS handshake
# becomes an INFO line before ota's own); the CLI's errors are its own one line.
# Set before grpc is imported; GRPC_VERBOSITY=DEBUG still works for a diagnosis.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import grpc

from ota import __version__
from ota.cli import (
    commands_admin,
    commands_audit,
    commands_ops,
    commands_tokens,
    commands_webhooks,
    output,
)
from ota.cli.connect import add_tls_options
from ota.cli.helptext import describe_commands
from ota.errors import OtaError
from ota.logs import configure_logging

EXIT_USAGE = 2
EXIT_FAILED = 1


def _add_client_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--server",
        default=os.environ.get("OTA_SERVER", "127.0.0.1:50051"),
        help="control plane address (env OTA_SERVER)",
    )
    p.add_argument(
        "--token", default=os.environ.get("OTA_TOKEN", ""), help="bearer token (env OTA_TOKEN)"
    )
    add_tls_options(p)
    p.add_argument(
        "--format",
        choices=("table", "json"),
        default="table",
        help="output for people (table) or scripts (json: see README, Scripts)",
    )
    p.add_argument(
        "--wide",
        action="store_true",
        help="tables show every value whole on one line, full hashes too, however wide",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ota", description="Over-the-air feature rollouts for device fleets."
    )
    parser.add_argument("--version", action="version", version=f"ota {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    nouns = parser.add_subparsers(dest="noun", required=True, metavar="COMMAND")
    commands_admin.register(nouns)
    commands_ops.register(nouns, _add_client_options)
    commands_tokens.register(nouns, _add_client_options)
    commands_webhooks.register(nouns, _add_client_options)
    commands_audit.register(nouns, _add_client_options)
    describe_commands(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(os.environ.get("OTA_LOG_FORMAT", "text"), verbose=args.verbose)
    output.wide_tables = bool(getattr(args, "wide", False))
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except OtaError as exc:
        _trace(args)
        print(f"ota: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except grpc.RpcError as exc:
        _trace(args)
        print(f"ota: error: {rpc_error_line(exc, getattr(args, 'server', ''))}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader left (`ota … | head`): not an error of ours; say nothing more.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_FAILED


def _trace(args: argparse.Namespace) -> None:
    """`ota -v` shows where an error came from; without it, one line is enough."""
    if args.verbose:
        traceback.print_exc(file=sys.stderr)


# Status codes where the answer may come from the wrong place: name the server tried.
_CONNECTION_CODES = (
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.UNAUTHENTICATED,
)


def rpc_error_line(exc: grpc.RpcError, server: str) -> str:
    """One line for a failed call; a connection failure names the server and what to check."""
    code: grpc.StatusCode = exc.code()
    details: str = exc.details() or ""
    if code == grpc.StatusCode.UNAVAILABLE:
        hint = ""
        # A plaintext client on a TLS port sees only "Socket closed": the server hung up
        # on bytes that were not a TLS ClientHello.
        lowered = details.lower()
        if "handshake" in lowered or "ssl" in lowered or "socket closed" in lowered:
            hint = "; is it a TLS port (then --tls or --tls-ca) or a plaintext one (then neither)?"
        elif "refused" in lowered:
            hint = "; is `ota serve` running there, and is that the right port?"
        return f"{code.name}: cannot reach the control plane at {server} ({details}){hint}"
    if code in _CONNECTION_CODES:
        return f"{code.name}: {details} (server {server})"
    return f"{code.name}: {details}"


if __name__ == "__main__":
    sys.exit(main())
