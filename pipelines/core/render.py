"""Jinja2 rendering of the templates in ``pipelines/templates`` (pages and reports, never string concatenation)."""

from __future__ import annotations

from functools import cache

import jinja2

TEMPLATES = "pipelines"


@cache
def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.PackageLoader(TEMPLATES, "templates"),
        autoescape=jinja2.select_autoescape(enabled_extensions=("html.j2",), default_for_string=False),
        undefined=jinja2.StrictUndefined,  # a missing field is a bug, not an empty cell
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )


def render(template: str, **context: object) -> str:
    """Render ``pipelines/templates/<template>`` (e.g. ``model_card.md.j2``) with ``context``."""
    return _environment().get_template(template).render(**context)
