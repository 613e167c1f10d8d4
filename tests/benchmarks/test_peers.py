"""``benchmarks/peers.py``: the optimizer swap, the host-read counter and the comparisons it derives."""

from __future__ import annotations

import importlib
import json
import math

import pytest
import torch

from tests.benchmarks import _bench_path  # noqa: F401  (puts benchmarks/ on sys.path)

peers = importlib.import_module("peers")


def test_optimizer_replacement_keeps_groups_lr_and_rebinds_the_schedule():
    pytest.importorskip("pytorch_optimizer")
    module = peers.ScheduledMLP(lr=0.02, lr_at=peers._warmup(10, 0.1))
    peers._replace_optimizers(module, peers._pytorch_optimizer("SPAM"))
    out = module.configure_optimizers()
    opt, sched = out["optimizer"], out["lr_scheduler"]["scheduler"]
    assert type(opt).__name__ == "SPAM"
    assert sched.optimizer is opt  # the schedule drives the replacement, not the discarded Adam
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in module.parameters()}
    assert opt.param_groups[0]["lr"] == pytest.approx(0.02 * 0.1)  # the warm-up's first factor, as set on Adam
    assert opt.param_groups[0]["initial_lr"] == pytest.approx(0.02)
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.02 * (0.1 + 0.9 * 0.1))


def test_host_reads_are_counted_only_while_active_and_not_paused():
    counter = peers.HostReads()
    t = torch.tensor([1.0, 2.0])
    with counter:
        t.sum().item()
        t.tolist()
        bool(t[0] > 0)
        with counter.pause():
            float(t[0])
    assert counter.count == 3
    float(t[1])  # the patch is gone
    assert counter.count == 3
    assert torch.Tensor.item.__name__ == "item"


def _run(**kw):
    base = {"finished_finite": True, "relative_to_clean": None, "final_eval_loss": 1.0, "stopped_at": None,
            "failure_step": None, "first_nonfinite_loss_step": None, "first_warning": None, "interventions": 0,
            "intervention_steps": [], "median_step_ms": 10.0, "host_reads_total_per_step": 8.0,
            "skipped_steps": 0}  # fmt: skip
    return {**base, **kw}


def test_lead_time_recovery_and_cost_are_derived_against_plain():
    case = peers.PeerCase("x", "divergence", "", 300, lambda way: None, peers._none, None)
    runs = {
        "plain": _run(
            finished_finite=False, first_nonfinite_loss_step=200, interventions=None, intervention_steps=None
        ),
        "guard_z": _run(first_warning=150, interventions=3, intervention_steps=[150, 151, 170], median_step_ms=11.0,
                        host_reads_total_per_step=9.0),  # fmt: skip
        "spike_detection": _run(finished_finite=False, stopped_at=120, interventions=None, intervention_steps=None),
    }
    peers.analyse(case, runs, clean=1.0, recovery_window=100)
    assert runs["guard_z"]["lead_time"] == 50
    assert runs["spike_detection"]["lead_time"] == 80  # it stops the run at its detection
    assert runs["plain"]["lead_time"] is None
    assert runs["guard_z"]["step_time_ratio"] == pytest.approx(1.1)
    assert runs["guard_z"]["host_reads_per_step"] == pytest.approx(1.0)
    assert runs["plain"]["host_reads_per_step"] == 0.0

    switch = peers.PeerCase("s", "healthy", "", 300, lambda way: None, peers._none, None, switch_step=100)
    runs = {"plain": _run(interventions=None, intervention_steps=None),
            "guard_z": _run(intervention_steps=[100, 101, 106, 260]),
            "spike_detection": _run(finished_finite=False, stopped_at=101)}  # fmt: skip
    peers.analyse(switch, runs, clean=1.0, recovery_window=100)
    assert runs["guard_z"]["recovery_steps"] == 7  # the last intervention within the window after the switch
    assert runs["spike_detection"]["recovery_steps"] == "stopped at step 101"
    assert runs["plain"]["recovery_steps"] is None


def test_summary_counts_false_positives_and_names_peer_wins():
    failure = {"name": "f", "kind": "failure", "runs": {
        "plain": _run(finished_finite=False), "clip": _run(relative_to_clean=0.5),
        "guard_z": _run(relative_to_clean=0.02, skipped_steps=1)}}  # fmt: skip
    loses = {"name": "g", "kind": "failure", "runs": {
        "plain": _run(relative_to_clean=0.9), "clip": _run(relative_to_clean=0.01),
        "guard_z": _run(relative_to_clean=0.4)}}  # fmt: skip
    clean = {"name": "healthy_clean", "kind": "healthy", "runs": {
        "plain": _run(relative_to_clean=0.0), "clip": _run(relative_to_clean=0.0),
        "guard_z": _run(relative_to_clean=0.0, skipped_steps=2)}}  # fmt: skip
    s = peers.summarise([failure, loses, clean], ["plain", "clip", "guard_z"], tolerance=0.1)
    assert s["best_or_tied"] == {"f": True, "g": False}
    assert s["peer_wins"] == ["g: clip +1.0% vs guard_z +40.0%"]
    assert s["false_positive_skips"] == {"plain": 0, "clip": 0, "guard_z": 2}
    assert s["rescued_within_tolerance"] == {"plain": "0/2", "clip": "1/2", "guard_z": "1/2"}
    assert s["target_met"] is False
    assert math.isinf(peers._score(_run(finished_finite=False)))


def test_divergence_step_falls_back_to_the_held_out_loss_when_plain_stays_finite():
    plain = _run(eval_curve=[[190, 0.01], [200, 0.02], [210, 0.05], [220, 0.3], [230, "nan"]])
    assert peers.divergence_step(plain, 200) == (220, "first held-out loss of the plain run above 10x its value at "
                                                      "the onset")  # fmt: skip
    assert peers.divergence_step(_run(first_nonfinite_loss_step=215, eval_curve=[]), 200)[0] == 215


def test_reanalyse_recomputes_the_derived_fields_in_place(tmp_path):
    doc = {
        "command": "python benchmarks/peers.py --cases slow_divergence",
        "config": {"recovery_window": 100, "methods_run": ["plain", "guard_z"]},
        "cases": [{
            "name": "slow_divergence", "kind": "divergence", "description": "", "max_steps": 300, "fault_step": None,
            "switch_step": None, "onset_step": 100, "clean_final_eval_loss": 0.01,
            "runs": {
                "plain": _run(interventions=None, intervention_steps=None, eval_curve=[[100, 0.01], [150, 0.5]]),
                "guard_z": _run(intervention_steps=[40, 120, 130], first_warning=40),
            },
        }],
    }  # fmt: skip
    path = tmp_path / "peers.json"
    path.write_text(json.dumps(doc))
    assert peers.reanalyse(path, 0.1) == 0
    out = json.loads(path.read_text())
    guard = out["cases"][0]["runs"]["guard_z"]
    assert (guard["first_warning_after_onset"], guard["false_alarms_before_onset"], guard["lead_time"]) == (120, 1, 30)
    assert out["command"] == doc["command"]  # the measurement's own command stays; the reanalysis is noted apart
    assert "reanalysed" in out
