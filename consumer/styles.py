"""Prompt styles: named templates that wrap a job's prompt before generation.

A template contains `{prompt}` where the job's prompt goes, e.g.
`"watercolor painting of {prompt}, soft washes"`. The built-in styles below can
be extended or overridden by a TOML file named in `IMAGEN_STYLES_FILE`:

    [styles]
    noir = "black-and-white film noir still of {prompt}, hard shadows"
    photo = "{prompt}, 35mm photograph, golden hour"

Only the literal `{prompt}` is replaced, so other braces in a template or in a
prompt pass through unchanged.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

import tomllib

from imagen.errors import InvalidJobError, SettingsError

logger = logging.getLogger(__name__)

STYLES_FILE_ENV = "IMAGEN_STYLES_FILE"
PROMPT_PLACEHOLDER = "{prompt}"
DEFAULT_STYLE = "none"

_STYLE_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,39}$")

BUILTIN_STYLES: Mapping[str, str] = MappingProxyType({
    "none": "{prompt}",
    "photo": "{prompt}, professional photograph, natural light, sharp focus, fine detail",
    "watercolor": "watercolor painting of {prompt}, soft washes of color, visible paper texture",
    "anime": "anime illustration of {prompt}, clean line art, cel shading, vivid colors",
    "cinematic": "cinematic film still of {prompt}, dramatic lighting, shallow depth of field, film grain",
    "sketch": "pencil sketch of {prompt}, graphite on white paper, loose cross-hatching",
})


class PromptStyles:
    """An immutable set of named prompt templates."""

    def __init__(self, templates: Mapping[str, str]) -> None:
        self._templates: Mapping[str, str] = MappingProxyType(dict(templates))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> PromptStyles:
        """Build the built-in styles plus the file named in IMAGEN_STYLES_FILE, if set."""
        env = os.environ if environ is None else environ
        path = env.get(STYLES_FILE_ENV, "").strip()
        return cls.load(Path(path).expanduser() if path else None)

    @classmethod
    def load(cls, path: Path | None = None) -> PromptStyles:
        """Build the built-in styles, with the styles of the TOML file at `path` added on top."""
        templates = dict(BUILTIN_STYLES)
        if path is not None:
            file_templates = read_styles_file(path)
            overridden = sorted(set(file_templates) & set(BUILTIN_STYLES))
            templates.update(file_templates)
            logger.info(
                "loaded prompt styles file",
                extra={"event": "styles_file_loaded", "path": str(path),
                       "styles": sorted(file_templates), "overridden": overridden},
            )
        return cls(templates)

    @property
    def names(self) -> list[str]:
        return sorted(self._templates)

    def template(self, name: str | None) -> str:
        """Return the template of style `name`, where None or an empty name means `none`."""
        key = (name or DEFAULT_STYLE).strip().lower() or DEFAULT_STYLE
        template = self._templates.get(key)
        if template is None:
            raise InvalidJobError(
                f"style {name!r} is unknown: use one of {', '.join(self.names)}"
            )
        return template

    def apply(self, name: str | None, prompt: str) -> str:
        """Wrap `prompt` in the template of style `name`."""
        return self.template(name).replace(PROMPT_PLACEHOLDER, prompt.strip())


def read_styles_file(path: Path) -> dict[str, str]:
    """Read the `[styles]` table of a TOML file, raising SettingsError that names the file on any flaw."""
    try:
        with path.open("rb") as file:
            document = tomllib.load(file)
    except FileNotFoundError:
        raise SettingsError(
            f"{STYLES_FILE_ENV} names {path}, which does not exist: fix the path or unset it"
        ) from None
    except OSError as exc:
        raise SettingsError(f"{STYLES_FILE_ENV} file {path} could not be read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"{STYLES_FILE_ENV} file {path} is not valid TOML: {exc}") from None

    table = document.get("styles")
    if not isinstance(table, dict):
        raise SettingsError(
            f"{STYLES_FILE_ENV} file {path} has no [styles] table: "
            'write one line per style, e.g. noir = "film noir still of {prompt}"'
        )

    templates: dict[str, str] = {}
    for raw_name, template in table.items():
        name = raw_name.strip().lower()
        if not _STYLE_NAME.match(name):
            raise SettingsError(
                f"{STYLES_FILE_ENV} file {path}: style name {raw_name!r} is invalid: use 1 to 40 "
                "lowercase letters, digits, '-' or '_'"
            )
        if not isinstance(template, str):
            raise SettingsError(
                f"{STYLES_FILE_ENV} file {path}: style {raw_name!r} must be a string, "
                f"got {type(template).__name__}"
            )
        if PROMPT_PLACEHOLDER not in template:
            raise SettingsError(
                f"{STYLES_FILE_ENV} file {path}: style {raw_name!r} has no {PROMPT_PLACEHOLDER} "
                "placeholder, so the job's prompt would be lost: add {prompt} where it belongs"
            )
        templates[name] = template
    return templates


_default_styles: PromptStyles | None = None


def default_styles() -> PromptStyles:
    """Return the styles from the environment, loaded on first use and kept for the process."""
    global _default_styles
    if _default_styles is None:
        _default_styles = PromptStyles.from_env()
    return _default_styles


def apply_style(name: str | None, prompt: str, styles: PromptStyles | None = None) -> str:
    """Wrap `prompt` in style `name`. An unknown name raises InvalidJobError listing the known ones."""
    return (styles or default_styles()).apply(name, prompt)
