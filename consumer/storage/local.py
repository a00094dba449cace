"""PNG files on the local disk, under one root directory per bucket."""

from __future__ import annotations

import asyncio
import os
import tempfile
from pathlib import Path

from imagen.errors import SettingsError, StorageError


class LocalStore:
    """Write objects as files under `root/<key>`; `bucket` is recorded in the images row."""

    kind = "local"

    def __init__(self, root: Path, bucket: str = "local") -> None:
        self.root = root.resolve()
        self.bucket = bucket

    def path_for(self, key: str) -> Path:
        """Return the file of `key`, refusing keys that would leave the root."""
        path = (self.root / key).resolve()
        if self.root not in path.parents:
            raise StorageError(f"object key {key!r} is invalid: it must stay inside {self.root}")
        return path

    async def check_writable(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.root, prefix=".probe-"):
                pass
        except OSError as exc:
            raise SettingsError(
                f"output directory {self.root} is not writable ({exc.strerror}): "
                "set IMAGEN_OUTPUT_DIR to a writable directory"
            ) from exc

    async def put(self, key: str, data: bytes, content_type: str) -> None:
        path = self.path_for(key)
        await asyncio.to_thread(_write_atomically, path, data)

    async def delete(self, key: str) -> None:
        path = self.path_for(key)
        try:
            await asyncio.to_thread(path.unlink, True)
        except OSError as exc:
            raise StorageError(f"deleting {path} failed: {exc.strerror}", transient=True) from exc

    async def close(self) -> None:
        return None


def _write_atomically(path: Path, data: bytes) -> None:
    """Write to a temporary file and rename it, so a crash never leaves half a PNG."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(descriptor, "wb") as handle:
                handle.write(data)
            os.replace(temp_name, path)
        except BaseException:
            Path(temp_name).unlink(missing_ok=True)
            raise
    except OSError as exc:
        # A full disk or a permission problem may clear up; the job is retried.
        raise StorageError(f"writing {path} failed: {exc.strerror or exc}", transient=True) from exc
