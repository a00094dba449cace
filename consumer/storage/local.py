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
        # Folders known to exist, so each write skips its mkdir calls.
        self._folders: set[Path] = set()

    def path_for(self, key: str) -> Path:
        """Return the file of `key`, rejecting keys that would leave the root.

        The check is lexical (no symlinks are followed): keys come from
        `object_key`, whose slugs hold only lowercase ASCII letters, digits
        and dashes.
        """
        path = Path(os.path.normpath(self.root / key))
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
        make_folder = path.parent not in self._folders
        try:
            await asyncio.to_thread(_write_atomically, path, data, make_folder)
        except StorageError:
            # The folder may have been removed since it was cached.
            self._folders.discard(path.parent)
            raise
        self._folders.add(path.parent)

    async def delete(self, key: str) -> None:
        path = self.path_for(key)
        try:
            await asyncio.to_thread(path.unlink, True)
        except OSError as exc:
            raise StorageError(f"deleting {path} failed: {exc.strerror}", transient=True) from exc

    async def close(self) -> None:
        return None


def _write_atomically(path: Path, data: bytes, make_folder: bool = True) -> None:
    """Write to a temporary file and rename it, so a crash never leaves half a PNG."""
    try:
        if make_folder:
            path.parent.mkdir(parents=True, exist_ok=True)
        descriptor, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(descriptor, "wb") as handle:
                handle.write(data)
            # mkstemp creates the file readable by its owner alone; images are
            # meant to be read by other users too (a web server, a sync job).
            os.chmod(temp_name, 0o644)
            os.replace(temp_name, path)
        except BaseException:
            Path(temp_name).unlink(missing_ok=True)
            raise
    except OSError as exc:
        # A full disk or a permission problem may clear up; the job is retried.
        raise StorageError(f"writing {path} failed: {exc.strerror or exc}", transient=True) from exc
