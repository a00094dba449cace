"""Load the named statements of queries.sql."""

from __future__ import annotations

import re
from functools import cache
from importlib import resources

_NAME_LINE = re.compile(r"^-- name: (?P<name>[a-z_]+)\s*$", re.MULTILINE)


@cache
def queries() -> dict[str, str]:
    """Return every statement of queries.sql by name."""
    text = (resources.files("consumer") / "queries.sql").read_text(encoding="utf-8")
    parts = _NAME_LINE.split(text)
    # parts = [header, name1, body1, name2, body2, ...]
    named = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        lines = body.strip().splitlines()
        # The purpose comment stays in the file: tracing names a statement's span
        # after its first word, which must be SQL.
        while lines and lines[0].lstrip().startswith("--"):
            lines.pop(0)
        named[name] = "\n".join(lines).strip().rstrip(";")
    return named


def query(name: str) -> str:
    """Return the statement called `name`."""
    try:
        return queries()[name]
    except KeyError:
        raise KeyError(f"no query named {name!r} in consumer/queries.sql") from None
