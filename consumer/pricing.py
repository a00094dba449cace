"""Cost estimates per generated image, from a configurable price table.

A price has up to three parts, summed: `usd_per_image`, `usd_per_predict_s`
(seconds of hosted prediction time, Replicate's `metrics.predict_time`) and
`usd_per_gpu_s` (seconds of local GPU time). The built-in table can be
overridden per backend by a TOML or JSON file named in `IMAGEN_PRICES_FILE`:

    [prices.flux-dev-replicate]
    usd_per_image = 0.025

    [prices.flux-schnell-local]
    usd_per_gpu_s = 0.0004

A backend listed in the file replaces its built-in entry as a whole.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import tomllib

from imagen.errors import SettingsError

logger = logging.getLogger(__name__)

PRICES_FILE_ENV = "IMAGEN_PRICES_FILE"


@dataclass(frozen=True)
class Price:
    """Price of one backend, in US dollars."""

    usd_per_image: float = 0.0
    usd_per_predict_s: float = 0.0
    usd_per_gpu_s: float = 0.0

    def estimate(self, *, predict_time_s: float | None, gpu_s: float | None, images: int) -> float | None:
        """Return the cost of `images` images, or None when a time this price needs is unknown."""
        if self.usd_per_predict_s and predict_time_s is None:
            return None
        if self.usd_per_gpu_s and gpu_s is None:
            return None
        cost = self.usd_per_image * images
        cost += self.usd_per_predict_s * (predict_time_s or 0.0)
        cost += self.usd_per_gpu_s * (gpu_s or 0.0)
        return cost


# NOTE: the Replicate prices are per-image prices for 1-megapixel images as listed
# by third-party price comparisons (workflowlab.dev, tokenmix.ai, 2026). Replicate
# changes them without notice, so check them before billing anyone.
# The local price is an estimate: one rented H100 at about $2.50 per hour.
BUILTIN_PRICES: Mapping[str, Price] = MappingProxyType({
    "flux-schnell-replicate": Price(usd_per_image=0.003),
    "flux-dev-replicate": Price(usd_per_image=0.025),
    "flux-pro-replicate": Price(usd_per_image=0.055),
    "flux-schnell-local": Price(usd_per_gpu_s=0.0007),
    "mock": Price(),
})

_PRICE_FIELDS = ("usd_per_image", "usd_per_predict_s", "usd_per_gpu_s")


class PriceTable:
    """Prices by backend name."""

    def __init__(self, prices: Mapping[str, Price]) -> None:
        self._prices: Mapping[str, Price] = MappingProxyType(dict(prices))
        self._warned_backends: set[str] = set()

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> PriceTable:
        """Build the built-in prices, overridden by the file named in IMAGEN_PRICES_FILE, if set."""
        env = os.environ if environ is None else environ
        path = env.get(PRICES_FILE_ENV, "").strip()
        return cls.load(Path(path).expanduser() if path else None)

    @classmethod
    def load(cls, path: Path | None = None) -> PriceTable:
        """Build the built-in prices, with the entries of the file at `path` replacing them."""
        prices = dict(BUILTIN_PRICES)
        if path is not None:
            file_prices = read_prices_file(path)
            prices.update(file_prices)
            logger.info(
                "loaded price table file",
                extra={"event": "prices_file_loaded", "path": str(path), "backends": sorted(file_prices)},
            )
        return cls(prices)

    def price(self, backend: str) -> Price | None:
        return self._prices.get(backend)

    def estimate_cost_usd(
        self, backend: str, predict_time_s: float | None, gpu_s: float | None, images: int = 1
    ) -> float | None:
        """Estimate what `images` images from `backend` cost, or None when the price or a time is unknown."""
        if images < 0:
            raise ValueError(f"images must be >= 0, got {images}")
        price = self._prices.get(backend)
        if price is None:
            if backend not in self._warned_backends:
                self._warned_backends.add(backend)
                logger.warning(
                    "no price for backend, cost left unknown",
                    extra={"event": "price_missing", "backend": backend},
                )
            return None
        return price.estimate(predict_time_s=predict_time_s, gpu_s=gpu_s, images=images)


def read_prices_file(path: Path) -> dict[str, Price]:
    """Read the `prices` table of a TOML (or `.json`) file, raising SettingsError that names the file."""
    document = _read_document(path)
    table = document.get("prices")
    if not isinstance(table, dict):
        raise SettingsError(
            f"{PRICES_FILE_ENV} file {path} has no prices table: write [prices.<backend>] "
            "sections (TOML) or a \"prices\" object (JSON)"
        )
    return {backend: _parse_price(path, backend, entry) for backend, entry in table.items()}


def _read_document(path: Path) -> dict[str, Any]:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise SettingsError(
            f"{PRICES_FILE_ENV} names {path}, which does not exist: fix the path or unset it"
        ) from None
    except OSError as exc:
        raise SettingsError(f"{PRICES_FILE_ENV} file {path} could not be read: {exc.strerror}") from None

    if path.suffix.lower() == ".json":
        try:
            document = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise SettingsError(f"{PRICES_FILE_ENV} file {path} is not valid JSON: {exc}") from None
        if not isinstance(document, dict):
            raise SettingsError(f"{PRICES_FILE_ENV} file {path} must contain a JSON object")
        return document

    try:
        return tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise SettingsError(f"{PRICES_FILE_ENV} file {path} is not valid TOML: {exc}") from None


def _parse_price(path: Path, backend: str, entry: object) -> Price:
    if not isinstance(entry, dict):
        raise SettingsError(
            f"{PRICES_FILE_ENV} file {path}: prices.{backend} must be a table of "
            f"{', '.join(_PRICE_FIELDS)}"
        )
    unknown = sorted(set(entry) - set(_PRICE_FIELDS))
    if unknown:
        raise SettingsError(
            f"{PRICES_FILE_ENV} file {path}: prices.{backend} has unknown key(s) {', '.join(unknown)}: "
            f"use {', '.join(_PRICE_FIELDS)}"
        )
    values: dict[str, float] = {}
    for name, value in entry.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SettingsError(
                f"{PRICES_FILE_ENV} file {path}: prices.{backend}.{name} must be a number, got {value!r}"
            )
        if not math.isfinite(value) or value < 0:
            raise SettingsError(
                f"{PRICES_FILE_ENV} file {path}: prices.{backend}.{name} must be a finite number >= 0, "
                f"got {value!r}"
            )
        values[name] = float(value)
    return Price(**values)


_default_table: PriceTable | None = None


def default_price_table() -> PriceTable:
    """Return the price table from the environment, loaded on first use and kept for the process."""
    global _default_table
    if _default_table is None:
        _default_table = PriceTable.from_env()
    return _default_table


def estimate_cost_usd(
    backend: str, predict_time_s: float | None, gpu_s: float | None, images: int = 1
) -> float | None:
    """Estimate the cost of `images` images from `backend` with the default price table."""
    return default_price_table().estimate_cost_usd(backend, predict_time_s, gpu_s, images)
