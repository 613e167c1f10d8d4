"""One owner per recipe: ``configs/codec.yaml`` and the demo train what ``reference/codec/recipe.py`` says."""

from pathlib import Path

import yaml

from lightning_stability.reference.codec.demo import DemoConfig, _codec
from lightning_stability.reference.codec.recipe import DEMO_RECIPE, RECIPE_ARGUMENTS, codec_defaults, demo_codec

REPO = Path(__file__).resolve().parents[3]


def _plain(value):
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


def test_codec_yaml_equals_the_recipe():
    config = yaml.safe_load((REPO / "configs" / "codec.yaml").read_text())
    args = config["model"]["init_args"]
    recipe = {**codec_defaults(), **DEMO_RECIPE}
    assert {k: _plain(v) for k, v in args.items()} == {k: _plain(v) for k, v in recipe.items()}


def test_the_defaults_are_the_proven_objective():
    defaults = codec_defaults()
    assert set(defaults) == set(RECIPE_ARGUMENTS)
    assert defaults["loss_weights"] == {"mel": 2.5, "l1": 1000.0, "stft": 3.0, "rms": 10.0, "vq": 1.0}
    assert defaults["rms_correlation_gate"] == defaults["l1_gain_gate"] == (0.4, 0.8)
    assert defaults["remove_dc"] is True
    assert (defaults["mel_log_weight"], defaults["mel_mag_weight"], defaults["lr"]) == (0.0, 1.0, 1e-3)


def test_the_demo_builds_the_recipe_and_keeps_a_users_argument():
    codec = _codec(DemoConfig())
    for name, value in {**codec_defaults(), **DEMO_RECIPE}.items():
        got = dict(codec.loss_weights.as_dict()) if name == "loss_weights" else codec.hparams[name]
        assert _plain(got) == _plain(value), name
    mine = demo_codec(loss_weights={"mel": 1.0}, remove_dc=False, n_filters=4)
    assert dict(mine.loss_weights.as_dict()) == {"mel": 1.0}
    assert mine.hparams["remove_dc"] is False
    assert mine.hparams["n_filters"] == 4
