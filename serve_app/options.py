"""Fast-path options of the model server, read from `IMAGEN_*` environment variables.

Every option is off by default, so the default pipeline is plain diffusers
and each speed-up is opted into and measured on its own. `load_pipeline`
applies them; device-dependent checks (a GPU for offload, compute capability
8.9 for fp8) happen there, once the device is known.

| variable                   | values                                  | default |
|----------------------------|-----------------------------------------|---------|
| IMAGEN_COMPILE             | bool: regional torch.compile of the transformer blocks | off |
| IMAGEN_COMPILE_MODE        | default, reduce-overhead, max-autotune, max-autotune-no-cudagraphs | default |
| IMAGEN_FP8                 | bool: fp8 weights and activations via torchao (CUDA, sm >= 8.9) | off |
| IMAGEN_ATTENTION_BACKEND   | a diffusers attention backend name, e.g. native, flash, _native_cudnn | diffusers' default |
| IMAGEN_VAE_TILING          | bool: decode the VAE in overlapping tiles | off |
| IMAGEN_VAE_SLICING         | bool: decode a batch one image at a time | off |
| IMAGEN_CPU_OFFLOAD         | none, model, sequential (CUDA only)     | none |
| IMAGEN_FUSE_QKV            | bool: fuse the q, k and v projections of each attention | off |
| IMAGEN_CHANNELS_LAST       | bool: channels-last memory format for the VAE | off |
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from imagen.errors import SettingsError

OFFLOAD_MODES = ("none", "model", "sequential")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass(frozen=True)
class ServeOptions:
    """Optional speed and memory settings of the FLUX pipeline."""

    compile: bool = False
    compile_mode: str = "default"
    fp8: bool = False
    attention_backend: str | None = None
    vae_tiling: bool = False
    vae_slicing: bool = False
    cpu_offload: str = "none"
    fuse_qkv: bool = False
    channels_last: bool = False

    def __post_init__(self) -> None:
        if self.compile_mode not in COMPILE_MODES:
            raise SettingsError(
                f"IMAGEN_COMPILE_MODE must be one of {', '.join(COMPILE_MODES)}, got {self.compile_mode!r}"
            )
        if self.cpu_offload not in OFFLOAD_MODES:
            raise SettingsError(
                f"IMAGEN_CPU_OFFLOAD must be one of {', '.join(OFFLOAD_MODES)}, got {self.cpu_offload!r}"
            )
        if self.attention_backend is not None:
            _check_attention_backend(self.attention_backend)

        # Sequential offload moves each weight to the GPU inside its module's
        # forward hook, which graph capture and torchao's tensor subclasses do
        # not follow.
        if self.cpu_offload == "sequential" and self.compile:
            raise SettingsError(
                "IMAGEN_CPU_OFFLOAD=sequential cannot be combined with IMAGEN_COMPILE; "
                "use IMAGEN_CPU_OFFLOAD=model or turn compilation off"
            )
        if self.cpu_offload == "sequential" and self.fp8:
            raise SettingsError(
                "IMAGEN_CPU_OFFLOAD=sequential cannot be combined with IMAGEN_FP8; "
                "use IMAGEN_CPU_OFFLOAD=model or turn fp8 off"
            )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ServeOptions:
        """Build options from `IMAGEN_*` variables, ignoring empty values."""
        source = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for item in fields(cls):
            env_name = f"IMAGEN_{item.name.upper()}"
            raw = source.get(env_name, "").strip()
            if raw == "":
                continue
            if item.type == "bool":
                values[item.name] = _parse_bool(env_name, raw)
            else:
                values[item.name] = raw.lower()
        return cls(**values)

    def enabled(self) -> dict[str, Any]:
        """Return the options that differ from their defaults, for logs and benchmark tables."""
        defaults = ServeOptions()
        return {
            item.name: getattr(self, item.name)
            for item in fields(self)
            if getattr(self, item.name) != getattr(defaults, item.name)
        }


def _parse_bool(env_name: str, raw: str) -> bool:
    lowered = raw.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise SettingsError(f"{env_name} must be one of 1/0, true/false, yes/no, on/off, got {raw!r}")


def _check_attention_backend(name: str) -> None:
    # diffusers lists its backends in AttentionBackendName (diffusers 0.42).
    from diffusers.models.attention_dispatch import AttentionBackendName

    known = sorted(member.value for member in AttentionBackendName)
    if name not in known:
        raise SettingsError(f"IMAGEN_ATTENTION_BACKEND must be one of {', '.join(known)}, got {name!r}")
