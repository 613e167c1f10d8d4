import math

import pytest

from lightning_stability.callbacks._events import EventLog


def test_events_are_bounded_and_counted():
    log = EventLog("guard", max_events=3)
    for step in range(5):
        log.add(step, "skip", "non-finite gradient", norm=float("inf"))
    assert [e.step for e in log.events] == [2, 3, 4]
    assert log.num_events == {"skip": 5}


def test_trace_thins_to_fixed_memory_and_keeps_the_whole_run():
    log = EventLog("guard", max_trace_points=8)
    for step in range(100):
        log.trace("grad_norm", step, float(step))
    series = log.traces["grad_norm"]
    assert len(series) < 8
    assert series[0] == (0, 0.0)
    assert series[-1][0] >= 64  # the end of the run is still represented
    steps = [s for s, _ in series]
    assert steps == sorted(steps)


def test_state_round_trip_continues_identically():
    a = EventLog("x", max_trace_points=8)
    for step in range(20):
        a.trace("t", step, step * 0.5)
        if step % 7 == 0:
            a.add(step, "warn", "because", v=step)
    b = EventLog("x", max_trace_points=8)
    b.load_state_dict(a.state_dict())
    for step in range(20, 40):
        a.trace("t", step, step * 0.5)
        b.trace("t", step, step * 0.5)
    assert a.traces == b.traces
    assert list(a.events) == list(b.events)


def test_json_view_has_no_bare_non_finite_floats():
    log = EventLog("guard")
    log.add(1, "skip", "inf", norm=math.inf)
    log.trace("grad_norm", 1, math.nan)
    view = log.to_json()
    assert view["events"][0]["data"]["norm"] == "inf"
    assert view["traces"]["grad_norm"][0][1] == "nan"


@pytest.mark.parametrize(
    ("kwargs", "name"), [({"max_events": 0}, "max_events"), ({"max_trace_points": 1}, "max_trace_points")]
)
def test_bad_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        EventLog("x", **kwargs)
