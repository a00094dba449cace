"""The `tiny` model: a FLUX pipeline with random weights, built in code.

It has the structure of FLUX.1: a `FluxTransformer2DModel`, a 16-channel
`AutoencoderKL` with four down blocks (so the VAE scale factor is 8), a CLIP
text model and a T5 encoder. Its size lets one CPU core make a 64x64 image
with 4 steps in tens of milliseconds. Nothing is downloaded: the tokenizers are trained
on `_CORPUS` with the `tokenizers` library and every weight comes from a seeded
random initialisation, so two builds produce the same files.

The model is saved with `save_pretrained` and loaded through
`FluxPipeline.from_pretrained`, the same path real weights take.

Two variants exist: `tiny` has no guidance embedding, like FLUX.1-schnell, and
`tiny-dev` has one, like FLUX.1-dev.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from diffusers import FluxPipeline
    from transformers import CLIPTokenizer, T5Tokenizer

logger = logging.getLogger(__name__)

# Model ref -> whether the transformer has a guidance embedding.
TINY_MODELS = {"tiny": False, "tiny-dev": True}

# Bump when the architecture, corpus or seeds change, so that a model saved by
# an older build is rebuilt instead of loaded.
TINY_BUILD_VERSION = 3

_BUILD_MARKER = "imagen_tiny.json"

_SEED = 20240601

# CLIP pads and truncates to this many tokens, as the real CLIP text model does.
_CLIP_MAX_LENGTH = 77

_CLIP_MAX_MERGES = 300

# The T5 encoder of the tiny model accepts this many tokens per prompt.
TINY_MAX_SEQUENCE_LENGTH = 128

_CORPUS = (
    "a photo of a cat sitting on a red chair",
    "an astronaut riding a horse on the moon, digital art",
    "a watercolor painting of mountains at sunset",
    "a close-up portrait of an old fisherman with a grey beard",
    "a futuristic city skyline at night with neon lights",
    "a bowl of fresh fruit on a wooden table, studio lighting",
    "a small boat on a calm lake in the early morning fog",
    "an oil painting of a lighthouse during a storm",
    "a cozy cabin in a snowy forest, warm light in the windows",
    "a robot reading a book in a quiet library",
    "a field of sunflowers under a bright blue sky",
    "a dragon flying over a medieval castle, fantasy illustration",
    "a cup of coffee with latte art, shallow depth of field",
    "a street market in the rain, people with umbrellas",
    "the quick brown fox jumps over the lazy dog 0123456789",
    "THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG!",
    "punctuation: commas, periods. (brackets) [square] {curly} 'quotes' \"double\" - _ + = * & % $ # @ ? / \\ | ~ ^ < > ;",
    "black and white photograph of a train station in 1920",
    "a pixel art scene of a forest with a waterfall",
    "a macro shot of a dew drop on a green leaf",
    "a sketch of a running dog, pencil on paper",
    "an aerial view of a river delta, satellite image",
)


def is_tiny_model(model_ref: str) -> bool:
    return model_ref in TINY_MODELS


def ensure_tiny_model(data_dir: Path, model_ref: str = "tiny") -> Path:
    """Return the directory of the saved tiny model, building it on first use.

    The model is built in a temporary directory next to the target and renamed
    into place, so a reader never sees a half-written model and two processes
    that build at once both end with one complete copy.
    """
    if not is_tiny_model(model_ref):
        raise ValueError(f"tiny model ref must be one of {sorted(TINY_MODELS)}, got {model_ref!r}")

    models_dir = Path(data_dir) / "models"
    target = models_dir / ("tiny-flux" if model_ref == "tiny" else "tiny-flux-dev")
    if _build_version(target) == TINY_BUILD_VERSION:
        return target

    models_dir.mkdir(parents=True, exist_ok=True)
    logger.info("building tiny model", extra={"event": "tiny_model_build_started", "path": str(target)})

    build_dir = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=models_dir))
    try:
        pipeline = build_tiny_pipeline(guidance_embeds=TINY_MODELS[model_ref])
        pipeline.save_pretrained(build_dir, safe_serialization=True)
        (build_dir / _BUILD_MARKER).write_text(json.dumps({"version": TINY_BUILD_VERSION, "model": model_ref}))
        _move_into_place(build_dir, target)
    finally:
        shutil.rmtree(build_dir, ignore_errors=True)

    logger.info("built tiny model", extra={"event": "tiny_model_build_finished", "path": str(target)})
    return target


def _build_version(model_dir: Path) -> int | None:
    try:
        return int(json.loads((model_dir / _BUILD_MARKER).read_text())["version"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _move_into_place(build_dir: Path, target: Path) -> None:
    # A stale build (older version) is renamed aside first, because rename()
    # does not replace a non-empty directory.
    if target.exists() and _build_version(target) != TINY_BUILD_VERSION:
        stale = target.with_name(f".{target.name}-stale-{os.getpid()}")
        os.rename(target, stale)
        shutil.rmtree(stale, ignore_errors=True)

    try:
        os.rename(build_dir, target)
    except OSError:
        # Another process renamed its build into place between our check and
        # our rename. Its copy is identical, so ours is dropped.
        if _build_version(target) != TINY_BUILD_VERSION:
            raise


def build_tiny_pipeline(*, guidance_embeds: bool = False) -> FluxPipeline:
    """Build the tiny FluxPipeline in memory with seeded random weights (float32, CPU)."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    clip_tokenizer = train_clip_tokenizer()
    t5_tokenizer = train_t5_tokenizer()

    # fork_rng keeps the caller's global RNG state untouched by the seeding below.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_SEED)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(clip_tokenizer),
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=_CLIP_MAX_LENGTH,
                projection_dim=32,
                hidden_act="quick_gelu",
                bos_token_id=clip_tokenizer.bos_token_id,
                eos_token_id=clip_tokenizer.eos_token_id,
                pad_token_id=clip_tokenizer.pad_token_id,
            )
        )

        torch.manual_seed(_SEED + 1)
        text_encoder_2 = T5EncoderModel(
            T5Config(
                vocab_size=len(t5_tokenizer),
                d_model=32,
                d_kv=8,
                d_ff=64,
                num_layers=2,
                num_heads=4,
                relative_attention_num_buckets=8,
                feed_forward_proj="gated-gelu",
                pad_token_id=t5_tokenizer.pad_token_id,
                eos_token_id=t5_tokenizer.eos_token_id,
                decoder_start_token_id=t5_tokenizer.pad_token_id,
            )
        )

        torch.manual_seed(_SEED + 2)
        # Packed latents have 16 channels x 2x2 patches = 64 input channels, as in
        # FLUX.1. The rotary axes must add up to attention_head_dim.
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=64,
            num_layers=1,
            num_single_layers=2,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,
            pooled_projection_dim=32,
            guidance_embeds=guidance_embeds,
            axes_dims_rope=(4, 6, 6),
        )

        torch.manual_seed(_SEED + 3)
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 8, 16, 16),
            layers_per_block=1,
            latent_channels=16,
            norm_num_groups=4,
            sample_size=64,
            scaling_factor=0.3611,
            shift_factor=0.1159,
            use_quant_conv=False,
            use_post_quant_conv=False,
        )

    # FLUX.1-schnell uses a fixed shift of 1, FLUX.1-dev a resolution-dependent one.
    if guidance_embeds:
        scheduler = FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
            base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096,
        )
    else:
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)

    return FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder.eval(),
        tokenizer=clip_tokenizer,
        text_encoder_2=text_encoder_2.eval(),
        tokenizer_2=t5_tokenizer,
        transformer=transformer.eval(),
    )


