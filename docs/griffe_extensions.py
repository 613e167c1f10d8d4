"""Griffe extension of the API reference: reads this project's docstring conventions as Google style.

- Grouped arguments, ``min_weight, max_weight: bounds of the weight.`` (an ``Args:`` item naming several parameters,
  possibly over several lines), become one item per parameter with the shared description, so griffe still checks
  every documented name against the signature.
- Sphinx roles (``:class:`X```, ``:meth:`~a.b```) render as inline code; ``:math:`...``` and ``.. math::`` blocks
  become ``\\(...\\)`` / ``\\[...\\]`` for ``pymdownx.arithmatex`` (MathJax); a paragraph ending in ``::`` (a
  reStructuredText literal block follows) ends in ``:``.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:class|meth|func|mod|attr|obj|data|exc):`~?([^`]+)`")
_MATH_ROLE = re.compile(r":math:`([^`]+)`")
_MATH_BLOCK = re.compile(r"^(?P<indent>[ \t]*)\.\. math::[ \t]*\n(?P<body>(?:(?P=indent)[ \t]+\S.*\n|[ \t]*\n)+)", re.M)
_LITERAL = re.compile(r"(?<=\S)::[ \t]*$", re.M)
_SECTION = re.compile(r"^(\s*)(Args|Arguments|Parameters|Keyword Args|Other Parameters):\s*$")
_GROUP = re.compile(r"^((?:\*{0,2}\w+\s*,\s*)+\*{0,2}\w+)\s*:\s*(.*)$", re.DOTALL)


def _split_groups(text: str) -> str:
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        m = _SECTION.match(lines[i])
        out.append(lines[i])
        i += 1
        if not m:
            continue
        item_indent: int | None = None
        while i < len(lines):
            line = lines[i]
            if not line.strip():
                break
            indent = len(line) - len(line.lstrip())
            if indent <= len(m.group(1)):
                break
            if item_indent is None:
                item_indent = indent
            # one item: its first line and every more-indented continuation line
            item = [line]
            i += 1
            while i < len(lines) and lines[i].strip() and len(lines[i]) - len(lines[i].lstrip()) > item_indent:
                item.append(lines[i])
                i += 1
            joined = " ".join(part.strip() for part in item)
            g = _GROUP.match(joined)
            if g:
                pad = " " * item_indent
                out.extend(f"{pad}{name.strip()}: {g.group(2)}" for name in g.group(1).split(","))
            else:
                out.extend(item)
    return "\n".join(out)


def _math_block(m: re.Match) -> str:
    indent = m.group("indent")
    lines = [ln.strip() for ln in m.group("body").splitlines() if ln.strip()]
    return f"{indent}\\[\n" + "".join(f"{indent}{ln}\n" for ln in lines) + f"{indent}\\]\n\n"


def rewrite(text: str) -> str:
    """The docstring ``text`` in the Markdown the site renders."""
    text = _MATH_BLOCK.sub(_math_block, text + "\n").rstrip("\n")
    text = _MATH_ROLE.sub(lambda m: "\\(" + m.group(1) + "\\)", text)
    text = _LITERAL.sub(":", text)
    return _ROLE.sub(r"`\1`", _split_groups(text))


class ProjectDocstrings(griffe.Extension):
    """Rewrite each docstring once, when griffe creates the object."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:  # noqa: ARG002 (griffe hook signature)
        if obj.docstring is not None:
            obj.docstring.value = rewrite(obj.docstring.value)
