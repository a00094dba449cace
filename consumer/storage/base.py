"""The image store interface, and the object key format."""

from __future__ import annotations

import re
import unicodedata
from datetime import date
from typing import Protocol

SLUG_FALLBACK = "image"
SLUG_MAX_CHARS = 60


class ObjectStore(Protocol):
    """A place PNGs are written to, addressed by bucket and key.

    `put` overwrites an existing object with the same key, so a retried job
    that regenerates the same image leaves one object behind.
    """

    kind: str
    bucket: str

    async def check_writable(self) -> None: ...

    async def put(self, key: str, data: bytes, content_type: str) -> None: ...

    async def delete(self, key: str) -> None: ...

    async def close(self) -> None: ...


def slugify(prompt: str) -> str:
    """Turn a prompt into lowercase ASCII words joined by dashes, or the fallback word.

    Accents are stripped (é → e); scripts without an ASCII form, emoji,
    punctuation, dots and slashes are dropped, so the slug can never climb out
    of its folder or form an invalid Storage key.
    """
    ascii_text = unicodedata.normalize("NFKD", prompt).encode("ascii", "ignore").decode("ascii")
    words = re.findall(r"[a-z0-9]+", ascii_text.lower())
    slug = ""
    for word in words:
        candidate = f"{slug}-{word}" if slug else word
        if len(candidate) > SLUG_MAX_CHARS:
            break
        slug = candidate
    if not slug and words:
        slug = words[0][:SLUG_MAX_CHARS]
    return slug or SLUG_FALLBACK


def object_key(prompt: str, seed: int, day: date, suffix: str | None = None) -> str:
    """Build `<YYYY-MM-DD>/<slug>-<seed>.png`, with `-<suffix>` before `.png` when given."""
    name = f"{slugify(prompt)}-{seed}"
    if suffix:
        name = f"{name}-{suffix}"
    return f"{day.isoformat()}/{name}.png"
