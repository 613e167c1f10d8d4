"""One owner per recipe: ``configs/cascade.yaml`` and the example train what ``reference/cascade/recipe.py`` says."""

import dataclasses
import inspect
from pathlib import Path

import yaml

from lightning_stability.reference.cascade.module import CascadeTransformerModule
from lightning_stability.reference.cascade.recipe import (
    CASCADE_CORPUS,
    CASCADE_DATA,
    CASCADE_MODULE,
    CASCADE_SIZE,
    GRADIENT_CLIP_VAL,
    cascade_config,
    cascade_module,
)

REPO = Path(__file__).resolve().parents[3]


def _plain(value):
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


def test_cascade_yaml_equals_the_recipe():
    config = yaml.safe_load((REPO / "configs" / "cascade.yaml").read_text())
    args = config["model"]["init_args"]
    network = dataclasses.asdict(cascade_config())
    assert set(CASCADE_SIZE) <= set(args["config"])
    for name, value in args["config"].items():  # every field the YAML spells out is the recipe's
        assert _plain(value) == _plain(network[name]), name
    defaults = {
        k: p.default for k, p in inspect.signature(CascadeTransformerModule.__init__).parameters.items()
        if p.default is not inspect.Parameter.empty and k != "config"
    }  # fmt: skip
    module = {**defaults, **CASCADE_MODULE}
    assert set(CASCADE_MODULE) <= set(args) - {"config"}
    for name, value in args.items():
        if name != "config":
            assert _plain(value) == _plain(module[name]), name
    data = config["data"]["init_args"]
    for name, value in CASCADE_DATA.items():
        assert data[name] == value, name
    for name, value in CASCADE_CORPUS.items():
        assert data["corpus"][name] == value, name
    assert config["trainer"]["gradient_clip_val"] == GRADIENT_CLIP_VAL


def test_cascade_module_keeps_a_users_argument():
    model = cascade_module(lr=1e-3, cosine_weight=0.0)
    assert model.hparams["lr"] == 1e-3
    assert model.hparams["cosine_weight"] == 0.0
    assert _plain(model.hparams["stage_weights"]) == _plain(CASCADE_MODULE["stage_weights"])
    assert model.config.n_layers == CASCADE_SIZE["n_layers"]
