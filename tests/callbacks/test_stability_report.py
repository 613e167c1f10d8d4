import json
import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import WandbLogger
from PIL import Image

from lightning_stability.callbacks import StabilityReport
from lightning_stability.callbacks._events import EventLog
from tests._helpers_signal import read_wandb_history
from tests.helpers import FaultyModule, make_trainer, manual_optimization


class ScriptedSource(Callback):
    """A stand-in for a stability callback: records scripted events and traces with an ``event_log``; ``skips`` maps
    a step to ``(reason, cause)``: the report reads the cause, as it does the guard's ``data["cause"]``."""

    def __init__(self, name: str = "scripted", *, skips=(), grad_norms=None, weights=None, scales=None, **bounds):
        self.name = name
        self.skips = dict(skips)
        self.grad_norms = grad_norms or {}
        self.weights = weights or {}
        self.scales = scales or {}
        for key, value in bounds.items():
            setattr(self, key, value)
        self.event_log = EventLog(source=self.state_key)

    @property
    def state_key(self):
        return self._generate_state_key(name=self.name)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        step = trainer.global_step
        if step in self.grad_norms:
            self.event_log.trace("grad_norm", step, self.grad_norms[step])
        if step in self.skips:
            reason, cause = self.skips[step]
            self.event_log.add(step, "skip", reason, cause=cause, norm=math.inf)
        if step in self.weights:
            self.event_log.trace("weight", step, self.weights[step])
        if step in self.scales:
            self.event_log.trace("stage3/scale", step, self.scales[step])

    def state_dict(self):
        return {"event_log": self.event_log.state_dict()}

    def load_state_dict(self, state_dict):
        self.event_log.load_state_dict(state_dict["event_log"])


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


def _assert_png(path: Path) -> tuple[int, int]:
    assert path.is_file()
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        assert img.format == "PNG"
        return img.size


def test_report_lists_events_traces_and_the_loss_of_every_step(tmp_path):
    source = ScriptedSource(
        skips={3: ("non-finite gradient norm (inf)", "nonfinite")},
        grad_norms={s: 1.0 + s for s in range(8)},
        weights={s: 2.5 - 0.05 * s for s in range(8)},
    )
    report = StabilityReport(flush_every_n_steps=3)
    module = FaultyModule()
    make_trainer(tmp_path, [source, report], max_steps=8).fit(module)

    data = _load(tmp_path / "stability_report.json")
    assert data["schema_version"] == 1
    assert data["status"] == "finished"
    assert data["global_step"] == 8
    # the loss trace is every optimizer step's loss, read back from the device buffer in flushes of 3
    assert [p[0] for p in data["loss"]] == list(range(8))
    assert [p[1] for p in data["loss"]] == pytest.approx(module.step_losses, rel=1e-6)
    (src,) = data["sources"].values()
    assert src["callback"] == "ScriptedSource"
    assert [(e["step"], e["kind"]) for e in src["events"]] == [(3, "skip")]
    assert src["events"][0]["data"]["norm"] == "inf"
    summary = data["summary"]
    assert summary["skipped_steps"] == [
        {"step": 3, "reason": "non-finite gradient norm (inf)", "source": "ScriptedSource"}
    ]
    assert summary["skip_reasons"] == {"non-finite": 1}
    assert summary["weight_changes"]["ScriptedSource"]["first"] == 2.5
    assert summary["weight_changes"]["ScriptedSource"]["changes"] == 7
    assert data["panels"] == [
        "Gradient norm (marked: skipped steps, rollbacks, fp16 overflows)",
        "Training loss",
        "Loss weights",
    ]
    width, height = _assert_png(tmp_path / "stability_report.png")
    assert width >= 800
    assert height >= 3 * 200


def test_without_other_callbacks_it_reports_the_loss_only(tmp_path, caplog):
    module = FaultyModule()
    with caplog.at_level("INFO"):
        make_trainer(tmp_path, [StabilityReport()], max_steps=5).fit(module)
    data = _load(tmp_path / "stability_report.json")
    assert data["sources"] == {}
    assert data["panels"] == ["Training loss"]
    assert [p[1] for p in data["loss"]] == pytest.approx(module.step_losses, rel=1e-6)
    assert data["summary"]["recommendations"] == []
    _assert_png(tmp_path / "stability_report.png")
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "Stability report (finished, step 5" in text
    assert "skipped steps: 0" in text
    assert "recommendations: none" in text


