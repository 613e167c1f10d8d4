"""``cached_state_key``: the same key as Lightning's ``_generate_state_key``, built once, rebuilt on change."""

from __future__ import annotations

import copy
import pickle

from lightning.pytorch import Callback

from lightning_stability.callbacks import GradientGuard, ScaleFactorClamp
from lightning_stability.callbacks._state_key import cached_state_key


class Counting(Callback):
    def __init__(self, level: float) -> None:
        self.level = level
        self.built = 0

    def _generate_state_key(self, **kwargs):
        self.built += 1
        return super()._generate_state_key(**kwargs)

    @property
    def state_key(self) -> str:
        return cached_state_key(self, level=self.level)


def test_key_matches_lightnings_and_is_built_once_per_identity():
    cb = Counting(0.5)
    first = cb.state_key
    assert first == Callback._generate_state_key(cb, level=0.5)
    assert [cb.state_key for _ in range(5)] == [first] * 5
    assert cb.built == 1
    cb.level = 0.25  # an identifying argument changed: the key follows it
    assert cb.state_key == Callback._generate_state_key(cb, level=0.25) != first
    assert cb.built == 2


def test_callbacks_keep_their_documented_keys_after_copy_and_pickle():
    guard = GradientGuard(max_norm=10.0)
    expected = guard._generate_state_key(max_norm=10.0, zscore=guard.zscore, spike_action=guard.spike_action)
    assert guard.state_key == expected
    assert copy.deepcopy(guard).state_key == expected
    assert pickle.loads(pickle.dumps(guard)).state_key == expected
    clamp = ScaleFactorClamp(0.5, 2.0)
    expected = clamp._generate_state_key(min_scale=0.5, max_scale=2.0, param_patterns=clamp.param_patterns)
    assert clamp.state_key == expected
    assert ScaleFactorClamp(0.5, 3.0).state_key != clamp.state_key
