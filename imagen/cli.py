"""The `imagen` command."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import uuid
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from imagen.errors import ImagenError, SettingsError
from imagen.logs import configure_logging
from imagen.settings import DEFAULT_MODEL, Settings

logger = logging.getLogger("imagen.cli")

DEMO_PROMPT = "a lighthouse on a cliff at dawn, oil painting"


# --------------------------------------------------------------------- helpers


def load_env_file(path: Path) -> None:
    """Read KEY=VALUE lines (as in the Go worker's env file) into os.environ without overriding set values.

    Accepts what docker compose's env files accept: `export ` prefixes,
    single- or double-quoted values, `#` comments on their own line or after
    a value (unquoted values need a space before the `#`), a UTF-8 byte order
    mark and Windows line ends.
    """
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise SettingsError(f"env file {path} not found: pass an existing file to --env-file") from None
    except IsADirectoryError:
        raise SettingsError(f"env file {path} is a directory: pass the file itself to --env-file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SettingsError(f"env file {path} cannot be read ({exc}): check its permissions and encoding") from None
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export "):].strip()
        key, separator, value = line.partition("=")
        key = key.strip()
        if not separator or not key.replace("_", "").isalnum():
            raise SettingsError(f"{path}:{number} is not KEY=VALUE: fix or remove that line")
        os.environ.setdefault(key, _env_value(value.strip(), path, number))


def _env_value(value: str, path: Path, number: int) -> str:
    """Unquote a value and drop a trailing comment."""
    if value[:1] in ("'", '"'):
        quote = value[0]
        end = value.find(quote, 1)
        rest = value[end + 1:].strip() if end != -1 else ""
        if end == -1 or (rest and not rest.startswith("#")):
            raise SettingsError(f"{path}:{number} has an unterminated or malformed quoted value: fix the quotes")
        return value[1:end]
    comment = value.find(" #")
    return value[:comment].rstrip() if comment != -1 else value


@contextmanager
def progress(enabled: bool):
    """Yield a `say(text)` that shows a spinner on a terminal and logs otherwise."""
    if enabled and sys.stderr.isatty():
        from rich.console import Console

        console = Console(stderr=True)
        with console.status("starting") as status:
            yield lambda text: status.update(text)
    else:
        yield lambda text: logger.info(text, extra={"event": "progress"})


def _print_row(row: dict[str, Any]) -> None:
    from imagen.demo import jsonable_row

    print(json.dumps(jsonable_row(row), indent=2, ensure_ascii=False))


async def _connect(settings: Settings):
    import asyncpg

    from imagen.service import resolve_database_url

    dsn, _started = await asyncio.to_thread(resolve_database_url, settings)
    return await asyncpg.connect(dsn)


# --------------------------------------------------------------------- commands


def cmd_migrate(settings: Settings, _args: argparse.Namespace) -> int:
    from imagen.migrate import migrate
    from imagen.service import resolve_database_url

    dsn, _started = resolve_database_url(settings)
    applied = asyncio.run(migrate(dsn))
    print(f"applied {len(applied)} migration(s)" + (f": {', '.join(applied)}" if applied else ""))
    return 0


def cmd_db_url(settings: Settings, _args: argparse.Namespace) -> int:
    from imagen.service import resolve_database_url

    dsn, _started = resolve_database_url(settings)
    print(dsn)
    return 0


def cmd_submit(settings: Settings, args: argparse.Namespace) -> int:
    return asyncio.run(_submit(settings, args))


async def _submit(settings: Settings, args: argparse.Namespace) -> int:
    from consumer.queries import query

    connection = await _connect(settings)
    try:
        owner = args.owner or settings.owner_user_id
        job_id = await connection.fetchval(
            query("insert_job"), uuid.UUID(owner) if owner else None, args.prompt, args.style, args.backend,
            args.width, args.height, args.steps, args.guidance, args.seed, settings.max_attempts if args.max_attempts is None else args.max_attempts,
            None,
        )
        print(job_id)
        if not args.wait:
            return 0
        row = await wait_for_job(connection, str(job_id), timeout_s=args.timeout_s, show_progress=True)
        _print_row(dict(row))
        return 0 if row["status"] == "done" else 1
    finally:
        await connection.close()


async def wait_for_job(connection, job_id: str, *, timeout_s: float, show_progress: bool = False,
                       poll_interval_s: float = 0.1):
    """Poll the job row until it finishes, drawing its denoising progress on a terminal."""
    from consumer.queries import query

    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    bar = _ProgressBar(enabled=show_progress and sys.stderr.isatty())
    try:
        while True:
            row = await connection.fetchrow(query("get_job"), uuid.UUID(job_id))
            if row is None:
                raise ImagenError(f"job {job_id} not found")
            bar.update(row["status"], row["progress_step"], row["progress_total"])
            if row["status"] in ("done", "failed", "cancelled"):
                return row
            if loop.time() > deadline:
                raise ImagenError(f"job {job_id} is still {row['status']} after {timeout_s:g} s: raise --timeout-s "
                                  "or check `imagen status`")
            await asyncio.sleep(poll_interval_s)
    finally:
        bar.close()


class _ProgressBar:
    """Progress bar of a job's denoising steps, drawn only on a terminal."""

    def __init__(self, enabled: bool) -> None:
        self._progress = None
        self._task = None
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

            self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                      transient=True)
            self._progress.start()
            self._task = self._progress.add_task("pending", total=None)

    def update(self, status: str, step: int | None, total: int | None) -> None:
        if self._progress is None:
            return
        self._progress.update(self._task, description=status, completed=step or 0, total=total)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()


