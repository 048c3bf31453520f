"""LoadMeter and ShortLoad: concurrency per window, shared by the plugin and the simulator."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from warmserve.policy.load import LoadMeter, ShortLoad


def test_average_and_peak_over_windows():
    m = LoadMeter(window=10)
    m.arrive("a", 1)
    m.arrive("a", 2)
    m.depart("a", 6)
    m.depart("a", 15)
    w = m.close_until(30)
    assert [(x.index, x.avg, x.peak) for x in w] == [(0, 1.3, 2.0), (1, 0.5, 1.0), (2, 0.0, 0.0)]


def test_quiet_windows_are_reported_and_nothing_twice():
    m = LoadMeter(window=5)
    m.arrive("a", 0)
    m.depart("a", 1)
    first = m.close_until(12)
    assert [x.index for x in first] == [0, 1]
    assert m.close_until(12) == []
    assert [x.index for x in m.close_until(15)] == [2]


def test_short_load_is_the_last_window_floored_by_what_is_in_flight():
    s = ShortLoad(window=10)
    s.arrive("a", 0)
    s.arrive("b", 1)
    s.depart("a", 5)  # a: mean 0.5 over [0, 10); b stays in flight
    assert s.load(None) == {"b": 1.0}  # nothing closed yet: only what is in flight
    assert s.load(10) == {"a": 0.5, "b": 1.0}
    s.arrive("b", 12)
    assert s.load() == {"a": 0.5, "b": 2.0}  # in flight beats b's closed mean of 0.9
    s.depart("b", 14)
    s.depart("b", 16)
    assert s.load(20) == {"b": 0.8}  # a's empty window drops it; nothing in flight


def test_depart_without_arrival_is_an_error():
    m = LoadMeter(window=5)
    with pytest.raises(ValueError, match="no request in flight"):
        m.depart("a", 1)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 100), st.floats(0.01, 30)), min_size=1, max_size=40))
def test_integral_matches_a_fine_grid(reqs):
    """The windows' averages integrate the same load as a brute-force step function."""
    events = sorted([(s, 1) for s, _ in reqs] + [(s + d, -1) for s, d in reqs])
    m = LoadMeter(window=7)
    for t, kind in events:
        (m.arrive if kind == 1 else m.depart)("x", t)
    windows = m.close_until(140)
    total = sum(w.avg * 7 for w in windows)
    assert total == pytest.approx(sum(d for _, d in reqs), rel=1e-9, abs=1e-9)
    grid = np.arange(0, 140, 0.01)
    level = sum(((grid >= s) & (grid < s + d)).astype(int) for s, d in reqs)
    for w in windows:
        inside = level[(grid >= w.index * 7) & (grid < (w.index + 1) * 7)]
        assert w.peak >= inside.max()
