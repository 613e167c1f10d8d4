"""``Callback.state_key`` built once per distinct set of identifying arguments.

Lightning reads ``state_key`` around every hook call of every callback (it names the profiler section), so a
callback with several hooks per step pays for ``_generate_state_key`` (a ``repr`` of a dict) several times a step.
The key depends only on the constructor arguments that identify the instance; it is rebuilt if one of them changes.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch import Callback


def cached_state_key(callback: Callback, **identity: Any) -> str:
    """``callback._generate_state_key(**identity)``, cached on the instance while ``identity`` stays equal."""
    # the kwargs dict itself is the cache key: comparing two small dicts is cheaper than building a tuple of items
    cached = callback.__dict__.get("_state_key_cache")
    if cached is not None and cached[0] == identity:
        return cached[1]
    key = callback._generate_state_key(**identity)
    callback.__dict__["_state_key_cache"] = (identity, key)
    return key