def cmd_cancel(settings: Settings, args: argparse.Namespace) -> int:
    async def cancel() -> int:
        connection = await _connect(settings)
        try:
            from consumer.queries import query

            status = await connection.fetchval(query("cancel_job"), uuid.UUID(args.job_id))
            if status is None:
                current = await connection.fetchval(query("job_state"), uuid.UUID(args.job_id), column=1)
                print(f"job {args.job_id} was not cancelled: it is {current or 'not found'}", file=sys.stderr)
                return 1
            print(f"job {args.job_id} cancelled")
            return 0
        finally:
            await connection.close()

    return asyncio.run(cancel())


def cmd_status(settings: Settings, args: argparse.Namespace) -> int:
    from imagen.status import print_status

    async def status() -> int:
        connection = await _connect(settings)
        try:
            await print_status(connection, failures=args.failures, as_json=args.json)
            return 0
        finally:
            await connection.close()

    return asyncio.run(status())


def cmd_generate(settings: Settings, args: argparse.Namespace) -> int:
    """Generate one image in this process, without the queue or Ray."""
    import random

    from serve_app.pipeline import FluxGenerator
    from serve_app.requests import GenerationRequest

    output = Path(args.output)
    if output.is_dir():
        raise SettingsError(f"-o {output} is a directory: give the PNG file to write, e.g. {output / 'image.png'}")
    model = _choose_model(settings, args.model)
    with progress(True) as say:
        say(f"loading model {model}")
        generator = FluxGenerator.load(model, settings.device, data_dir=settings.data_dir)
        seed = args.seed if args.seed is not None else random.randrange(2**32)
        request = GenerationRequest(prompt=args.prompt, width=args.width, height=args.height, seed=seed,
                                    steps=args.steps, guidance=args.guidance)
        say("generating")
        outcome = generator.generate_batch([request])[0]
    if isinstance(outcome, Exception):
        raise outcome
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_bytes(outcome.png)
    print(json.dumps({"file": str(output), "seed": outcome.seed, "width": outcome.width, "height": outcome.height,
                      "steps": outcome.steps, "model": outcome.model}))
    return 0


def _choose_model(settings: Settings, requested: str | None) -> str:
    """Use the requested or configured model; fall back to `tiny` when the default weights are not on disk."""
    if requested:
        return requested
    if os.environ.get("IMAGEN_MODEL"):
        return settings.model
    if settings.model == DEFAULT_MODEL and not _weights_available(settings):
        warnings.warn(
            f"the weights of {DEFAULT_MODEL} are not on this machine, so the tiny model with random weights is "
            "used and its images are noise. Set IMAGEN_MODEL to a Hub id (downloads it) or a local directory "
            "for real images.", stacklevel=2)
        logger.warning("using the tiny random-weight model: its images are noise",
                       extra={"event": "tiny_model_fallback", "model": DEFAULT_MODEL})
        return "tiny"
    return settings.model


def _weights_available(settings: Settings) -> bool:
    try:
        from huggingface_hub import snapshot_download

        from serve_app.pipeline import configure_cache_dirs

        configure_cache_dirs(settings.data_dir)
        snapshot_download(settings.model, local_files_only=True)
        return True
    except Exception:  # noqa: BLE001 - any lookup failure means "not on disk"
        return False


