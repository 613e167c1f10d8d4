"""Every Python code block of README.md and the documentation pages runs.

The blocks of one page run in order in one namespace, as a reader running the page top to bottom would, inside the
test's ``tmp_path``. A block is left out only when the line before its fence says why:
``<!-- docs-test: skip (reason) -->``. Speech corpora go to one cache shared by the pages
(``LIGHTNING_STABILITY_CACHE``), as on a user's machine, so pages asking for the same corpus generate it once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<info>[^\n`]*)\n(?P<code>.*?)^(?P=indent)```[ \t]*$", re.S | re.M)
_SKIP = re.compile(r"<!--\s*docs-test:\s*skip\s*(?P<reason>.*?)\s*-->\s*$")


@dataclass
class Block:
    page: str
    line: int
    code: str
    skip: str | None


def python_blocks(path: Path) -> list[Block]:
    text = path.read_text()
    blocks = []
    for m in _FENCE.finditer(text):
        if m.group("info").strip().split(" ")[0] not in ("python", "py"):
            continue
        line = text.count("\n", 0, m.start()) + 1
        before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        skip = _SKIP.search(before)
        reason = None
        if skip:
            reason = skip.group("reason").strip("()").strip()
            if not reason:
                raise ValueError(f"{path}:{line}: a docs-test skip marker must say why")
        code = "\n".join(ln[len(m.group("indent")) :] for ln in m.group("code").splitlines())
        blocks.append(Block(str(path.relative_to(REPO)), line + 1, code, reason))
    return blocks


def _pages() -> list[Path]:
    pages = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
    return [p for p in pages if python_blocks(p)]


PAGES = _pages()


def test_pages_have_runnable_examples():
    names = {str(p.relative_to(REPO)) for p in PAGES}
    assert "README.md" in names
    assert "docs/guides/gradient-guard.md" in names
    skipped = [(b.page, b.line, b.skip) for p in PAGES for b in python_blocks(p) if b.skip]
    assert len(skipped) <= 3, f"keep the blocks that do not run few: {skipped}"


@pytest.fixture(scope="module")
def corpus_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("docs_cache")


# expected: the spectral-norm guide builds EnCodec's discriminator, which uses torch's deprecated weight norm; the
# guard guide skips a NaN step, the scale-clamp guide starts a learnable scale at 3.0 (both warn, on purpose)
@pytest.mark.filterwarnings("ignore:`torch.nn.utils.weight_norm` is deprecated:FutureWarning")
@pytest.mark.filterwarnings("ignore:GradientGuard skipped step:UserWarning")
@pytest.mark.filterwarnings("ignore:ScaleFactorClamp. learnable scale `output_scale` starts at 3:UserWarning")
# the small examples validate on 0.5 s crops: too short for PESQ/STOI/loudness on some clips, which the codec says
@pytest.mark.filterwarnings(r"ignore:CodecModule. val/\w+ skipped \d+ of \d+ validation clips:UserWarning")
@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(REPO)) for p in PAGES])
def test_page_examples_run(page: Path, corpus_cache: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("LIGHTNING_STABILITY_CACHE", str(corpus_cache))
    namespace: dict = {"__name__": "__docs_example__"}
    for block in python_blocks(page):
        if block.skip:
            continue
        exec(compile(block.code, f"{block.page}:{block.line}", "exec"), namespace)  # noqa: S102 (the test's purpose)