def test_loss_under_gradient_accumulation_is_the_unnormalised_batch_loss(tmp_path):
    module = FaultyModule()
    make_trainer(tmp_path, [StabilityReport()], max_steps=3, accumulate_grad_batches=2).fit(module)
    data = _load(tmp_path / "stability_report.json")
    assert [p[0] for p in data["loss"]] == [0, 1, 2]
    # the last micro-batch of each optimizer step
    assert [p[1] for p in data["loss"]] == pytest.approx(module.step_losses[1::2], rel=1e-6)


def test_an_exception_still_writes_the_report(tmp_path):
    class Crashing(FaultyModule):
        def training_step(self, batch, batch_idx):
            if self.global_step == 4:
                raise RuntimeError("data loader produced garbage")
            return super().training_step(batch, batch_idx)

    source = ScriptedSource(skips={2: ("gradient norm 12.5 above max_norm 10", "over_max")})
    trainer = make_trainer(tmp_path, [source, StabilityReport(dirpath=tmp_path / "reports")], max_steps=8)
    with pytest.raises(RuntimeError, match="garbage"):
        trainer.fit(Crashing())
    data = _load(tmp_path / "reports" / "stability_report.json")
    assert data["status"] == "interrupted"
    assert data["exception"] == "RuntimeError: data loader produced garbage"
    assert [p[0] for p in data["loss"]] == [0, 1, 2, 3]  # step 4 raised before returning a loss
    assert data["summary"]["skip_reasons"] == {"norm above bound": 1}
    _assert_png(tmp_path / "reports" / "stability_report.png")


def test_resumed_run_report_covers_the_whole_run(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    first_module = FaultyModule()
    first = StabilityReport(dirpath=tmp_path / "first", flush_every_n_steps=3)
    make_trainer(tmp_path, [first, ckpt], max_steps=4, limit_train_batches=4, enable_checkpointing=True).fit(
        first_module
    )
    resumed_module = FaultyModule()
    resumed = StabilityReport(dirpath=tmp_path / "resumed", flush_every_n_steps=3)
    trainer = make_trainer(tmp_path, [resumed], max_steps=8, limit_train_batches=4)
    trainer.fit(resumed_module, ckpt_path=tmp_path / "ckpt" / "last.ckpt")

    stitched = _load(tmp_path / "resumed" / "stability_report.json")["loss"]
    assert [p[0] for p in stitched] == list(range(8))
    # steps 0-3 come from the interrupted run's checkpointed trace, 5-8 from the resumed run
    assert [p[1] for p in stitched] == pytest.approx(first_module.step_losses + resumed_module.step_losses, rel=1e-6)
    assert stitched[:4] == _load(tmp_path / "first" / "stability_report.json")["loss"]


def test_recommendations_follow_the_evidence(tmp_path):
    pinned = ScriptedSource("clamp", scales=dict.fromkeys(range(12), 1.5), min_scale=0.7, max_scale=1.5)
    skips = ScriptedSource(
        "guard",
        skips={
            1: ("non-finite gradient norm (nan)", "nonfinite"),
            2: ("inf gradient", "nonfinite"),
            3: ("NaN loss", "nonfinite"),
        },
        grad_norms={s: 1.0 * 2**s for s in range(12)},
    )
    ceiling = ScriptedSource(
        "mel", loss="mel", weights={s: min(2.5 + s, 5.0) for s in range(12)}, min_weight=1.0, max_weight=5.0
    )
    report = StabilityReport(warmup_steps=10)
    make_trainer(tmp_path, [pinned, skips, ceiling, report], max_steps=12).fit(FaultyModule())
    recs = report.last_report["summary"]["recommendations"]
    text = "\n".join(recs)
    assert "pinned at its upper bound 1.5" in text
    assert "residual path is collapsing" in text
    assert "3 non-finite gradient skips in the first 10 steps" in text
    assert "3 of 12 steps were skipped" in text
    assert "loss weight 'mel' ended at its ceiling 5" in text
    assert "gradient norm grew" in text
    assert "bf16" not in text  # no fp16 overflows, no precision advice
    assert report.last_report["panels"][-1] == "Scale factors"


def test_fp16_overflow_advice_needs_many_late_overflows():
    report = StabilityReport(warmup_steps=10)

    class _Trainer:
        global_step = 100
        current_epoch = 0
        precision = "16-mixed"
        callback_metrics = {}
        callbacks = []

    def make(steps):
        source = {"label": "guard", "callback": "GradientGuard", "events": [], "num_events": {}, "traces": {}}
        source["events"] = [{"step": s, "kind": "amp_overflow", "reason": "fp16 overflow"} for s in steps]
        return {"global_step": 100, "precision": "16-mixed", "sources": {"g": source}, "loss": []}

    early = make(range(10))  # calibration of the loss scale: normal
    assert report._summarise(_Trainer(), early)["recommendations"] == []
    late = make(range(20, 100, 4))
    (rec,) = report._summarise(_Trainer(), late)["recommendations"]
    assert "20 fp16 overflows after step 10" in rec
    assert "bf16-mixed" in rec


def test_wandb_gets_the_figure_and_the_event_table(tmp_path):
    logger = WandbLogger(offline=True, save_dir=str(tmp_path), project="report-test")
    source = ScriptedSource(
        skips={2: ("non-finite gradient norm (inf)", "nonfinite")}, grad_norms=dict.fromkeys(range(4), 1.0)
    )
    make_trainer(tmp_path, [source, StabilityReport()], max_steps=4, logger=logger).fit(FaultyModule())
    run_dir = Path(logger.experiment.dir).parent
    logger.experiment.finish()
    # with a WandbLogger the run directory is its save_dir
    _assert_png(tmp_path / "stability_report.png")
    assert list((run_dir / "files" / "media" / "images").rglob("*.png"))
    tables = list((run_dir / "files" / "media" / "table").rglob("*.json"))
    assert len(tables) == 1
    table = json.loads(tables[0].read_text())
    assert table["columns"] == ["step", "source", "kind", "reason"]
    assert table["data"] == [[2, "ScriptedSource", "skip", "non-finite gradient norm (inf)"]]
    rows = read_wandb_history(run_dir)
    assert any("stability_report/figure/_type" in r for r in rows)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"filename": "a/b"}, ValueError, r"`filename` must be a file stem without path separators, got 'a/b'"),
        ({"filename": ""}, ValueError, r"`filename` must be a non-empty string, got ''"),
        ({"filename": 3}, TypeError, r"`filename` must be a non-empty string, got 3"),
        ({"flush_every_n_steps": 0}, ValueError, r"`flush_every_n_steps` must be >= 1, got 0"),
        ({"flush_every_n_steps": 5.0}, TypeError, r"`flush_every_n_steps` must be an int, got 5.0"),
        ({"warmup_steps": -1}, ValueError, r"`warmup_steps` must be >= 0, got -1"),
        ({"warmup_steps": None}, TypeError, r"`warmup_steps` must be an int, got None"),
        ({"log_to_wandb": 1}, TypeError, r"`log_to_wandb` must be a bool, got 1"),
        ({"print_summary": "no"}, TypeError, r"`print_summary` must be a bool, got 'no'"),
        ({"dirpath": 3}, TypeError, r"`dirpath` must be a path or None, got 3"),
    ],
)
def test_argument_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        StabilityReport(**kwargs)