def cmd_up(settings: Settings, args: argparse.Namespace) -> int:
    from imagen.service import Service

    async def up() -> int:
        service = Service(settings)
        stop = asyncio.Event()
        _install_signal_handlers(stop)
        with progress(True) as say:
            await service.start(migrate=args.migrate, progress=say)
        # ray.init installs a crash handler for SIGTERM that aborts the process
        # after our shutdown; installing ours again keeps the shutdown graceful.
        _install_signal_handlers(stop)
        print("imagen is running; send SIGTERM or press Ctrl+C to stop", file=sys.stderr)
        health = asyncio.create_task(service.watch_health(stop))
        await stop.wait()
        await health
        await service.stop()
        return 0

    return asyncio.run(up())


def cmd_consume(settings: Settings, args: argparse.Namespace) -> int:
    """Run one consumer in this process (scale-out on any host, and crash tests)."""
    from consumer.backends import build_backends
    from consumer.metrics import build_observer
    from consumer.storage import build_store
    from consumer.worker import Consumer
    from imagen.service import resolve_database_url
    from imagen.telemetry import configure_tracing, shutdown_tracing

    async def consume() -> int:
        configure_tracing("imagen-consumer")
        dsn, _started = await asyncio.to_thread(resolve_database_url, settings)
        get_handle = None
        if args.serve:
            from imagen import cluster

            await asyncio.to_thread(cluster.start_ray, settings)
            get_handle = cluster.get_handle
        consumer = Consumer(settings, dsn, build_backends(settings, get_serve_handle=get_handle),
                            build_store(settings), observer=build_observer())
        stop = asyncio.Event()
        _install_signal_handlers(stop)
        await consumer.start()
        await stop.wait()
        await consumer.stop()
        await asyncio.to_thread(shutdown_tracing)
        return 0

    return asyncio.run(consume())


def cmd_health(settings: Settings, _args: argparse.Namespace) -> int:
    from imagen.service import check_health

    ready, reason = check_health(settings)
    print(reason)
    return 0 if ready else 1


def cmd_demo(settings: Settings, args: argparse.Namespace) -> int:
    from imagen.demo import run_demo

    return asyncio.run(run_demo(settings, args, choose_model=_choose_model, wait_for_job=wait_for_job,
                                progress=progress, install_signal_handlers=_install_signal_handlers))


def _install_signal_handlers(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)


# --------------------------------------------------------------------- parser


def _uuid_arg(raw: str) -> str:
    try:
        return str(uuid.UUID(raw))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a UUID such as 123e4567-e89b-12d3-a456-426614174000, got {raw!r}") from None


