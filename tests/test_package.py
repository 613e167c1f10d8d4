import importlib
import subprocess
import sys

import pytest

import lightning_stability


def test_version_is_exposed():
    assert lightning_stability.__version__.count(".") == 2


@pytest.mark.parametrize("pkg", ["callbacks", "modules", "losses", "metrics", "data", "nn"])
def test_unknown_public_name_is_an_attribute_error(pkg):
    module = importlib.import_module(f"lightning_stability.{pkg}")
    with pytest.raises(AttributeError, match="no attribute"):
        module.DoesNotExist  # noqa: B018


def test_nn_never_imports_lightning():
    code = (
        "import sys, importlib, pkgutil, lightning_stability.nn as n\n"
        "for m in pkgutil.iter_modules(n.__path__): importlib.import_module('lightning_stability.nn.' + m.name)\n"
        "bad = [k for k in sys.modules if k.split('.')[0] in ('lightning', 'pytorch_lightning')]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_console_script_help_runs():
    from lightning_stability.cli import main

    assert main(["--help"]) == 0
    assert main(["no-such-command"]) == 2


# The public contract (docs/design.md, "Layering"). Renaming any of these needs a CHANGELOG entry; this test makes it
# deliberate.
PUBLIC = {
    "callbacks": ["GradientGuard", "AdaptiveLossWeight", "SpectralNormInjection", "ScaleFactorClamp", "SignalMonitor",
                  "StabilityReport", "CodebookMonitor", "AdversarialBalanceMonitor"],
    "modules": ["CodecModule", "CascadeTransformerModule"],
    "losses": ["LossWeights", "LossBalancer", "MultiResolutionMelLoss"],
    "metrics": ["RMSRatio", "DCOffset", "PeakAmplitude", "CodebookUsage"],
    "data": ["AudioFolderDataModule", "SpeechCorpusDataModule", "LatentPairDataModule"],
}  # fmt: skip


@pytest.mark.parametrize("pkg", sorted(PUBLIC))
def test_public_contract_imports(pkg):
    module = importlib.import_module(f"lightning_stability.{pkg}")
    for name in PUBLIC[pkg]:
        assert name in module.__all__
        assert getattr(module, name).__name__ == name


@pytest.mark.parametrize("pkg", ["callbacks", "modules", "losses", "metrics", "data", "nn"])
def test_every_listed_name_resolves(pkg):
    module = importlib.import_module(f"lightning_stability.{pkg}")
    for name in module.__all__:
        assert getattr(module, name) is not None, name