def test_state_key_and_state_round_trip():
    a = StabilityReport()
    assert a.state_key == "StabilityReport{'filename': 'stability_report'}"
    assert StabilityReport(filename="other").state_key != a.state_key
    for step in range(1, 4):
        a.event_log.trace("loss", step, 1.0 / step)
    b = StabilityReport()
    b.load_state_dict(a.state_dict())
    assert b.event_log.traces == a.event_log.traces
    assert b.state_dict() == a.state_dict()


def test_non_finite_losses_are_kept_and_written_as_strings(tmp_path):
    module = FaultyModule(nan_loss_steps={2})
    make_trainer(tmp_path, [StabilityReport()], max_steps=4).fit(module)
    data = _load(tmp_path / "stability_report.json")
    assert data["loss"][2] == [2, "nan"]
    assert torch.isnan(torch.tensor(module.step_losses[2]))
    _assert_png(tmp_path / "stability_report.png")


@pytest.mark.filterwarnings("ignore:GradientGuard skipped step:UserWarning")  # the injected inf gradient
def test_inf_gradient_skip_by_the_guard_is_in_the_report(tmp_path):
    from lightning_stability.callbacks import GradientGuard, SignalMonitor

    guard = GradientGuard()
    report = StabilityReport()
    module = FaultyModule(inf_grad_steps={3})
    make_trainer(tmp_path, [guard, SignalMonitor(train_every_n_steps=2), report], max_steps=8).fit(module)
    assert guard.num_skipped == 1

    data = _load(tmp_path / "stability_report.json")
    summary = data["summary"]
    assert summary["num_skipped"] == 1
    ((skip),) = summary["skipped_steps"]
    assert skip["step"] == 3
    assert skip["source"] == "guard"
    assert summary["skip_reasons"] == {"non-finite": 1}
    guard_view = data["sources"][guard.state_key]
    assert [(e["step"], e["kind"]) for e in guard_view["events"]] == [(3, "skip")]
    grad_norm = dict(guard_view["traces"]["grad_norm"])
    assert grad_norm[3] in ("inf", "nan")  # written as a string: JSON has no non-finite numbers
    assert all(math.isfinite(v) for s, v in grad_norm.items() if s != 3)
    assert data["loss"][3][0] == 3
    assert math.isfinite(data["loss"][3][1])  # the loss itself stayed finite; only the gradient was inf
    assert data["panels"][:2] == [
        "Gradient norm (marked: skipped steps, rollbacks, fp16 overflows)",
        "Training loss",
    ]
    assert "SNR / SI-SNR" in data["panels"]
    width, height = _assert_png(tmp_path / "stability_report.png")
    assert width >= 800
    assert height >= 4 * 200


