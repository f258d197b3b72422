"""The pictures: round ticks, and their sizes."""
import math

import pytest

import plot


@pytest.mark.parametrize("lo, hi, count", [(0, 2990, 6), (1, 20, 5), (0.27, 2.31, 5), (30.8, 88.2, 5), (-3, 7, 4)])
def test_ticks_are_round_evenly_spaced_and_inside_the_range(lo, hi, count):
    values = plot.ticks(lo, hi, count)
    step = values[1] - values[0]
    mantissa = step / 10 ** math.floor(math.log10(step))
    assert round(mantissa, 6) in (1, 2, 5)
    assert all(abs(b - a - step) < 1e-9 * step for a, b in zip(values, values[1:]))
    assert lo <= values[0] < lo + step and hi - step < values[-1] <= hi + 1e-9
    assert count / 2.5 <= len(values) <= count + 1


def test_ticks_of_a_range_narrower_than_any_step_is_its_start():
    assert plot.ticks(1.0, 1.0 + 1e-9, 5) == [1.0]


def test_pictures_are_drawn_to_their_sizes():
    history = {"loss": [(s, 2.3 / (1 + s / 50)) for s in range(0, 300, 10)],
               "epochs": [{"epoch": e, "top1": {"smallest": 20.0 + e, "largest": 25.0 + 2 * e}} for e in (1, 2, 3)]}
    assert plot.training_curves(history).size == (960, 320)
    records = [{"params": 500_000 + 1000 * i, "top1": 60 + i % 7, "generation": i // 10} for i in range(40)]
    front = [dict(records[0], val_top1=58.0), dict(records[6], val_top1=61.0)]
    assert plot.search_scatter(records, front, (450_000, 560_000), (300_000, 900_000), "test").size == (960, 600)
