"""Print the dependencies of a pyproject.toml, one requirement per line.

The image build installs these before it copies the source, so a change to
the code reuses the cached dependency layer and only a change to
pyproject.toml downloads them again.

Usage: python3 pyproject_requirements.py PYPROJECT [EXTRA ...]
"""

from __future__ import annotations

import sys

import tomllib


def requirements(pyproject: dict, extras: list[str]) -> list[str]:
    """Return the project's dependencies plus those of each named extra."""
    project = pyproject["project"]
    lines = list(project.get("dependencies", []))
    optional = project.get("optional-dependencies", {})
    for extra in extras:
        if extra not in optional:
            known = ", ".join(sorted(optional)) or "none"
            raise SystemExit(f"extra {extra!r} is not defined in pyproject.toml; defined extras: {known}")
        lines.extend(optional[extra])
    return lines


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        return 64
    with open(argv[1], "rb") as file:
        pyproject = tomllib.load(file)
    print("\n".join(requirements(pyproject, argv[2:])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
