"""slugify and object_key: every key is a safe Storage path, whatever the prompt."""

from __future__ import annotations

import re
from datetime import date

from hypothesis import given
from hypothesis import strategies as st

from consumer.storage.base import SLUG_FALLBACK, SLUG_MAX_CHARS, object_key, slugify

SAFE_KEY = re.compile(r"^\d{4}-\d{2}-\d{2}/[a-z0-9-]+-\d+(-[a-z0-9]+)?\.png$")
# Date (10) + "/" + slug + "-" + a 20-digit seed + "-" + a suffix of up to 32 characters + ".png".
MAX_KEY_CHARS = 10 + 1 + SLUG_MAX_CHARS + 1 + 20 + 1 + 32 + 4

DAY = date(2025, 3, 9)


def test_slugify_latin_with_accents() -> None:
    assert slugify("Crème brûlée à Paris") == "creme-brulee-a-paris"


def test_slugify_drops_non_latin_scripts() -> None:
    assert slugify("東京の夜景 Tokyo night") == "tokyo-night"
    assert slugify("Москва") == SLUG_FALLBACK
    assert slugify("القاهرة") == SLUG_FALLBACK


def test_slugify_drops_emoji_and_punctuation() -> None:
    assert slugify("🦊 fox!!! in, the... snow?") == "fox-in-the-snow"


def test_slugify_path_tricks() -> None:
    assert slugify("../../etc/passwd") == "etc-passwd"
    assert slugify("..\\..\\windows") == "windows"
    assert slugify("a/b/../c") == "a-b-c"


def test_slugify_empty_falls_back() -> None:
    assert slugify("") == SLUG_FALLBACK
    assert slugify("   ") == SLUG_FALLBACK
    assert slugify("!!! ???") == SLUG_FALLBACK


def test_slugify_long_prompt_is_cut_at_word() -> None:
    slug = slugify("word " * 200)

    assert len(slug) <= SLUG_MAX_CHARS
    assert not slug.endswith("-")
    assert set(slug.split("-")) == {"word"}


def test_slugify_single_long_word_is_truncated() -> None:
    assert slugify("a" * 500) == "a" * SLUG_MAX_CHARS


def test_object_key_layout() -> None:
    assert object_key("A red fox", 42, DAY) == "2025-03-09/a-red-fox-42.png"
    assert object_key("A red fox", 42, DAY, suffix="2") == "2025-03-09/a-red-fox-42-2.png"


@given(
    prompt=st.text(max_size=3000),
    seed=st.integers(min_value=0, max_value=2**64 - 1),
    day=st.dates(min_value=date(1000, 1, 1), max_value=date(9999, 12, 31)),
    suffix=st.none() | st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=32),
)
def test_object_key_always_safe(prompt: str, seed: int, day: date, suffix: str | None) -> None:
    key = object_key(prompt, seed, day, suffix)

    assert SAFE_KEY.match(key), key
    assert len(key) <= MAX_KEY_CHARS
    assert ".." not in key
    assert key.count("/") == 1


@given(prompt=st.text(max_size=3000))
def test_slugify_always_safe(prompt: str) -> None:
    slug = slugify(prompt)

    assert re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", slug), slug
    assert 1 <= len(slug) <= SLUG_MAX_CHARS
