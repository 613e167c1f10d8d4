"""The cascade recipe: one owner for what the example, ``configs/cascade.yaml`` and the cascade benchmark train.

The network's numbers are ``CascadeConfig``'s defaults (the post-mortem's fixed configuration) at the size in
:data:`CASCADE_SIZE` (the post-mortem's widths and depth halved so it trains on 2 CPU cores); the module's arguments
are :data:`CASCADE_MODULE` over ``CascadeTransformerModule``'s defaults; the data :data:`CASCADE_DATA` and
:data:`CASCADE_CORPUS`; the trainer clips gradients at :data:`GRADIENT_CLIP_VAL`; :func:`kit_callbacks` is the
example's kit. ``tests/reference/cascade/test_recipe.py`` checks that ``configs/cascade.yaml`` says the same.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "CASCADE_CORPUS",
    "CASCADE_DATA",
    "CASCADE_MODULE",
    "CASCADE_SIZE",
    "GRADIENT_CLIP_VAL",
    "cascade_config",
    "cascade_module",
    "kit_callbacks",
]

#: ``CascadeConfig`` fields: the post-mortem's (256, 384, 384) x 6 layers halved, to train on 2 CPU cores.
CASCADE_SIZE: dict[str, Any] = {"widths": (128, 192, 192), "n_layers": 3, "n_heads": 4}
#: ``CascadeTransformerModule`` arguments over its defaults.
CASCADE_MODULE: dict[str, Any] = {"stage_weights": (0.5, 0.5, 1.0), "cosine_weight": 0.1, "lr": 3e-4}
#: ``LatentPairDataModule`` arguments: 2 s windows at 75 frames/s.
CASCADE_DATA: dict[str, Any] = {"segment_frames": 150, "batch_size": 8, "val_fraction": 0.1}
#: The eSpeak NG corpus the latents are computed from (``LatentPairDataModule(corpus=...)``).
CASCADE_CORPUS: dict[str, Any] = {"num_utterances": 240, "num_voices": 8}
#: The post-mortem's clip; ``GradientGuard`` decides before it.
GRADIENT_CLIP_VAL: float = 5.0


def cascade_config(**overrides: Any):
    """``CascadeConfig(**CASCADE_SIZE, **overrides)``."""
    from lightning_stability.reference.cascade.transformer import CascadeConfig

    return CascadeConfig(**{**CASCADE_SIZE, **overrides})


def cascade_module(config: Any = None, **overrides: Any):
    """``CascadeTransformerModule(config or cascade_config(), **CASCADE_MODULE, **overrides)``."""
    from lightning_stability.reference.cascade.module import CascadeTransformerModule

    config = config if config is not None else cascade_config()
    return CascadeTransformerModule(config, **{**CASCADE_MODULE, **overrides})


def kit_callbacks(config: Any = None) -> list:
    """The example's kit: ``GradientGuard`` (ZClip's z-score 2.5, rollback on persistent spikes),
    ``AdaptiveLossWeight`` on the last stage, ``ScaleFactorClamp`` at the config's bounds."""
    from lightning_stability.callbacks import AdaptiveLossWeight, GradientGuard, ScaleFactorClamp

    config = config if config is not None else cascade_config()
    return [
        GradientGuard(zscore=2.5, on_persistent="rollback"),
        AdaptiveLossWeight("stage3", base_weight=None, min_weight=0.5, max_weight=2.0),
        ScaleFactorClamp(min_scale=config.min_scale, max_scale=config.max_scale, warn_above=config.warn_above),
    ]
