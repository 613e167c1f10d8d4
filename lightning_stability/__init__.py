"""lightning_stability: callbacks and reference models that keep audio-model training numerically stable."""

__version__ = "0.1.0"

__all__ = ["__version__", "callbacks", "data", "losses", "metrics", "modules", "nn", "reference", "sharding"]
