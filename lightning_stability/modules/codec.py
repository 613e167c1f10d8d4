"""Moved to :mod:`lightning_stability.reference.codec.module` (0.2.0).

This path keeps working: its names resolve there on first use."""

from lightning_stability._lazy import moved_module

__getattr__, __dir__ = moved_module(__name__, "lightning_stability.reference.codec.module")