def _seed_arg(raw: str) -> int:
    try:
        seed = int(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {raw!r}") from None
    if not 0 <= seed < 2**63:
        raise argparse.ArgumentTypeError(f"must be between 0 and 2**63 - 1, got {seed}")
    return seed


def _positive_seconds_arg(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of seconds, got {raw!r}") from None
    if not (value > 0 and value < float("inf")):
        raise argparse.ArgumentTypeError(f"must be a positive finite number of seconds, got {raw!r}")
    return value


def _add_job_options(parser: argparse.ArgumentParser, *, size_default: int | None) -> None:
    parser.add_argument("--width", type=int, default=size_default, help="image width in pixels, a multiple of 16")
    parser.add_argument("--height", type=int, default=size_default, help="image height in pixels, a multiple of 16")
    parser.add_argument("--seed", type=_seed_arg, default=None,
                        help="random seed from 0 to 2**63 - 1; picked at random when omitted")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps; the backend's default when omitted")
    parser.add_argument("--guidance", type=float, default=None, help="guidance scale, for backends that use it")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imagen", description="Turn queued image jobs into FLUX images.")
    parser.add_argument("--env-file", type=Path, help="read settings from this KEY=VALUE file (the Go worker's format)")
    parser.add_argument("--log-format", choices=["text", "json"], help="log format (IMAGEN_LOG_FORMAT)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser("demo", help="run one job end to end on an embedded database")
    demo.add_argument("prompt", nargs="?", default=DEMO_PROMPT)
    demo.add_argument("--model", help="model Hub id, local directory or 'tiny' (IMAGEN_MODEL)")
    demo.add_argument("--backend", default="flux-schnell-local")
    demo.add_argument("--timeout-s", default=600.0, type=_positive_seconds_arg, help="seconds to wait for the job")
    _add_job_options(demo, size_default=None)
    demo.set_defaults(handler=cmd_demo)

    up = commands.add_parser("up", help="run the deployment and the consumers until SIGTERM")
    up.add_argument("--migrate", action="store_true", help="apply migrations first (always on the embedded database)")
    up.set_defaults(handler=cmd_up)

    consume = commands.add_parser("consume", help="run one consumer in this process")
    consume.add_argument("--no-serve", dest="serve", action="store_false",
                         help="do not connect to Ray; only the mock and Replicate backends work")
    consume.set_defaults(handler=cmd_consume)

    migrate = commands.add_parser("migrate", help="apply the SQL migrations")
    migrate.set_defaults(handler=cmd_migrate)

    submit = commands.add_parser("submit", help="queue a job and print its id")
    submit.add_argument("prompt")
    submit.add_argument("--backend", default=None, help="backend name (default flux-schnell-local)")
    submit.add_argument("--style", default=None, help="prompt style, e.g. photo or watercolor")
    submit.add_argument("--owner", type=_uuid_arg, default=None, help="owner user id (default IMAGEN_OWNER_USER_ID)")
    submit.add_argument("--max-attempts", type=int, default=None)
    submit.add_argument("--wait", action="store_true", help="wait for the job and show its progress")
    submit.add_argument("--timeout-s", type=_positive_seconds_arg, default=600.0, help="seconds to wait with --wait")
    _add_job_options(submit, size_default=None)
    submit.set_defaults(handler=cmd_submit)

    generate = commands.add_parser("generate", help="generate one image in this process, without the queue")
    generate.add_argument("prompt")
    generate.add_argument("-o", "--output", required=True, help="PNG file to write")
    generate.add_argument("--model", help="model Hub id, local directory or 'tiny'")
    _add_job_options(generate, size_default=1024)
    generate.set_defaults(handler=cmd_generate)

    cancel = commands.add_parser("cancel", help="cancel a pending or running job")
    cancel.add_argument("job_id", type=_uuid_arg)
    cancel.set_defaults(handler=cmd_cancel)

    status = commands.add_parser("status", help="jobs by status, the oldest pending job, failures and leases")
    status.add_argument("--failures", type=int, default=5, help="how many recent failures to list")
    status.add_argument("--json", action="store_true", help="print JSON instead of tables")
    status.set_defaults(handler=cmd_status)

    health = commands.add_parser("health", help="exit 0 when the running service is ready")
    health.set_defaults(handler=cmd_health)

    db = commands.add_parser("db", help="database helpers")
    db_commands = db.add_subparsers(dest="db_command", required=True, metavar="DB_COMMAND")
    db_url = db_commands.add_parser("url", help="print the URL of the database in use")
    db_url.set_defaults(handler=cmd_db_url)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.env_file:
            load_env_file(args.env_file)
        if args.log_format:
            os.environ["IMAGEN_LOG_FORMAT"] = args.log_format
        settings = Settings.from_env()
        configure_logging(settings.log_level, settings.log_format)
        return args.handler(settings, args)
    except ImagenError as exc:
        print(f"imagen: error: {_hide_secrets(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - the last line of defence: a clear message, never a raw traceback
        print(f"imagen: error: {_describe(exc)}", file=sys.stderr)
        if logging.getLogger().isEnabledFor(logging.DEBUG):
            logger.debug("traceback", exc_info=True, extra={"event": "cli_traceback"})
        return 1


def _describe(exc: Exception) -> str:
    """Explain a database or connection failure in one line, without secrets."""
    import asyncpg

    if isinstance(exc, asyncpg.CheckViolationError):
        return _hide_secrets(f"the database rejected the value: constraint {exc.constraint_name} failed "
                             f"(the constraint's name states the rule): {exc.detail or exc}")
    if isinstance(exc, asyncpg.PostgresError):
        return _hide_secrets(f"the database rejected the command: {type(exc).__name__}: {exc}")
    if isinstance(exc, (OSError, asyncpg.InterfaceError, TimeoutError)):
        return _hide_secrets(f"cannot reach the database ({type(exc).__name__}: {exc}): check "
                             "IMAGEN_WORKER_DATABASE_URL and that the server is running")
    return _hide_secrets(f"{type(exc).__name__}: {exc}")


def _hide_secrets(text: str) -> str:
    """Replace any secret setting's value, and URL passwords, with ***."""
    from imagen.logs import redact
    from imagen.settings import SECRET_ENV_NAMES

    for name in SECRET_ENV_NAMES:
        value = os.environ.get(name, "")
        if len(value) >= 4:
            text = text.replace(value, "***")
    return redact(text)


if __name__ == "__main__":
    sys.exit(main())
