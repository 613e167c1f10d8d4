"""The codec recipe: one owner for what the demo, ``configs/codec.yaml``, the benchmarks, the examples and the scripts
train.

The **objective** the demo proved (``docs/codec_demo_experiments.md``: the loss mix, the mel form, the correlation
gates of the level and L1 terms, the DC block, the learning rate) is what ``CodecModule()`` gives by default since
0.2.0, so a user who subclasses the module gets it too; :func:`codec_defaults` reads it from the signature. What the
demo adds is its **size** for a CPU budget (:data:`DEMO_SIZE`: EnCodec's 24 kHz layout, narrower) and the output
safety net that ``ScaleFactorClamp`` watches (:data:`DEMO_SAFETY_NET`); :func:`demo_codec` builds exactly that.
``tests/reference/codec/test_recipe.py`` checks that ``configs/codec.yaml`` says the same.
"""

from __future__ import annotations

import inspect
from typing import Any

__all__ = ["DEMO_RECIPE", "DEMO_SAFETY_NET", "DEMO_SIZE", "RECIPE_ARGUMENTS", "codec_defaults", "demo_codec"]

#: ``CodecModule`` arguments that make up the proven objective (their defaults are the recipe).
RECIPE_ARGUMENTS: tuple[str, ...] = (
    "loss_weights",
    "mel_log_weight",
    "mel_mag_weight",
    "rms_correlation_gate",
    "l1_gain_gate",
    "remove_dc",
    "dead_code_usage_ratio",
    "lr",
    "betas",
)

#: The demo's model: EnCodec's 24 kHz layout (hop 320, 75 frames/s, 8 x 1024 codes = 6 kbps) with narrower
#: convolutions (EnCodec: 32 filters, 2 LSTM layers) so that a step takes about 0.3 s on one CPU thread.
DEMO_SIZE: dict[str, Any] = {
    "sample_rate": 24000,
    "n_filters": 8,
    "ratios": (8, 5, 4, 2),
    "dimension": 128,
    "lstm": 1,
    "n_q": 8,
    "codebook_size": 1024,
}

#: A ``ClampedRMSScale`` after the decoder whose factor ``ScaleFactorClamp`` logs and bounds (a factor pinned at a
#: bound means the decoder's level is wrong; with the recipe it sits at a bound in about 3 % of the last steps).
DEMO_SAFETY_NET: dict[str, Any] = {"output_rms_clamp": (0.7, 1.5)}

#: Everything the demo passes to ``CodecModule`` (the objective is the module's defaults).
DEMO_RECIPE: dict[str, Any] = {**DEMO_SIZE, **DEMO_SAFETY_NET}


def codec_defaults(names: tuple[str, ...] = RECIPE_ARGUMENTS) -> dict[str, Any]:
    """``CodecModule``'s default for each argument in ``names`` (``loss_weights``: the weights it resolves to)."""
    from lightning_stability.reference.codec.module import DEFAULT_LOSS_WEIGHTS, CodecModule

    params = inspect.signature(CodecModule.__init__).parameters
    out: dict[str, Any] = {}
    for name in names:
        if name not in params:
            raise ValueError(f"`names`: CodecModule has no argument {name!r}")
        value = params[name].default
        out[name] = dict(DEFAULT_LOSS_WEIGHTS) if name == "loss_weights" and value is None else value
    return out


def demo_codec(**overrides: Any):
    """``CodecModule(**DEMO_RECIPE, **overrides)``: the demo's codec (an override wins over the recipe)."""
    from lightning_stability.reference.codec.module import CodecModule

    return CodecModule(**{**DEMO_RECIPE, **overrides})
