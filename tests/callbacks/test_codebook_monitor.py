"""CodebookMonitor on this package's quantizer and on users' quantizers (EnCodec, vector-quantize-pytorch)."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lightning_stability.callbacks import CodebookMonitor, QuantizerTap, StabilityReport
from lightning_stability.callbacks.codebook_monitor import find_quantizers
from lightning_stability.nn import ResidualVectorQuantizer
from tests._helpers_user_codec import UserVQCodec, loader


def _fit(module, monitor, *, steps=60, callbacks=(), **kw):
    torch.manual_seed(0)
    trainer = pl.Trainer(
        max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[monitor, *callbacks], **kw,
    )  # fmt: skip
    trainer.fit(module, loader(n=64, batch_size=8, shuffle=True))
    return trainer


def _kinds(monitor):
    return [(e.kind, e.data.get("level")) for e in monitor.event_log.events]


# ------------------------------------------------------------------------------------------- discovery and maths
def test_finds_known_quantizers_once_each():
    torch.manual_seed(0)
    encodec_rvq = UserVQCodec("encodec")
    vqp_rvq = UserVQCodec("vqp")
    model = nn.ModuleDict({"ours": ResidualVectorQuantizer(8, n_q=2, codebook_size=16)})
    assert {k: (t.kind, t.levels, t.codebook_size) for k, t in find_quantizers(model).items()} == {
        "ours": ("lightning_stability", 2, 16)
    }
    assert find_quantizers(encodec_rvq)["quantizer"].kind == "encodec"
    # the ResidualVQ is listed, not each of its VectorQuantize layers
    found = find_quantizers(vqp_rvq)
    assert list(found) == ["quantizer"]
    assert found["quantizer"].levels == 2


class _Fixed(nn.Module):
    """Returns preset codes ``[levels, N]`` (the tap reads them as they are)."""

    def __init__(self, codes):
        super().__init__()
        self.codes = codes
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return self.codes


def test_metrics_equal_a_hand_computation_and_ignore_negative_codes():
    k = 8
    codes = torch.tensor([[0, 0, 0, 1, 2, 2, 7, -1], [3, 3, 3, 3, 3, 3, 3, 3]])
    module = _Fixed(codes)
    monitor = CodebookMonitor(quantizers={"net": QuantizerTap(codes=lambda out: out, codebook_size=k, levels=2)})
    lm = pl.LightningModule()
    lm.net = module
    monitor.setup(pl.Trainer(logger=False), lm, "fit")
    module.train()
    module(None)
    module(None)  # counts accumulate over forwards
    values = monitor.check()
    counts = torch.tensor([6.0, 2, 4, 0, 0, 0, 0, 2])  # level 0, the -1 not counted
    p = counts / counts.sum()
    h = -(p[p > 0] * p[p > 0].log()).sum().item()
    assert values["codebook/net/level_0/perplexity"] == pytest.approx(math.exp(h))
    assert values["codebook/net/level_0/entropy"] == pytest.approx(h / math.log(k))
    # dead: fewer than 0.1 x uniform (0.1 * 14 / 8 = 0.175 uses): the four unused codes
    assert values["codebook/net/level_0/dead_fraction"] == pytest.approx(4 / 8)
    assert values["codebook/net/level_1/perplexity"] == pytest.approx(1.0)
    assert values["codebook/net/level_1/dead_fraction"] == pytest.approx(7 / 8)
    module.eval()
    module(None)  # eval-mode forwards are not counted
    assert monitor.check() == {}  # nothing counted in the window: no level reported


def test_bad_arguments_are_clear_errors():
    with pytest.raises(TypeError, match="quantizers"):
        CodebookMonitor(quantizers={"x": lambda out: out})
    with pytest.raises(ValueError, match="collapse_ratio"):
        CodebookMonitor(collapse_ratio=0.0)
    with pytest.raises(TypeError, match="every_n_steps"):
        CodebookMonitor(every_n_steps=2.5)
    with pytest.raises(ValueError, match="codebook_size"):
        QuantizerTap(codes=lambda out: out, codebook_size=1)
    monitor = CodebookMonitor(quantizers={"nope": QuantizerTap(codes=lambda out: out, codebook_size=4)})
    with pytest.raises(ValueError, match="'nope'"):
        monitor.setup(pl.Trainer(logger=False), UserVQCodec("vqp"), "fit")


# --------------------------------------------------------------------------------------------------- EnCodec
def test_encodec_healthy_run_raises_no_alarm():
    monitor = CodebookMonitor(every_n_steps=5, window=3, expiry_window=8)
    _fit(UserVQCodec("encodec", expiry=False), monitor)  # any warning of the package would fail the test
    assert monitor.event_log.events == type(monitor.event_log.events)(maxlen=monitor.event_log.max_events)
    assert monitor.last_values["codebook/quantizer/level_0/perplexity"] > 0.1 * 16
    assert len(monitor.event_log.traces["quantizer/level_1/dead_fraction"]) == 12  # 60 batches / 5


def test_encodec_collapsed_encoder_is_reported_within_the_window():
    monitor = CodebookMonitor(every_n_steps=5, window=3, expiry_window=8)
    with pytest.warns(UserWarning, match="CodebookMonitor: .* level 0 collapsed"):
        _fit(UserVQCodec("encodec", expiry=False, collapse=True), monitor, steps=30)
    first = next(e for e in monitor.event_log.events if e.kind == "codebook_collapse")
    assert first.step == 14  # the third check (batches 5, 10, 15): exactly `window` checks
    assert first.data["perplexity"] == pytest.approx(1.0)
    assert "advice" in first.data


@pytest.mark.filterwarnings("ignore:CodebookMonitor. .* collapsed:UserWarning")
def test_encodec_dead_code_expiry_without_effect_is_reported():
    # EnCodec's expiry writes the new vector into `embed` only; its EMA update overwrites it in the same forward
    # (encodec #61), so the codes that died in the first EMA update stay dead
    monitor = CodebookMonitor(every_n_steps=5, window=3, expiry_window=8)
    with pytest.warns(UserWarning, match="dead-code expiry has no effect"):
        _fit(UserVQCodec("encodec", expiry=True), monitor)
    events = [e for e in monitor.event_log.events if e.kind == "expiry_ineffective"]
    assert events
    assert events[0].data["quantizer"] == "quantizer"
    assert events[0].data["replaced_dead_again"] + events[0].data["never_replaced"] >= 0.25 * 16


# ------------------------------------------------------------------------------------- vector-quantize-pytorch
def test_vector_quantize_pytorch_healthy_run_raises_no_alarm():
    monitor = CodebookMonitor(every_n_steps=5, window=3, expiry_window=8)
    _fit(UserVQCodec("vqp"), monitor)
    assert not monitor.event_log.events
    assert monitor.last_values["codebook/quantizer/level_0/perplexity"] > 12


def test_vector_quantize_pytorch_collapsed_encoder_is_reported_on_every_level():
    monitor = CodebookMonitor(every_n_steps=5, window=3, expiry_window=8)
    with pytest.warns(UserWarning, match="collapsed"):
        _fit(UserVQCodec("vqp", collapse=True), monitor, steps=30)
    assert ("codebook_collapse", 0) in _kinds(monitor)
    assert ("codebook_collapse", 1) in _kinds(monitor)


@pytest.mark.filterwarnings("ignore:CodebookMonitor. .* collapsed:UserWarning")
def test_vector_quantize_pytorch_expiry_revives_codes_and_is_not_blamed():
    # its expiry writes the vector, the EMA sum and the count together: the codes come back
    monitor = CodebookMonitor(every_n_steps=5, window=3, expiry_window=8)
    _fit(UserVQCodec("vqp", shift_after=10), monitor, steps=80)
    assert "expiry_ineffective" not in [k for k, _ in _kinds(monitor)]
    assert monitor.last_values["codebook/quantizer/level_0/perplexity"] > 12


def test_vector_quantize_pytorch_collapse_with_expiry_disabled_is_reported():
    # the latents move into a corner of the codebook and nothing revives the other codes: about 2 of 16 in use
    monitor = CodebookMonitor(every_n_steps=5, window=3, expiry_window=8, collapse_ratio=0.2)
    with pytest.warns(UserWarning, match="level 0 collapsed"):
        _fit(UserVQCodec("vqp", shift_after=10, expiry=False), monitor, steps=40)
    assert ("codebook_collapse", 0) in _kinds(monitor)
    assert "expiry_ineffective" not in [k for k, _ in _kinds(monitor)]  # the quantizer does not claim to expire


# ----------------------------------------------------------------------------------- report and checkpoint
def test_report_lists_the_finding_with_its_advice(tmp_path):
    monitor = CodebookMonitor(every_n_steps=5, window=3, expiry_window=8)
    report = StabilityReport(dirpath=tmp_path, print_summary=False)
    with pytest.warns(UserWarning, match="collapsed"):
        _fit(UserVQCodec("vqp", collapse=True), monitor, steps=20, callbacks=[report])
    recs = report.last_report["summary"]["recommendations"]
    assert any(r.startswith("codebook: quantizer 'quantizer'") and "k-means" in r for r in recs)


def test_state_dict_round_trip_continues_the_streaks(tmp_path):
    monitor = CodebookMonitor(every_n_steps=5, window=3, expiry_window=8)
    _fit(UserVQCodec("vqp", collapse=True), monitor, steps=10)  # two collapsing checks: no event yet
    assert not monitor.event_log.events
    state = monitor.state_dict()
    torch.save(state, tmp_path / "cb.pt")
    resumed = CodebookMonitor(every_n_steps=5, window=3, expiry_window=8)
    resumed.load_state_dict(torch.load(tmp_path / "cb.pt", weights_only=False))
    restored = resumed.state_dict()["quantizers"]  # held until setup hooks the quantizer again
    assert restored["quantizer"]["low_streak"] == state["quantizers"]["quantizer"]["low_streak"] == [2, 2]
    with pytest.warns(UserWarning, match="collapsed"):
        _fit(UserVQCodec("vqp", collapse=True), resumed, steps=5)  # the third collapsing check
    assert ("codebook_collapse", 0) in _kinds(resumed)
    assert resumed.state_dict()["batches"] == 15


@pytest.mark.filterwarnings("ignore:CodebookMonitor. .* collapsed:UserWarning")
@pytest.mark.filterwarnings("ignore:CodebookMonitor. .* dead-code expiry has no effect:UserWarning")
def test_checkpoint_round_trip_through_a_trainer_matches_an_uninterrupted_run(tmp_path):
    """Fit 8 batches with a ModelCheckpoint, resume from it to 40: the monitor's state, its events (EnCodec's
    ineffective expiry, found after the resume) and every logged value equal those of one uninterrupted 40-batch run.
    The checkpoint falls mid-window (checks every 5 batches): the counts of batches 6-8 travel in the checkpoint."""
    from tests._helpers_user_codec import assert_same_state, resume_round_trip

    (full, full_logged), (resumed, resumed_logged) = resume_round_trip(
        tmp_path,
        lambda: UserVQCodec("encodec", expiry=True),
        lambda: CodebookMonitor(every_n_steps=5, window=3, expiry_window=8),
        steps=8,
        total=40,
        prefix="codebook/",
        batches=8,
    )
    assert "expiry_ineffective" in [k for k, _ in _kinds(full)]
    assert [e.step for e in full.event_log.events][0] >= 8  # after the checkpoint (at batch index 8)
    assert_same_state(resumed.state_dict(), full.state_dict())
    assert resumed_logged
    assert set(resumed_logged) == {s for s in full_logged if s >= 8}
    assert resumed_logged == {s: v for s, v in full_logged.items() if s >= 8}
