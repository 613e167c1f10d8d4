"""Reference material, not the plugin: two models trained with the kit and what they need.

- :mod:`lightning_stability.reference.codec`: ``CodecModule`` (SEANet + residual VQ, EnCodec/DAC style), its blocks,
  its recipe and the ``lightning-stability demo``;
- :mod:`lightning_stability.reference.cascade`: ``CascadeTransformerModule`` (the three-stage latent transformer of the
  post-mortem) and its recipe;
- :mod:`lightning_stability.reference.data`: the DataModules both train on.

The plugin (``callbacks``, ``losses``, ``metrics``, ``nn``, ``sharding``) never imports anything here; the reference
models import the plugin. Copy a reference model to start your own, or subclass it. See ``docs/development.md``.
"""

__all__ = ["cascade", "codec", "data"]
