"""The layout: the plugin never imports the reference models, the public names import from their documented paths
(0.1's and the new ones), and the package has no import cycle (docs/development.md, "Layout")."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_stability"
#: the plugin: what a user installs for their own model (the old-path modules of 0.1 are listed apart below)
PLUGIN = ("callbacks", "losses", "metrics", "nn/scale.py", "nn/spectral.py", "nn/__init__.py", "sharding.py")
REFERENCE = "lightning_stability.reference"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p) for p in PACKAGE.rglob("*.py")}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(path: Path, *, runtime_only: bool) -> set[str]:
    """Every ``lightning_stability`` module ``path`` imports: top level, inside functions (lazy imports) and the lazy
    ``_NAMES`` maps; with ``runtime_only``, not what an ``if TYPE_CHECKING:`` block imports."""
    tree = ast.parse(path.read_text(), filename=str(path))
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and runtime_only and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # `from pkg import submodule` imports the submodule (and runs pkg/__init__.py, which the graph reads as
            # pkg's own imports): the edge goes to pkg.submodule where that is a module, else to pkg
            submodules = {f"{module}.{a.name}" for a in node.names} & MODULES
            found.update(submodules or {module})
        elif isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "_NAMES" for t in node.targets):
            for value in ast.literal_eval(node.value).values():  # the lazy map: {name: module}
                found.add(f"{package}{value}" if value.startswith(".") else value)
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "moved_module":
            found.add(ast.literal_eval(node.args[1]))  # an old path's module resolves names in the new one
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return {m for m in found if m.split(".")[0] == "lightning_stability"}


def _plugin_files() -> list[Path]:
    files: list[Path] = []
    for entry in PLUGIN:
        path = PACKAGE / entry
        files += sorted(path.rglob("*.py")) if path.is_dir() else [path]
    return files


@pytest.mark.parametrize("path", _plugin_files(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_the_plugin_never_imports_reference_code(path):
    imported = _imports(path, runtime_only=False)  # not even for type checking
    reference = sorted(m for m in imported if m == REFERENCE or m.startswith(REFERENCE + "."))
    # nn/__init__.py keeps 0.1's names of the reference blocks at their old path: it names them, lazily, and nothing
    # in the plugin uses them
    if path == PACKAGE / "nn" / "__init__.py":
        reference = [m for m in reference if m not in _NN_MOVED]
    assert not reference, f"{path.relative_to(PACKAGE)} imports reference code: {reference}"


_NN_MOVED = {
    "lightning_stability.reference.cascade.transformer",
    "lightning_stability.reference.codec.seanet",
    "lightning_stability.reference.codec.quantize",
    "lightning_stability.reference.codec.discriminator",
}


def test_the_plugin_runs_without_the_reference_package():
    # what the AST says, checked on the interpreter: importing every plugin module loads nothing from reference/
    import subprocess
    import sys

    modules = sorted({_module_name(p) for p in _plugin_files()})
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "import lightning_stability.nn as n\n"
        "for name in ('ClampedRMSScale', 'normalize', 'inject_spectral_norm'): getattr(n, name)\n"
        f"bad = sorted(k for k in sys.modules if k.startswith({REFERENCE!r}))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=PACKAGE.parent)


#: the public contract at its documented paths: 0.1's (kept) and the new homes
CONTRACT = {
    "lightning_stability.modules": ["CodecModule", "CascadeTransformerModule", "shard_module"],
    "lightning_stability.data": ["AudioFolderDataModule", "SpeechCorpusDataModule", "LatentPairDataModule"],
    "lightning_stability.nn": ["ClampedRMSScale", "SEANetEncoder", "SEANetDecoder", "ResidualVectorQuantizer",
                               "MultiScaleSTFTDiscriminator", "CascadeConfig", "CascadeTransformer"],
    "lightning_stability.reference.codec": ["CodecModule", "SEANetEncoder", "SEANetDecoder",
                                            "ResidualVectorQuantizer", "MultiScaleSTFTDiscriminator"],
    "lightning_stability.reference.cascade": ["CascadeTransformerModule", "CascadeConfig", "CascadeTransformer"],
    "lightning_stability.reference.data": ["AudioFolderDataModule", "SpeechCorpusDataModule", "LatentPairDataModule"],
    "lightning_stability.sharding": ["shard_module"],
    # 0.1's module paths, kept as thin modules
    "lightning_stability.modules.codec": ["CodecModule", "CodecOutput"],
    "lightning_stability.modules.cascade": ["CascadeTransformerModule", "masked_distance"],
    "lightning_stability.modules.sharding": ["shard_module"],
    "lightning_stability.nn.seanet": ["SEANetEncoder", "SEANetDecoder"],
    "lightning_stability.nn.quantize": ["ResidualVectorQuantizer", "QuantizedResult"],
    "lightning_stability.nn.discriminator": ["MultiScaleSTFTDiscriminator"],
    "lightning_stability.nn.transformer": ["CascadeConfig", "CascadeTransformer"],
    "lightning_stability.demo": ["run_demo", "DemoConfig", "DEMO_LOSS_WEIGHTS"],
    "lightning_stability.data.latents": ["LatentPairDataModule", "CodecLatentEncoder"],
    "lightning_stability.data.speech_corpus": ["SpeechCorpusDataModule"],
    "lightning_stability.data.audio_folder": ["AudioFolderDataModule"],
}  # fmt: skip
#: where each name lives now
HOME = {
    "CodecModule": "lightning_stability.reference.codec.module",
    "CascadeTransformerModule": "lightning_stability.reference.cascade.module",
    "shard_module": "lightning_stability.sharding",
    "SEANetEncoder": "lightning_stability.reference.codec.seanet",
    "CascadeConfig": "lightning_stability.reference.cascade.transformer",
    "AudioFolderDataModule": "lightning_stability.reference.data.audio_folder",
    "LatentPairDataModule": "lightning_stability.reference.data.latents",
    "CodecLatentEncoder": "lightning_stability.reference.codec.latents",
}


@pytest.mark.parametrize("module_name", sorted(CONTRACT))
def test_the_public_contract_imports_from_its_documented_paths(module_name):
    module = importlib.import_module(module_name)
    for name in CONTRACT[module_name]:
        value = getattr(module, name)
        if name in HOME:  # the same object at every path, defined in its new home
            assert value is getattr(importlib.import_module(HOME[name]), name), (module_name, name)
    with pytest.raises(AttributeError, match="no attribute"):
        module.DoesNotExist  # noqa: B018


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for imported in _imports(path, runtime_only=True):
            while imported and imported not in modules:  # `from pkg import Name` -> pkg
                imported = imported.rpartition(".")[0]
            if imported and imported != name:
                targets.add(imported)
        graph[name] = targets
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_sees_the_imports():
    graph = _graph()
    assert "lightning_stability.losses.spectral" in graph["lightning_stability.reference.codec.module"]
    assert "lightning_stability.reference.codec.latents" in graph["lightning_stability.reference.data.latents"]  # lazy
    assert "lightning_stability.reference.codec.module" in graph["lightning_stability.reference.codec"]  # _NAMES


def test_no_import_cycle_in_the_package():
    # imports inside functions and the lazy `_NAMES` maps count; `if TYPE_CHECKING:` blocks do not
    assert not _cycles(_graph())