def train_clip_tokenizer() -> CLIPTokenizer:
    """Train a byte-level BPE on `_CORPUS`, with CLIP's normaliser, splitting and special tokens.

    The `tokenizers` library normalises and splits the corpus exactly as
    transformers' CLIPTokenizer does at run time. The merges are learned by
    `_learn_bpe_merges` rather than by `tokenizers.trainers.BpeTrainer`,
    because BpeTrainer (tokenizers 0.23) orders merges of equal count
    differently from run to run, and the saved model must be identical every build.
    """
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers
    from transformers import CLIPTokenizer

    backend = Tokenizer(models.BPE())
    backend.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    word_pattern = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(word_pattern), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )

    word_counts: Counter[tuple[str, ...]] = Counter()
    for line in _CORPUS:
        normalized = backend.normalizer.normalize_str(line)
        for word, _ in backend.pre_tokenizer.pre_tokenize_str(normalized):
            # CLIP marks the last symbol of each word with "</w>".
            word_counts[(*word[:-1], word[-1] + "</w>")] += 1

    merges = _learn_bpe_merges(word_counts, max_merges=_CLIP_MAX_MERGES)

    # Vocabulary order follows CLIP's: byte symbols, the same with "</w>",
    # merged symbols in merge order, then the special tokens.
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    symbols = alphabet + [symbol + "</w>" for symbol in alphabet] + ["".join(pair) for pair in merges]
    symbols += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {symbol: token_id for token_id, symbol in enumerate(dict.fromkeys(symbols))}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=_CLIP_MAX_LENGTH)


def _learn_bpe_merges(word_counts: Counter[tuple[str, ...]], *, max_merges: int) -> list[tuple[str, str]]:
    """Learn BPE merges: repeatedly merge the most frequent adjacent pair, ties broken by the pair itself."""
    words = dict(word_counts)
    merges: list[tuple[str, str]] = []
    while len(merges) < max_merges:
        pair_counts: Counter[tuple[str, str]] = Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:], strict=False):
                pair_counts[pair] += count
        if not pair_counts:
            break

        best = min(pair_counts, key=lambda pair: (-pair_counts[pair], pair))
        if pair_counts[best] < 2:
            break
        merges.append(best)
        words = {_merge_pair(word, best): count for word, count in words.items()}
    return merges


def _merge_pair(word: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    merged: list[str] = []
    position = 0
    while position < len(word):
        if position + 1 < len(word) and (word[position], word[position + 1]) == pair:
            merged.append(word[position] + word[position + 1])
            position += 2
        else:
            merged.append(word[position])
            position += 1
    return tuple(merged)


def train_t5_tokenizer() -> T5Tokenizer:
    """Train a Unigram model on `_CORPUS` with T5's special tokens (pad=0, eos=1, unk=2)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import T5Tokenizer

    backend = Tokenizer(models.Unigram())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")]
    )
    # T5Tokenizer hard-codes unk_id=2, so the special tokens must come first in this order.
    trainer = trainers.UnigramTrainer(
        vocab_size=256,
        special_tokens=["<pad>", "</s>", "<unk>"],
        unk_token="<unk>",
        show_progress=False,
    )
    backend.train_from_iterator(_CORPUS, trainer)

    # UnigramTrainer's scores vary in the last bits from run to run and so does
    # the order of equal scores, so both are made canonical: scores rounded,
    # then sorted by score and token after the three special tokens.
    trained = json.loads(backend.to_str())["model"]["vocab"]
    special, pieces = trained[:3], trained[3:]
    pieces = sorted(((token, round(float(score), 4)) for token, score in pieces), key=lambda item: (-item[1], item[0]))
    vocab = [(token, 0.0) for token, _ in special] + pieces
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=TINY_MAX_SEQUENCE_LENGTH)
