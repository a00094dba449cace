"""Speed of the full-size FLUX.1 transformer on one GPU, with random weights.

The transformer is built from the FLUX.1 architecture (19 double-stream and
38 single-stream blocks, hidden size 3072, about 12B parameters) with random
bfloat16 weights, so nothing is downloaded. The amount of compute does not
depend on the weight values. Each case runs the denoising loop (one
transformer forward per step plus an Euler update) and, separately, one VAE
decode with a random full-size FLUX VAE. Text encoding (CLIP-L and T5-XXL,
once per prompt) is not measured.

Cases, in this order:

- schnell: 1024x1024, 4 steps, 256 T5 tokens, batch 1
- dev: 1024x1024, 28 steps, 512 T5 tokens, batch 1
- throughput: 512x512 and 1024x1024 at 4 steps, batch 1, 2 and 4

Columns: s/image is denoising plus VAE decode, per image. TFLOP/s counts
only the transformer's matrix multiplications (see `transformer_flops`), and
"% peak" compares it with the GPU's dense bf16 peak, which `--peak-tflops`
overrides. Peak GB is the maximum memory torch allocated during the case.

    python bench/gpu_flux.py                     # estimated 1 to 3 min on one H100, not measured
    python bench/gpu_flux.py --compile --fp8     # the fast path
    python bench/gpu_flux.py --tiny              # tiny config on CPU, seconds; a smoke test

NOTE: the 8-minute bound for a full run with --compile is an estimate for
one H100/H200 and has not been measured on one; `--max-seconds` stops
starting new cases once the budget is spent.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    # Started as `python bench/gpu_flux.py`, Python puts bench/ on the path, not the repository root.
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

# FLUX.1 transformer configuration (black-forest-labs/FLUX.1-dev transformer/config.json).
FLUX_CONFIG = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
# FLUX.1 VAE configuration (black-forest-labs/FLUX.1-dev vae/config.json).
FLUX_VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2, norm_num_groups=32, sample_size=1024, scaling_factor=0.3611, shift_factor=0.1159,
    use_quant_conv=False, use_post_quant_conv=False,
)

TINY_CONFIG = dict(
    patch_size=1, in_channels=64, num_layers=1, num_single_layers=2, attention_head_dim=16,
    num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
    axes_dims_rope=(4, 6, 6),
)
TINY_VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 8, 16, 16),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=1, norm_num_groups=4, sample_size=64, scaling_factor=0.3611, shift_factor=0.1159,
    use_quant_conv=False, use_post_quant_conv=False,
)

# Dense (no sparsity) bf16 tensor-core peaks from the vendors' data sheets, TFLOP/s.
PEAK_BF16_TFLOPS = {
    "H200": 989.0,
    "H100 SXM": 989.0,
    "H100 80GB HBM3": 989.0,
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
}


@dataclass(frozen=True)
class Case:
    name: str
    size: int
    steps: int
    batch: int
    text_tokens: int


@dataclass(frozen=True)
class Row:
    case: Case
    denoise_s: float
    vae_s: float
    peak_gb: float
    tflops: float

    @property
    def seconds_per_image(self) -> float:
        return (self.denoise_s + self.vae_s) / self.case.batch

    @property
    def images_per_s(self) -> float:
        return 1.0 / self.seconds_per_image


def transformer_flops(config: dict, size: int, text_tokens: int) -> float:
    """Count the FLOPs of one transformer forward for one image.

    Every token of the joint sequence (image + text) passes through 12 d^2
    multiply-accumulates of linear layers per block in both block types:
    q, k, v and output projections (4 d^2) and a 4x MLP (8 d^2). Attention
    over the joint sequence of length s costs 2 s^2 d multiply-accumulates
    per block (QK^T and the weighted sum of V). A FLOP is half a
    multiply-accumulate. The embedders and the output projection are added;
    per-sample terms (timestep, guidance and norm modulation) are left out.
    At 1024x1024 with 512 text tokens this gives about 74.4 TFLOP.
    """
    hidden = config["num_attention_heads"] * config["attention_head_dim"]
    image_tokens = (size // 16) ** 2
    sequence = image_tokens + text_tokens
    blocks = config["num_layers"] + config["num_single_layers"]

    linear = 2 * 12 * hidden**2 * sequence
    attention = 2 * 2 * sequence**2 * hidden
    embedders = 2 * (image_tokens * config["in_channels"] * hidden
                     + text_tokens * config["joint_attention_dim"] * hidden
                     + image_tokens * hidden * config["in_channels"])
    return blocks * (linear + attention) + embedders


def peak_tflops(override: float | None) -> float | None:
    if override is not None:
        return override
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in name:
            return value
    return None


def build_models(args: argparse.Namespace, device: str, dtype: torch.dtype):
    from diffusers import AutoencoderKL, FluxTransformer2DModel

    config = TINY_CONFIG if args.tiny else FLUX_CONFIG
    vae_config = TINY_VAE_CONFIG if args.tiny else FLUX_VAE_CONFIG

    # Building on the target device in the target dtype avoids a 48 GB
    # float32 copy of the weights on the host.
    previous_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            torch.manual_seed(0)
            transformer = FluxTransformer2DModel(**config).eval()
            vae = AutoencoderKL(**vae_config).eval()
    finally:
        torch.set_default_dtype(previous_dtype)

    apply_fast_path(transformer, args)
    return config, transformer, vae


def apply_fast_path(transformer: torch.nn.Module, args: argparse.Namespace) -> None:
    from serve_app.pipeline import quantize_fp8

    if args.fuse_qkv:
        transformer.fuse_qkv_projections()
    if args.fp8:
        quantize_fp8(transformer)
    if args.attention_backend:
        transformer.set_attention_backend(args.attention_backend)
    if args.compile:
        transformer.compile_repeated_blocks(fullgraph=True, mode=args.compile_mode)


def make_inputs(config: dict, case: Case, device: str, dtype: torch.dtype) -> dict:
    latent_side = case.size // 16
    image_tokens = latent_side * latent_side
    generator = torch.Generator(device="cpu").manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)

    image_ids = torch.zeros(latent_side, latent_side, 3)
    image_ids[..., 1] = torch.arange(latent_side)[:, None]
    image_ids[..., 2] = torch.arange(latent_side)[None, :]
    return {
        "hidden_states": randn(case.batch, image_tokens, config["in_channels"]),
        "encoder_hidden_states": randn(case.batch, case.text_tokens, config["joint_attention_dim"]),
        "pooled_projections": randn(case.batch, config["pooled_projection_dim"]),
        "img_ids": image_ids.reshape(image_tokens, 3).to(device=device, dtype=dtype),
        "txt_ids": torch.zeros(case.text_tokens, 3, device=device, dtype=dtype),
        "guidance": torch.full((case.batch,), 3.5, device=device, dtype=torch.float32),
    }


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@torch.inference_mode()
def denoise(transformer, inputs: dict, steps: int) -> torch.Tensor:
    latents = inputs["hidden_states"]
    batch = latents.shape[0]
    for index in range(steps):
        sigma = 1.0 - index / steps
        timestep = torch.full((batch,), sigma, device=latents.device, dtype=latents.dtype)
        velocity = transformer(
            hidden_states=latents,
            encoder_hidden_states=inputs["encoder_hidden_states"],
            pooled_projections=inputs["pooled_projections"],
            timestep=timestep,
            img_ids=inputs["img_ids"],
            txt_ids=inputs["txt_ids"],
            guidance=inputs["guidance"],
            return_dict=False,
        )[0]
        latents = latents - velocity / steps
    return latents


@torch.inference_mode()
def decode(vae, case: Case, device: str, dtype: torch.dtype) -> None:
    latents = torch.randn(case.batch, 16, case.size // 8, case.size // 8, device=device, dtype=dtype)
    vae.decode(latents, return_dict=False)


def timed(function, device: str, repeats: int) -> float:
    """Return the fastest of `repeats` runs, in seconds."""
    best_s = float("inf")
    for _ in range(repeats):
        synchronize(device)
        started_s = time.perf_counter()
        function()
        synchronize(device)
        best_s = min(best_s, time.perf_counter() - started_s)
    return best_s


def run_case(case: Case, config: dict, transformer, vae, args, device: str, dtype: torch.dtype) -> Row:
    inputs = make_inputs(config, case, device, dtype)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()

    # One warm-up step per case: compiles this shape when --compile is on and
    # fills the allocator's cache. One step is enough because every step has the same shapes.
    denoise(transformer, inputs, steps=1)
    decode(vae, case, device, dtype)

    denoise_s = timed(lambda: denoise(transformer, inputs, case.steps), device, args.repeats)
    vae_s = timed(lambda: decode(vae, case, device, dtype), device, args.repeats)

    peak_gb = torch.cuda.max_memory_allocated() / 1e9 if device == "cuda" else 0.0
    flops = transformer_flops(config, case.size, case.text_tokens) * case.steps * case.batch
    return Row(case=case, denoise_s=denoise_s, vae_s=vae_s, peak_gb=peak_gb, tflops=flops / denoise_s / 1e12)


def cases(args: argparse.Namespace) -> list[Case]:
    if args.tiny:
        return [
            Case("schnell", 64, 4, 1, 32),
            Case("dev", 64, 8, 1, 64),
            *(Case("throughput", size, 2, batch, 32) for size in (64, 128) for batch in (1, 2)),
        ]
    return [
        Case("schnell", 1024, 4, 1, 256),
        Case("dev", 1024, 28, 1, 512),
        *(Case("throughput", size, 4, batch, 256) for size in (512, 1024) for batch in (1, 2, 4)),
    ]


def format_table(rows: list[Row], peak: float | None) -> str:
    header = ("case", "size", "steps", "batch", "txt", "denoise s", "vae s", "s/image", "images/s",
              "peak GB", "TFLOP/s", "% peak")
    lines = [header]
    for row in rows:
        share = f"{100 * row.tflops / peak:.1f}" if peak else "n/a"
        lines.append((
            row.case.name, f"{row.case.size}x{row.case.size}", str(row.case.steps), str(row.case.batch),
            str(row.case.text_tokens), f"{row.denoise_s:.3f}", f"{row.vae_s:.3f}", f"{row.seconds_per_image:.3f}",
            f"{row.images_per_s:.2f}", f"{row.peak_gb:.1f}", f"{row.tflops:.4g}", share,
        ))
    widths = [max(len(line[column]) for line in lines) for column in range(len(header))]
    return "\n".join("  ".join(cell.rjust(width) for cell, width in zip(line, widths, strict=True)) for line in lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny config on the CPU in float32 (a smoke test)")
    parser.add_argument("--compile", action="store_true", help="regional torch.compile of the transformer blocks")
    parser.add_argument("--compile-mode", default="default", help="torch.compile mode (default: default)")
    parser.add_argument("--fp8", action="store_true", help="fp8 weights and activations via torchao (sm >= 8.9)")
    parser.add_argument("--fuse-qkv", action="store_true", help="fuse the q, k and v projections")
    parser.add_argument("--attention-backend", default=None, help="diffusers attention backend, e.g. _native_cudnn")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per case; the fastest counts (default: 2)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak in TFLOP/s")
    parser.add_argument("--max-seconds", type=float, default=420.0,
                        help="start no new case after this many seconds (default: 420)")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started_s = time.perf_counter()

    if args.tiny:
        device, dtype = "cpu", torch.float32
    elif torch.cuda.is_available():
        device, dtype = "cuda", torch.bfloat16
    else:
        print("no CUDA device found; run with --tiny for the CPU smoke test", file=sys.stderr)
        return 2

    config, transformer, vae = build_models(args, device, dtype)
    build_s = time.perf_counter() - started_s
    gpu_name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    options = [name for name in ("compile", "fp8", "fuse_qkv") if getattr(args, name)]
    if args.attention_backend:
        options.append(f"attention={args.attention_backend}")
    print(f"device: {gpu_name}; options: {', '.join(options) or 'none'}; model built in {build_s:.1f} s")

    rows = []
    for case in cases(args):
        if time.perf_counter() - started_s > args.max_seconds:
            print(f"skipped {case.name} {case.size}x{case.size} batch {case.batch}: --max-seconds spent")
            continue
        rows.append(run_case(case, config, transformer, vae, args, device, dtype))
        gc.collect()

    print(format_table(rows, peak_tflops(args.peak_tflops)))
    print(f"total {time.perf_counter() - started_s:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