_ManualFaulty = manual_optimization(FaultyModule)


def test_manual_optimization_loss_is_recorded_per_step(tmp_path):
    module = _ManualFaulty()
    make_trainer(tmp_path, [StabilityReport()], max_steps=5).fit(module)
    data = _load(tmp_path / "stability_report.json")
    assert [p[0] for p in data["loss"]] == list(range(5))
    assert [p[1] for p in data["loss"]] == pytest.approx(module.step_losses, rel=1e-6)


class _QuietModule(pl.LightningModule):
    """Output = 0.2 x target (RMS ratio exactly 0.2), logged by the module itself as ``val/rms_ratio`` (as the codec
    does) and measured by SignalMonitor as ``signal/val/rms_ratio``; one or two validation loaders."""

    def __init__(self, n_loaders=1):
        super().__init__()
        self.gain = torch.nn.Parameter(torch.zeros(()))
        self.n_loaders = n_loaders

    def _step(self, batch):
        preds = (0.2 + 0 * self.gain) * batch
        return {"loss": (preds - batch).abs().mean(), "preds": preds, "target": batch}

    def training_step(self, batch, batch_idx):
        return self._step(batch)

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        out = self._step(batch)
        self.log("val/rms_ratio", out["preds"].pow(2).mean().sqrt() / batch.pow(2).mean().sqrt())
        return out

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)

    def _loader(self, seed):
        return torch.utils.data.DataLoader(0.3 * torch.randn(4, 1, 400, generator=torch.Generator().manual_seed(seed)))

    def train_dataloader(self):
        return self._loader(0)

    def val_dataloader(self):
        return [self._loader(1 + i) for i in range(self.n_loaders)]


@pytest.mark.parametrize("n_loaders", [1, 2])
def test_one_piece_of_loudness_advice_per_loader_naming_every_key(tmp_path, n_loaders):
    from lightning_stability.callbacks import SignalMonitor

    report = StabilityReport(dirpath=tmp_path)
    callbacks = [SignalMonitor(), report]
    trainer = make_trainer(tmp_path, callbacks, max_steps=2, limit_val_batches=1.0, val_check_interval=2)
    trainer.fit(_QuietModule(n_loaders))
    advice = [r for r in report.last_report["summary"]["recommendations"] if "loudness does not match" in r]
    assert len(advice) == n_loaders
    for i, text in enumerate(advice):
        suffix = f"/dataloader_idx_{i}" if n_loaders > 1 else ""
        assert text.startswith(f"final signal/val/rms_ratio{suffix} = 0.2, val/rms_ratio{suffix} = 0.2: ")


def test_the_report_counts_skips_by_their_cause_never_by_the_reason_text(tmp_path):
    from lightning_stability.callbacks import EventLog as PublicEventLog
    from lightning_stability.callbacks import StabilityEvent

    assert PublicEventLog is EventLog
    # reasons reworded so that the old text rules would have said "spike" and "norm above bound"
    source = ScriptedSource(
        skips={1: ("a spike, reworded", "nonfinite"), 2: ("above everything", "nonfinite"), 3: ("odd", "my_cause")}
    )
    report = StabilityReport()
    make_trainer(tmp_path, [source, report], max_steps=5).fit(FaultyModule())
    summary = _load(tmp_path / "stability_report.json")["summary"]
    assert summary["skip_reasons"] == {"non-finite": 2, "my_cause": 1}
    assert isinstance(source.event_log.events[0], StabilityEvent)
    assert source.event_log.events[0].data["cause"] == "nonfinite"
