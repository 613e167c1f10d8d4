"""Issue 24, item 8 (the guard's part): rate-limited warnings still announce each new kind of skip, ``event_log`` is
iterable, and parameter names under ``torch.compile`` are the module's own (no ``_orig_mod.``)."""

from __future__ import annotations

import warnings

import torch

from lightning_stability.callbacks import GradientGuard
from tests.helpers import FaultyModule, make_trainer


def test_a_new_kind_of_skip_is_announced_despite_the_rate_limit(tmp_path):
    # steps 1 and 6 are non-finite, step 4 is a finite spike over `max_norm`; one warning per 100 steps otherwise
    module = FaultyModule(inf_grad_steps={1, 6}, spike_steps={4}, spike_factor=1e5)
    guard = GradientGuard(max_norm=1e3, warn_every_n_steps=100)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(tmp_path, [guard], max_steps=8).fit(module)
    notices = [str(w.message) for w in caught if str(w.message).startswith("GradientGuard skipped")]
    assert [e.step for e in guard.event_log] == [1, 4, 6]
    assert len(notices) == 2  # step 6 repeats the kind of step 1 within 100 steps: rate-limited
    assert notices[0].startswith("GradientGuard skipped step 1:")
    assert notices[1].startswith("GradientGuard skipped step 4:")


def test_event_log_is_iterable_and_has_a_length(tmp_path):
    guard = GradientGuard()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        make_trainer(tmp_path, [guard], max_steps=6).fit(FaultyModule(nan_loss_steps={2, 4}))
    assert len(guard.event_log) == 2
    assert [(e.step, e.kind) for e in guard.event_log] == [(2, "skip"), (4, "skip")]
    assert list(guard.event_log) == list(guard.event_log.events)


class CompiledModule(FaultyModule):
    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.net = torch.compile(self.net, backend="eager")  # parameters become `net._orig_mod.0.weight`


def test_parameter_names_under_torch_compile_drop_orig_mod(tmp_path):
    module = CompiledModule(inf_grad_steps={2})
    assert any("_orig_mod." in name for name, _ in module.named_parameters())
    guard = GradientGuard()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        make_trainer(tmp_path, [guard], max_steps=4).fit(module)
    skip = next(iter(guard.event_log))
    assert skip.data["nonfinite_params"] == ["net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"]
    assert all("_orig_mod" not in layer for layer in str(skip.data).split("'"))
