"""Lead time: does the first-moment norm warn of a slow divergence earlier than the gradient norm does?

Marin's 32B runs saw Adam update-norm spikes (first moment x2, second moment flat) before loss spikes. This script
measures the claim on ``benchmarks/peers.py``'s ``slow_divergence`` case (an MLP on a Gaussian NLL whose learning
rate grows every step until the loss overflows):

1. ``plain`` and a logging-only guard, ``GradientGuard(track_first_moment=True)`` (no z-score: it skips only
   non-finite steps), whose ``event_log`` traces hold the gradient norm and the bias-corrected first-moment norm of
   every step (logged with no extra host read). The guard's own z-score rule (``guard._policy.evaluate`` /
   ``update_stats``, the defaults ``alpha=0.97``, ``warmup=25``, ``rebase_after=8``) is replayed on each trace for
   several thresholds: the first step it flags at or after the onset (the step the lr starts growing) is that
   signal's warning, earlier flags are false alarms; lead time = the plain run's first non-finite loss step minus the
   warning step (``peers.divergence_step``: the plain run's first non-finite loss, or its first held-out loss above
   10x the value at the onset).
2. Live runs that act on each signal: ``GradientGuard(zscore=2.5)`` (gradient norm),
   ``GradientGuard(first_moment_zscore=2.5)`` (first moment), and both; their first skip, skips and outcome.

JSON (``benchmarks/results/lead_time.json``; common layout in ``benchmarks/_common.py``)::

    cases: [{"name": "slow_divergence", "plain_first_nonfinite_loss_step",
             "replayed": [{"signal", "zscore", "first_warning_after_onset", "lead_time", "false_alarms_before_onset"}],
             "live": {method: {...peers.run_one fields..., "lead_time"}}}]
    summary: {"target", "target_met" (the first moment warns earlier at z 2.5), "lead_time_grad_norm",
              "lead_time_first_moment"}

Usage::

    python benchmarks/lead_time.py            # the full-mode case (600 steps, lr x1.02 per step)
    python benchmarks/lead_time.py --quick    # the quick-mode case (300 steps, x1.04)
"""

from __future__ import annotations

import time
from typing import Any

import _common
import peers

ZSCORES = (2.5, 3.0, 6.0)
SIGNALS = {"grad_norm": "gradient norm", "first_moment_norm": "first-moment norm (bias-corrected)"}


def replay(trace: list[tuple[int, float]], zscore: float, onset: int) -> tuple[int | None, int]:
    """The first step at or after ``onset`` that the guard's z-score rule flags on ``trace`` (a spike, or a rebase
    after a streak), and how many steps it flagged before ``onset`` (false alarms: the lr was still constant)."""
    from lightning_stability.callbacks.guard._policy import Action, NormStats, PolicyConfig, evaluate, update_stats

    cfg = PolicyConfig(zscore=zscore, alpha=0.97, warmup=25, rebase_after=8)
    stats = NormStats()
    false_alarms = 0
    for step, value in trace:
        decision = evaluate(value, stats, cfg)
        if decision.action in (Action.SPIKE, Action.REBASE):
            if step >= onset:
                return step, false_alarms
            false_alarms += 1
        stats = update_stats(stats, decision, value, cfg)
    return None, false_alarms


def _guard_method(name: str, **kwargs: Any) -> peers.Method:
    return peers.Method(name, f"GradientGuard({', '.join(f'{k}={v!r}' for k, v in kwargs.items())})", None,
                        lambda: peers._guard(**kwargs))  # fmt: skip


def main() -> int:
    p = _common.parser("lead_time", __doc__.splitlines()[0])
    args = p.parse_args()
    _common.setup_run(args)
    started = time.perf_counter()
    machine = _common.machine_info()
    case = next(c for c in peers.make_cases(args.quick, args.seed) if c.name == "slow_divergence")
    tail, eval_every = (5, 10) if args.quick else (10, 10)
    holder: dict[str, Any] = {}

    def make_tracker() -> peers.Setup:
        setup = peers._guard(track_first_moment=True)
        holder["guard"] = setup.callbacks[0]
        return setup

    tracker = peers.Method("guard_track", "GradientGuard(track_first_moment=True)", None, make_tracker)
    live = [
        _guard_method("guard_z", zscore=2.5),
        _guard_method("guard_first_moment", first_moment_zscore=2.5),
        _guard_method("guard_both", zscore=2.5, first_moment_zscore=2.5),
    ]
    with peers.READS:
        plain = peers.run_one(case, peers.METHODS[0], tail=tail, eval_every=eval_every)
        tracked = peers.run_one(case, tracker, tail=tail, eval_every=eval_every)
        runs = {"plain": plain, "guard_track": tracked}
        runs.update({m.name: peers.run_one(case, m, tail=tail, eval_every=eval_every) for m in live})
    clean = peers.run_one(case, peers.METHODS[0], tail=tail, eval_every=eval_every, way="clean")["final_eval_loss"]
    peers.analyse(case, runs, clean, recovery_window=0)
    reference, reference_kind = peers.divergence_step(plain, case.onset_step)
    traces = holder["guard"].event_log.traces
    replayed = []
    for signal in SIGNALS:
        for z in ZSCORES:
            warn, false_alarms = replay(traces.get(signal, []), z, case.onset_step or 0)
            lead = reference - warn if reference is not None and warn is not None else None
            replayed.append({"signal": signal, "zscore": z, "first_warning_after_onset": warn, "lead_time": lead,
                             "false_alarms_before_onset": false_alarms})  # fmt: skip
    by = {(r["signal"], r["zscore"]): r["lead_time"] for r in replayed}
    g, m = by[("grad_norm", 2.5)], by[("first_moment_norm", 2.5)]
    summary = {
        "target": "the first-moment norm warns earlier than the gradient norm (z 2.5, replayed on the same run)",
        "target_met": bool(g is not None and m is not None and m > g),
        "lead_time_grad_norm": g,
        "lead_time_first_moment": m,
        "live_lead_time": {k: runs[k].get("lead_time") for k in runs if k.startswith("guard_")},
    }
    cases = [{
        "name": case.name,
        "description": case.description,
        "max_steps": case.max_steps,
        "onset_step": case.onset_step,
        "plain_first_nonfinite_loss_step": plain["first_nonfinite_loss_step"],
        "reference_step": reference,
        "reference": reference_kind,
        "clean_final_eval_loss": clean,
        "replayed": replayed,
        "signals": SIGNALS,
        "live": runs,
        "traces_every_10_steps": {k: v[::10] for k, v in traces.items() if k in SIGNALS},
    }]  # fmt: skip
    config = {"quick": args.quick, "seed": args.seed, "zscores": list(ZSCORES),
              "methods": {m.name: m.description for m in [tracker, *live]}}  # fmt: skip
    out = _common.write_result(
        "lead_time", args, config=config, cases=cases, summary=summary, started=started, machine=machine
    )
    print(f"lead_time: plain failed at step {reference} ({reference_kind}); warning lead (z 2.5): gradient norm {g},"
          f" first moment {m} -> {out}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
