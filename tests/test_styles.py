"""Prompt styles: built-ins, the IMAGEN_STYLES_FILE override file and its validation."""

from __future__ import annotations

from pathlib import Path

import pytest

from consumer.styles import BUILTIN_STYLES, PromptStyles, apply_style
from imagen.errors import InvalidJobError, SettingsError


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "styles.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_builtin_styles_wrap_prompt() -> None:
    styles = PromptStyles.load()

    for name in ("photo", "watercolor", "anime", "cinematic", "sketch"):
        styled = styles.apply(name, "a red fox")
        assert "a red fox" in styled
        assert styled != "a red fox"
        assert "{prompt}" not in styled


def test_none_style_keeps_prompt() -> None:
    styles = PromptStyles.load()

    assert styles.apply("none", "a red fox") == "a red fox"
    assert styles.apply(None, "a red fox") == "a red fox"
    assert styles.apply("", "  a red fox ") == "a red fox"


def test_style_name_is_case_insensitive() -> None:
    assert PromptStyles.load().apply(" Photo ", "x") == PromptStyles.load().apply("photo", "x")


def test_unknown_style_lists_known() -> None:
    with pytest.raises(InvalidJobError) as caught:
        PromptStyles.load().apply("vaporwave", "x")

    assert "'vaporwave'" in str(caught.value)
    for name in BUILTIN_STYLES:
        assert name in str(caught.value)
    assert caught.value.transient is False


def test_braces_in_prompt_pass_through() -> None:
    assert PromptStyles.load().apply("none", "a {curly} {prompt} sign") == "a {curly} {prompt} sign"


def test_file_adds_and_overrides(tmp_path: Path) -> None:
    path = _write(tmp_path, '[styles]\nnoir = "film noir still of {prompt}"\nphoto = "{prompt}, 35mm"\n')

    styles = PromptStyles.load(path)

    assert styles.apply("noir", "a cat") == "film noir still of a cat"
    assert styles.apply("photo", "a cat") == "a cat, 35mm"
    assert styles.apply("sketch", "a cat") == BUILTIN_STYLES["sketch"].replace("{prompt}", "a cat")


def test_file_template_without_placeholder(tmp_path: Path) -> None:
    path = _write(tmp_path, '[styles]\nbroken = "just a fixed string"\n')

    with pytest.raises(SettingsError) as caught:
        PromptStyles.load(path)

    assert str(path) in str(caught.value)
    assert "'broken'" in str(caught.value)
    assert "{prompt}" in str(caught.value)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[styles\n", "not valid TOML"),
        ('noir = "x {prompt}"\n', "no [styles] table"),
        ("[styles]\nnoir = 3\n", "must be a string"),
        ('[styles]\n"bad name!" = "{prompt}"\n', "name 'bad name!' is invalid"),
    ],
)
def test_file_errors_name_file(tmp_path: Path, text: str, expected: str) -> None:
    path = _write(tmp_path, text)

    with pytest.raises(SettingsError) as caught:
        PromptStyles.load(path)

    assert expected in str(caught.value)
    assert str(path) in str(caught.value)


def test_missing_file_names_env(tmp_path: Path) -> None:
    with pytest.raises(SettingsError) as caught:
        PromptStyles.from_env({"IMAGEN_STYLES_FILE": str(tmp_path / "nope.toml")})

    assert "IMAGEN_STYLES_FILE" in str(caught.value)
    assert "nope.toml" in str(caught.value)


def test_from_env_reads_file(tmp_path: Path) -> None:
    path = _write(tmp_path, '[styles]\nnoir = "noir {prompt}"\n')

    styles = PromptStyles.from_env({"IMAGEN_STYLES_FILE": str(path)})

    assert "noir" in styles.names
    assert PromptStyles.from_env({}).names == sorted(BUILTIN_STYLES)


def test_apply_style_with_explicit_styles(tmp_path: Path) -> None:
    styles = PromptStyles.load(_write(tmp_path, '[styles]\nnoir = "noir {prompt}"\n'))

    assert apply_style("noir", "x", styles) == "noir x"
    assert apply_style("none", "x", styles) == "x"
