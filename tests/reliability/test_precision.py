"""Precision matrix: the whole stack on the codec and the cascade in 32, bf16-mixed and 16-mixed, with faults.

On CPU, Lightning maps ``precision="16-mixed"`` to bfloat16 autocast (there is no fp16 autocast on CPU in Lightning's
``MixedPrecision`` for the ``"cpu"`` device; ``test_lightning_turns_16_mixed_into_bf16_on_cpu`` pins that), so the
fp16 case wires the plugin explicitly: ``MixedPrecision("16-mixed", device="cpu", scaler=GradScaler("cpu"))`` — a real
fp16 autocast with a real ``GradScaler``, the same code path as on a GPU except for the kernels. A scale of ``2**24``
makes the untrained models overflow fp16 in their first steps: ``GradientGuard`` must count those as
``amp_overflows`` (calibration, not instability), let the scaler back its scale off, and not skip them a second time.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from lightning.pytorch import Callback
from lightning.pytorch.plugins.precision import MixedPrecision

from tests.helpers import FAULT_WARNINGS, make_trainer
from tests.reliability._stack import finite_module, full_stack, loader, make_module, record_fault

pytestmark = FAULT_WARNINGS  # these tests inject faults: the guard's notices are expected

PRECISIONS = ["32-true", "bf16-mixed", "fp16-scaler"]


def _trainer_kwargs(precision: str, scaler: torch.amp.GradScaler | None, device: str) -> dict:
    if precision == "fp16-scaler":
        plugin = MixedPrecision("16-mixed", device=device, scaler=scaler)
        return {"plugins": [plugin]} if device == "cpu" else {"plugins": [plugin], "accelerator": "gpu"}
    return {"precision": precision} if device == "cpu" else {"precision": precision, "accelerator": "gpu"}


class ScaleProbe(Callback):
    """The GradScaler's scale at the start of every step (NaN without a scaler)."""

    def __init__(self) -> None:
        self.scales: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        self.scales.append(scaler.get_scale() if scaler is not None else math.nan)


def _run(tmp_path, kind, precision, faults, max_steps=12, device="cpu"):
    scaler = torch.amp.GradScaler(device, init_scale=2.0**24) if precision == "fp16-scaler" else None
    module = make_module(kind, faults)
    stack = full_stack(kind, tmp_path / "report")
    probe = ScaleProbe()
    scales = probe.scales
    kwargs = _trainer_kwargs(precision, scaler, device)
    trainer = make_trainer(tmp_path, [*stack, probe], max_steps=max_steps, **kwargs)
    trainer.fit(module, loader(kind))
    return module, stack, trainer, scales


GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (fp16 autocast kernels on the GPU)")


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize(
    ("kind", "device"),
    [
        ("codec", "cpu"),
        pytest.param("cascade", "cpu", marks=pytest.mark.slow),
        pytest.param("codec", "cuda", marks=[pytest.mark.gpu, GPU]),
        pytest.param("cascade", "cuda", marks=[pytest.mark.gpu, GPU]),
    ],
)
def test_whole_stack_in_every_precision(tmp_path, kind, device, precision):
    faults = {"nan_batch": {5}, "spike": {8}}
    module, stack, trainer, scales = _run(tmp_path, kind, precision, faults, device=device)
    guard, adaptive, clamp, monitor, report = stack[:5]
    assert trainer.global_step == 12
    skips = [e.step for e in guard.event_log.events if e.kind == "skip"]
    overflows = [e.step for e in guard.event_log.events if e.kind == "amp_overflow"]
    # GradientGuard: the NaN batch is a real skip in every precision, never an "AMP overflow" (the loss was NaN)
    assert 5 in skips
    assert 5 not in overflows
    assert not set(skips) & set(overflows)  # no step is both: the guard does not double-skip an overflow
    assert guard.num_skipped == len(skips)
    assert guard.num_amp_overflows == len(overflows)
    if precision == "fp16-scaler":
        backoffs = [s for s in range(len(scales) - 1) if scales[s + 1] < scales[s]]
        assert overflows  # 2**24 overflows fp16 on an untrained model
        assert set(overflows) <= set(backoffs)  # the scaler saw every one of them and lowered its scale
        assert 5 in backoffs  # the NaN step went through the scaler's bookkeeping as well
        assert scales[-1] < 2.0**24
    else:
        assert not overflows
        assert 8 in skips  # the x1000 spike is far above max_norm=1e4
    # AdaptiveLossWeight: the NaN term rejected, the weight finite and in bounds
    assert adaptive.num_rejected == 1
    assert math.isfinite(adaptive.weight)
    assert adaptive.min_weight <= adaptive.weight <= adaptive.max_weight
    # ScaleFactorClamp: every factor it traced is inside its bounds
    factors = [v for name, pts in clamp.event_log.traces.items() if "clamped_fraction" not in name for _, v in pts]
    assert factors
    assert all(clamp.min_scale - 1e-6 <= v <= clamp.max_scale + 1e-6 for v in factors if math.isfinite(v))
    # SignalMonitor: measured the training pair (every 2 steps), in fp32 whatever the autocast dtype
    assert monitor.event_log.traces
    # StabilityReport: a report that names the precision the run used
    rep = json.loads((tmp_path / "report" / "stability_report.json").read_text())
    assert rep["status"] == "finished"
    assert rep["precision"] == ("16-mixed" if precision == "fp16-scaler" else precision)
    if kind == "cascade":  # SpectralNormInjection: sigma traced for every output projection
        spectral = stack[5]
        assert len(spectral.wrapped) == 3
        assert all(math.isfinite(v) for pts in spectral.event_log.traces.values() for _, v in pts)
    survived = finite_module(module)
    record_fault(f"precision/{precision}/{device}", kind, "nan_batch", "skip", 1, survived=survived)
    record_fault(f"precision/{precision}", kind, "spike", "skip", 1, survived=survived)
    assert survived


def test_lightning_turns_16_mixed_into_bf16_on_cpu(tmp_path):
    """Why the fp16 case above wires its own plugin: on CPU ``precision="16-mixed"`` autocasts to bfloat16 and has
    no GradScaler."""
    module = make_module("cascade")
    trainer = make_trainer(tmp_path, max_steps=1, precision="16-mixed")
    trainer.fit(module, loader("cascade"))
    plugin = trainer.precision_plugin
    assert isinstance(plugin, MixedPrecision)
    assert plugin.scaler is None
    assert plugin.autocast_context_manager().fast_dtype == torch.bfloat16
