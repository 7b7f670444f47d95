"""Skip actions: the forecast of a block's update equals its closed form on synthetic histories."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from elastic_compile.cache import DeviceEntry, HostEntry
from elastic_compile.cache.forecast import history_points, lagrange_weight_rows, lagrange_weights
from elastic_compile.cache.rules import POINTS
from elastic_compile.errors import ConfigError

steps = st.lists(st.integers(0, 40), min_size=1, max_size=3, unique=True).map(sorted)


@settings(max_examples=200, deadline=None)
@given(stamps=steps, ahead=st.integers(1, 6), coefficients=st.lists(st.floats(-3, 3), min_size=3, max_size=3))
def test_polynomial_of_degree_below_the_points_is_reproduced(stamps, ahead, coefficients):
    """A history sampled from a polynomial of degree len(stamps) - 1 is extrapolated exactly."""
    degree = len(stamps) - 1
    poly = lambda t: sum(c * t ** k for k, c in enumerate(coefficients[:degree + 1]))  # noqa: E731
    at = stamps[-1] + ahead
    forecast = sum(w * poly(t) for w, t in zip(lagrange_weights(stamps, at), stamps))
    assert forecast == pytest.approx(poly(at), rel=1e-6, abs=1e-6 * (1 + abs(poly(at))))


@settings(max_examples=100, deadline=None)
@given(stamps=steps, at=st.integers(0, 60))
def test_weights_sum_to_one(stamps, at):
    assert math.fsum(lagrange_weights(stamps, at)) == pytest.approx(1.0, abs=1e-9)


def test_closed_forms_of_each_action():
    """reuse = last update; first order = d1 + (d1 - d0) (t - t1) / (t1 - t0); second order through three points."""
    d0, d1, d2 = torch.randn(3, 2, 5, generator=torch.Generator().manual_seed(0)).unbind(0)
    assert lagrange_weights([7], 9) == [1.0]
    w = lagrange_weights([3, 5], 8)
    assert torch.allclose(w[0] * d0 + w[1] * d1, d1 + (d1 - d0) * (8 - 5) / (5 - 3), atol=1e-6)
    w = lagrange_weights([1, 2, 3], 4)  # equal spacing: the classic 1, -3, 3 extrapolation
    assert w == pytest.approx([1.0, -3.0, 3.0])
    assert history_points("reuse") == 1 and history_points("forecast") == 2 and history_points("forecast2") == 3
    with pytest.raises(ConfigError):
        history_points("taylor")


@settings(max_examples=60, deadline=None)
@given(rows=st.lists(st.tuples(steps, st.integers(1, 5)), min_size=1, max_size=4))
def test_device_weights_equal_host_weights(rows):
    """The tensor form (B, H) with per-row counts gives each row the host weights, zeros on unused slots."""
    depth = 3
    stamps = torch.zeros(len(rows), depth, dtype=torch.float64)
    count = torch.tensor([len(s) for s, _ in rows])
    at = torch.tensor([float(s[-1] + ahead) for s, ahead in rows], dtype=torch.float64)
    for i, (s, _) in enumerate(rows):
        stamps[i, depth - len(s):] = torch.tensor(s, dtype=torch.float64)
    weights = lagrange_weight_rows(stamps, count, at)
    for i, (s, ahead) in enumerate(rows):
        expected = [0.0] * (depth - len(s)) + lagrange_weights(s, s[-1] + ahead)
        assert weights[i].tolist() == pytest.approx(expected, abs=1e-9)


@settings(max_examples=80, deadline=None)
@given(rows=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3), st.sampled_from(sorted(POINTS))),
                     min_size=1, max_size=5),
       min_points=st.sampled_from([1, 2]), max_reuse=st.integers(1, 3))
def test_host_and_device_entries_agree_on_which_stand_ins_can_serve(rows, min_points, max_reuse):
    """A stand-in serves where the sample has as many stored updates as its action reads, but never fewer than
    one nor more than ``min_points`` are required, and fewer than ``max_reuse`` stand-ins ran in a row."""
    batch = len(rows)
    host = HostEntry(batch, depth=3)
    host.stamps = [list(range(count)) for count, _, _ in rows]
    host.streak = [streak for _, streak, _ in rows]
    device = DeviceEntry({0: torch.zeros(batch, 2)}, batch, depth=3)
    device.count = torch.tensor([count for count, _, _ in rows])
    device.streak = torch.tensor([streak for _, streak, _ in rows])
    choice = [code for _, _, code in rows]
    expected = [count >= max(1, min(POINTS[code], min_points)) and streak < max_reuse for count, streak, code in rows]
    assert host.usable(max_reuse, choice, min_points) == expected
    assert device.usable(max_reuse, torch.tensor(choice), min_points).tolist() == expected
