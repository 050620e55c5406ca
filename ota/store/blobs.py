"""Bundle bytes on disk, addressed by SHA-256, streamed in and out in chunks."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ota.errors import InvalidArgument, NotFound

CHUNK = 256 * 1024


@dataclass(frozen=True)
class StoredBlob:
    sha256_hex: str
    length: int
    path: Path


class BlobStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def write(self, chunks: Iterable[bytes], *, max_length: int) -> StoredBlob:
        """Stream chunks to a temporary file; keep it under its digest."""
        digest = hashlib.sha256()
        length = 0
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".upload-")
        try:
            with os.fdopen(fd, "wb") as f:
                for chunk in chunks:
                    length += len(chunk)
                    if length > max_length:
                        raise InvalidArgument(
                            f"bundle is longer than the {max_length} bytes that were signed",
                            field="chunk",
                        )
                    digest.update(chunk)
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
            sha = digest.hexdigest()
            final = self.root / sha
            os.replace(tmp, final)
            return StoredBlob(sha, length, final)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def read(self, sha256_hex: str, *, offset: int = 0, chunk_size: int = CHUNK) -> Iterator[bytes]:
        path = self.root / sha256_hex
        try:
            f = path.open("rb")
        except FileNotFoundError as exc:
            raise NotFound(
                f"bundle bytes {sha256_hex[:12]} are missing", field="target_path"
            ) from exc
        with f:
            f.seek(offset)
            while chunk := f.read(chunk_size):
                yield chunk
