"""Cost estimates from the built-in price table and IMAGEN_PRICES_FILE overrides."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from consumer.backends.replicate import REPLICATE_MODELS
from consumer.pricing import BUILTIN_PRICES, Price, PriceTable
from imagen.errors import SettingsError


def test_builtin_table_prices_every_replicate_backend() -> None:
    for name in REPLICATE_MODELS:
        assert name in BUILTIN_PRICES


def test_estimate_per_image() -> None:
    table = PriceTable.load()

    assert table.estimate_cost_usd("flux-schnell-replicate", predict_time_s=1.2, gpu_s=None) == pytest.approx(0.003)
    assert table.estimate_cost_usd("flux-dev-replicate", None, None, images=4) == pytest.approx(0.1)


def test_estimate_local_gpu_seconds() -> None:
    table = PriceTable.load()

    assert table.estimate_cost_usd("flux-schnell-local", predict_time_s=None, gpu_s=10.0) == pytest.approx(0.007)
    assert table.estimate_cost_usd("flux-schnell-local", predict_time_s=None, gpu_s=None) is None


def test_estimate_mock_is_free() -> None:
    assert PriceTable.load().estimate_cost_usd("mock", None, 3.0) == 0.0


def test_estimate_unknown_backend_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="consumer.pricing")
    table = PriceTable.load()

    assert table.estimate_cost_usd("flux-ultra", 1.0, 1.0) is None
    assert table.estimate_cost_usd("flux-ultra", 1.0, 1.0) is None

    warnings = [r for r in caplog.records if getattr(r, "event", None) == "price_missing"]
    assert len(warnings) == 1


def test_price_per_predict_second_needs_time() -> None:
    price = Price(usd_per_predict_s=0.001525)

    assert price.estimate(predict_time_s=2.0, gpu_s=None, images=1) == pytest.approx(0.00305)
    assert price.estimate(predict_time_s=None, gpu_s=None, images=1) is None


def test_estimate_rejects_negative_images() -> None:
    with pytest.raises(ValueError):
        PriceTable.load().estimate_cost_usd("mock", None, None, images=-1)


def test_toml_file_overrides_entry(tmp_path: Path) -> None:
    path = tmp_path / "prices.toml"
    path.write_text(
        "[prices.flux-dev-replicate]\nusd_per_predict_s = 0.001\n\n[prices.my-model]\nusd_per_image = 0.5\n",
        encoding="utf-8",
    )

    table = PriceTable.from_env({"IMAGEN_PRICES_FILE": str(path)})

    assert table.price("flux-dev-replicate") == Price(usd_per_predict_s=0.001)
    assert table.estimate_cost_usd("flux-dev-replicate", 3.0, None) == pytest.approx(0.003)
    assert table.estimate_cost_usd("my-model", None, None, images=2) == pytest.approx(1.0)
    assert table.estimate_cost_usd("flux-schnell-replicate", None, None) == pytest.approx(0.003)


def test_json_file_overrides_entry(tmp_path: Path) -> None:
    path = tmp_path / "prices.json"
    path.write_text(json.dumps({"prices": {"flux-schnell-local": {"usd_per_gpu_s": 0.0002}}}), encoding="utf-8")

    table = PriceTable.load(path)

    assert table.estimate_cost_usd("flux-schnell-local", None, 10.0) == pytest.approx(0.002)


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        ("p.toml", "[prices.flux-schnell-local]\nusd_per_gpu_s = -1\n", "finite number >= 0"),
        ("p.toml", "[prices.flux-schnell-local]\nusd_per_gpu_hour = 1\n", "unknown key(s) usd_per_gpu_hour"),
        ("p.toml", '[prices.flux-schnell-local]\nusd_per_gpu_s = "cheap"\n', "must be a number"),
        ("p.toml", "[prices]\nflux-schnell-local = 3\n", "must be a table"),
        ("p.toml", "[other]\n", "no prices table"),
        ("p.toml", "[prices\n", "not valid TOML"),
        ("p.json", "{not json", "not valid JSON"),
        ("p.json", "[]", "must contain a JSON object"),
    ],
)
def test_file_errors_name_file(tmp_path: Path, name: str, text: str, expected: str) -> None:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")

    with pytest.raises(SettingsError) as caught:
        PriceTable.load(path)

    assert expected in str(caught.value)
    assert str(path) in str(caught.value)


def test_missing_file_names_env(tmp_path: Path) -> None:
    with pytest.raises(SettingsError) as caught:
        PriceTable.from_env({"IMAGEN_PRICES_FILE": str(tmp_path / "none.toml")})

    assert "IMAGEN_PRICES_FILE" in str(caught.value)
