"""The tiny FLUX model: built in code, saved once, loaded like real weights."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest
import torch
from diffusers import FluxPipeline

from serve_app.tiny import TINY_BUILD_VERSION, ensure_tiny_model, train_clip_tokenizer, train_t5_tokenizer


def file_digests(model_dir: Path) -> dict[str, str]:
    return {
        str(path.relative_to(model_dir)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(model_dir.rglob("*"))
        if path.is_file()
    }


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_tiny_model(tmp_path_factory.mktemp("tiny"), "tiny")


@pytest.fixture(scope="module")
def tiny_pipeline(tiny_dir: Path) -> FluxPipeline:
    pipeline = FluxPipeline.from_pretrained(tiny_dir, dtype=torch.float32)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def test_tiny_model_build_is_deterministic(tiny_dir: Path, tmp_path: Path):
    for attempt in range(3):
        rebuilt = ensure_tiny_model(tmp_path / str(attempt), "tiny")

        assert file_digests(rebuilt) == file_digests(tiny_dir)


def test_tiny_model_saved_where_expected(tiny_dir: Path):
    assert tiny_dir.name == "tiny-flux"
    assert tiny_dir.parent.name == "models"
    assert (tiny_dir / "model_index.json").is_file()
    assert not [path for path in tiny_dir.parent.iterdir() if path.name.startswith(".")]


def test_tiny_model_reused_when_present(tiny_dir: Path):
    before = (tiny_dir / "model_index.json").stat().st_mtime_ns

    assert ensure_tiny_model(tiny_dir.parent.parent, "tiny") == tiny_dir
    assert (tiny_dir / "model_index.json").stat().st_mtime_ns == before


def test_tiny_model_stale_build_replaced(tmp_path: Path):
    model_dir = ensure_tiny_model(tmp_path, "tiny")
    (model_dir / "imagen_tiny.json").write_text(json.dumps({"version": TINY_BUILD_VERSION - 1}))

    rebuilt = ensure_tiny_model(tmp_path, "tiny")

    assert json.loads((rebuilt / "imagen_tiny.json").read_text())["version"] == TINY_BUILD_VERSION
    assert sorted(path.name for path in (tmp_path / "models").iterdir()) == ["tiny-flux"]


def test_tiny_model_rejects_unknown_ref(tmp_path: Path):
    with pytest.raises(ValueError, match="tiny model ref must be one of"):
        ensure_tiny_model(tmp_path, "small")


def test_tiny_model_has_flux_structure(tiny_pipeline: FluxPipeline):
    assert tiny_pipeline.vae_scale_factor == 8
    assert tiny_pipeline.vae.config.latent_channels == 16
    assert len(tiny_pipeline.vae.config.down_block_types) == 4
    assert tiny_pipeline.transformer.config.in_channels == 64
    assert tiny_pipeline.transformer.config.guidance_embeds is False
    assert type(tiny_pipeline.tokenizer).__name__ == "CLIPTokenizer"
    assert type(tiny_pipeline.tokenizer_2).__name__ == "T5Tokenizer"


def test_tiny_dev_model_has_guidance_embedding(tmp_path: Path):
    model_dir = ensure_tiny_model(tmp_path, "tiny-dev")
    config = json.loads((model_dir / "transformer" / "config.json").read_text())

    assert model_dir.name == "tiny-flux-dev"
    assert config["guidance_embeds"] is True


def test_tiny_clip_tokenizer_pads_like_clip():
    tokenizer = train_clip_tokenizer()
    unpadded = tokenizer("a photo of a cat").input_ids
    ids = tokenizer("a photo of a cat", padding="max_length", max_length=77).input_ids

    assert len(ids) == 77
    assert ids[0] == tokenizer.bos_token_id
    assert unpadded[-1] == tokenizer.eos_token_id
    assert ids[: len(unpadded)] == unpadded
    assert tokenizer.unk_token_id not in unpadded[1:-1]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "a photo of a cat"


def test_tiny_t5_tokenizer_uses_t5_special_ids():
    tokenizer = train_t5_tokenizer()
    ids = tokenizer("a photo of a cat").input_ids

    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    assert ids[-1] == tokenizer.eos_token_id
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == "a photo of a cat"


def test_tiny_model_generates_64px_in_milliseconds(tiny_pipeline: FluxPipeline):
    def generate() -> float:
        started_s = time.perf_counter()
        output = tiny_pipeline(
            "a photo of a cat", width=64, height=64, num_inference_steps=4, max_sequence_length=128,
            generator=torch.Generator().manual_seed(0), output_type="np",
        )
        assert output.images.shape == (1, 64, 64, 3)
        return time.perf_counter() - started_s

    generate()
    best_s = min(generate() for _ in range(3))

    # About 15 ms on one core of the development machine; the bound leaves
    # room for a loaded CI runner.
    assert best_s < 0.5
