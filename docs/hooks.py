"""MkDocs hooks of the documentation site (``hooks:`` in ``mkdocs.yml``).

- ``<!-- api: lightning_stability.callbacks -->`` becomes one ``::: lightning_stability.callbacks.<Name>`` block per
  public name of that package (its lazy ``_NAMES`` map), so a new or renamed public name shows up in the API reference
  without editing the page.
"""

from __future__ import annotations

import importlib
import re

_API = re.compile(r"^<!-- api: ([\w.]+) -->$", re.MULTILINE)


def api_blocks(package: str) -> str:
    """mkdocstrings blocks for every public name of ``package`` (a ``lightning_stability`` sub-package)."""
    names = getattr(importlib.import_module(package), "_NAMES", None)
    if not names:
        raise ValueError(f"{package!r} has no `_NAMES` map of public names")
    return "\n\n".join(f"::: {package}.{name}" for name in names)


def on_page_markdown(markdown: str, page, config, files) -> str:  # noqa: ARG001 (MkDocs hook signature)
    return _API.sub(lambda m: api_blocks(m.group(1)), markdown)
