"""download: verified MiB/s over DownloadBundle vs a raw loopback socket copy with SHA-256.

A 64 MiB bundle (16 MiB with --quick) is signed with the release key and
published through the client. A child process downloads it over
`DownloadBundle` (the control plane streams it from its blob store in
256 KiB chunks), hashing every chunk and checking the digest; then it cuts a
download halfway and resumes it from the byte offset. The baseline serves
the same blob file from a thread in this process over a plain TCP socket,
read and sent in the same 256 KiB chunks, and the same child process
receives and hashes it.
"""

from __future__ import annotations

import socket
import statistics
import tempfile
import threading
from pathlib import Path

from bench.common import (
    Figure,
    Result,
    Target,
    bench_stack,
    log,
    publish_bundle,
    ratio,
    run_subprocess_json,
)
from ota.client import Client

NAME = "download"
MIB = 1024 * 1024
CHUNK = 256 * 1024


class RawServer:
    """Sends one file to every connection over loopback TCP, then closes it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._sock.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, name="bench-raw", daemon=True)
        self._stop = False

    def __enter__(self) -> RawServer:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop = True
        self._sock.close()
        self._thread.join(timeout=5)

    def _serve(self) -> None:
        while not self._stop:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            with conn, self.path.open("rb") as f:
                while chunk := f.read(CHUNK):
                    conn.sendall(chunk)


def run(quick: bool) -> Result:
    size = (16 if quick else 64) * MIB
    repeat = 2 if quick else 5
    with (
        tempfile.TemporaryDirectory(prefix="ota-bench-download-") as tmp,
        bench_stack(Path(tmp)) as (stack, _broker),
    ):
        client = Client.connect(stack.server, stack.admin_token)
        try:
            bundle = publish_bundle(
                client, stack, Path(tmp), feature="bench-download", version="1.0.0", size=size
            )
        finally:
            client.close()
        sha = bytes(bundle.sha256).hex()
        log(f"published {size // MIB} MiB as {bundle.target_path}")
        grpc_out = run_subprocess_json(
            [
                "download",
                "--target",
                stack.server,
                "--token",
                stack.admin_token,
                "--target-path",
                bundle.target_path,
                "--sha256",
                sha,
                "--length",
                str(size),
                "--repeat",
                str(repeat),
                "--cut",
            ],
            timeout=600,
        )
        log(
            "DownloadBundle: "
            + ", ".join(f"{x:,.0f}" for x in grpc_out["mib_s"])
            + f" MiB/s; digest ok {grpc_out['ok']}; resume after a cut ok {grpc_out['resume_ok']}"
        )
        blob = stack.control_plane.config.data_dir / "blobs" / sha
        with RawServer(blob) as raw:
            raw_out = run_subprocess_json(
                [
                    "raw",
                    "--port",
                    str(raw.port),
                    "--sha256",
                    sha,
                    "--length",
                    str(size),
                    "--repeat",
                    str(repeat),
                ],
                timeout=600,
            )
        log(
            "raw socket + SHA-256: "
            + ", ".join(f"{x:,.0f}" for x in raw_out["mib_s"])
            + f" MiB/s; digest ok {raw_out['ok']}"
        )
    if not (grpc_out["ok"] and raw_out["ok"]):
        raise RuntimeError("a download did not match the published SHA-256")
    figure = statistics.median(grpc_out["mib_s"])
    base = statistics.median(raw_out["mib_s"])
    r = ratio(figure, base)
    return Result(
        name=NAME,
        mode="quick" if quick else "full",
        figure=Figure(figure, "MiB/s", "DownloadBundle, SHA-256 checked"),
        baseline=Figure(base, "MiB/s", "raw loopback socket copy, SHA-256 checked"),
        ratio=r,
        targets=[
            Target(">= 0.3 of baseline", r is not None and r >= 0.3),
            Target("resume after a cut", bool(grpc_out["resume_ok"])),
        ],
        details={
            "bundle_bytes": size,
            "chunk_bytes": CHUNK,
            "repeat": repeat,
            "download_runs_mib_s": grpc_out["mib_s"],
            "raw_runs_mib_s": raw_out["mib_s"],
            "resume_ok": grpc_out["resume_ok"],
        },
    )
