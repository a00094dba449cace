"""Per-request overhead of the Ray Serve deployment, measured with the tiny model on the CPU.

Part 1 compares one request at a time, three ways:

- pipeline: `FluxPipeline.__call__` directly (no checks, no PNG)
- generator: `FluxGenerator.generate_batch` (input checks, output checks, PNG encode)
- deployment: `handle.generate.remote` (Ray handle call, batch queue, worker thread, result transfer)

The tiny model's own compute is a few milliseconds, so the differences are
the costs each layer adds on top of the model.

Part 2 sweeps max_batch_size x batch_wait_timeout_s. In each case
`--concurrency` callers send `--requests` requests in all, each caller one
after another. The table gives throughput, mean batch size and latency percentiles.

    python bench/serve_overhead.py            # about 5 min on 2 CPU cores (each sweep case restarts the replica)
    python bench/serve_overhead.py --smoke    # a few requests per case, for tests

The deployment starts its own local Ray head under --data-dir (default: the
settings' data dir); the replica gets one CPU (IMAGEN_SERVE_NUM_CPUS is ignored).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    # Started as `python bench/serve_overhead.py`, Python puts bench/ on the path, not the repository root.
    sys.path.insert(0, str(REPO_ROOT))

from imagen.settings import Settings  # noqa: E402
from serve_app.requests import GenerationRequest, GenerationResult  # noqa: E402

SIZE_PX = 64
STEPS = 4


def make_request(index: int) -> GenerationRequest:
    return GenerationRequest(prompt="a photo of a cat", width=SIZE_PX, height=SIZE_PX, seed=index, steps=STEPS,
                             job_id=f"bench-{index}")


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def format_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    lines = [header, *rows]
    widths = [max(len(line[column]) for line in lines) for column in range(len(header))]
    return "\n".join("  ".join(cell.rjust(width) for cell, width in zip(line, widths, strict=True)) for line in lines)


# ---------------------------------------------------------------------------
# Part 1: one request at a time


def time_direct(data_dir: Path, requests: int) -> dict[str, list[float]]:
    import torch

    from serve_app.pipeline import FluxGenerator

    # The replica runs torch on one thread (Ray's num_cpus=1); so does this process.
    torch.set_num_threads(1)
    generator = FluxGenerator.load("tiny", "cpu", data_dir=data_dir)
    pipeline = generator.pipeline

    def call_pipeline(index: int) -> None:
        with torch.inference_mode():
            pipeline("a photo of a cat", width=SIZE_PX, height=SIZE_PX, num_inference_steps=STEPS,
                     generator=torch.Generator().manual_seed(index), output_type="np",
                     max_sequence_length=generator.limits.max_sequence_length)

    def call_generator(index: int) -> None:
        outcome = generator.generate_batch([make_request(index)])[0]
        if not isinstance(outcome, GenerationResult):
            raise RuntimeError(f"generation failed: {outcome}")

    timings: dict[str, list[float]] = {"pipeline": [], "generator": []}
    for name, call in (("pipeline", call_pipeline), ("generator", call_generator)):
        call(0)
        for index in range(requests):
            started_s = time.perf_counter()
            call(index)
            timings[name].append(time.perf_counter() - started_s)
    return timings


async def time_deployment_sequential(handle, requests: int) -> list[float]:
    await handle.generate.remote(make_request(0))
    latencies = []
    for index in range(requests):
        started_s = time.perf_counter()
        await handle.generate.remote(make_request(index))
        latencies.append(time.perf_counter() - started_s)
    return latencies


# ---------------------------------------------------------------------------
# Part 2: batching sweep


async def run_load(handle, requests: int, concurrency: int) -> tuple[float, list[float], list[int]]:
    """Send `requests` requests from `concurrency` callers; return wall time, latencies and batch sizes."""
    latencies: list[float] = []
    batch_sizes: list[int] = []
    next_index = iter(range(requests))

    async def caller() -> None:
        for index in next_index:
            started_s = time.perf_counter()
            result = await handle.generate.remote(make_request(index))
            latencies.append(time.perf_counter() - started_s)
            batch_sizes.append(result.batch_size)

    started_s = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return time.perf_counter() - started_s, latencies, batch_sizes


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="a few requests and one sweep case (for tests)")
    parser.add_argument("--data-dir", type=Path, default=None, help="where Ray and the tiny model live")
    parser.add_argument("--requests", type=int, default=200, help="requests per sweep case (default: 200)")
    parser.add_argument("--concurrency", type=int, default=16, help="concurrent callers in the sweep (default: 16)")
    args = parser.parse_args(argv)
    if args.requests < 1 or args.concurrency < 1:
        parser.error(f"--requests and --concurrency must be >= 1, got {args.requests} and {args.concurrency}")
    return args


async def run(args: argparse.Namespace) -> None:
    from imagen import cluster
    from serve_app.options import ServeOptions

    settings = Settings.from_env().replace(model="tiny", device="cpu", serve_num_cpus=1.0, warmup_shapes=())
    if args.data_dir is not None:
        settings = settings.replace(data_dir=args.data_dir.resolve())

    sequential_requests = 5 if args.smoke else 50
    sweep_requests = 8 if args.smoke else args.requests
    batch_sizes = (4,) if args.smoke else (1, 2, 4, 8)
    wait_timeouts_s = (0.01,) if args.smoke else (0.0, 0.01, 0.05)

    direct = time_direct(settings.data_dir, sequential_requests)

    max_ongoing = max(max(batch_sizes), args.concurrency)
    handle = cluster.deploy(
        settings.replace(serve_max_batch_size=1, serve_batch_wait_timeout_s=0.0, serve_max_ongoing_requests=max_ongoing),
        ServeOptions(),
    )
    try:
        deployment = await time_deployment_sequential(handle, sequential_requests)

        rows = []
        for name, latencies in (("pipeline", direct["pipeline"]), ("generator", direct["generator"]),
                                ("deployment", deployment)):
            rows.append((name, f"{1000 * statistics.median(latencies):.1f}",
                         f"{1000 * percentile(latencies, 0.9):.1f}",
                         f"{1000 * (statistics.median(latencies) - statistics.median(direct['pipeline'])):.1f}"))
        print(f"one request at a time, {SIZE_PX}x{SIZE_PX}, {STEPS} steps, {sequential_requests} requests")
        print(format_table(("path", "p50 ms", "p90 ms", "over pipeline ms"), rows))
        print()

        rows = []
        for max_batch_size in batch_sizes:
            for wait_timeout_s in wait_timeouts_s:
                handle = cluster.deploy(
                    settings.replace(serve_max_batch_size=max_batch_size, serve_batch_wait_timeout_s=wait_timeout_s,
                                     serve_max_ongoing_requests=max_ongoing),
                    ServeOptions(),
                )
                await run_load(handle, min(sweep_requests, args.concurrency), args.concurrency)
                wall_s, latencies, sizes = await run_load(handle, sweep_requests, args.concurrency)
                rows.append((str(max_batch_size), f"{wait_timeout_s:.2f}", f"{sweep_requests / wall_s:.1f}",
                             f"{statistics.mean(sizes):.2f}", f"{1000 * statistics.median(latencies):.1f}",
                             f"{1000 * percentile(latencies, 0.99):.1f}"))
        print(f"batching sweep, {sweep_requests} requests from {args.concurrency} concurrent callers")
        print(format_table(("max batch", "wait s", "images/s", "mean batch", "p50 ms", "p99 ms"), rows))
    finally:
        cluster.shutdown()


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(run(parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
