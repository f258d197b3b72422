"""The pictures: round ticks, their sizes, and where the scatter and the curves put what they draw."""
import math

import numpy as np
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
    records = [{"params": 500_000 + 1000 * i, "top1": 60 + i % 7, "loglik": -1 + i % 7 / 10, "generation": i // 10}
               for i in range(40)]
    front = [dict(records[0], val_top1=58.0), dict(records[6], val_top1=61.0)]
    for key in ("top1", "loglik"):
        picture = plot.search_scatter(records, front, key, (450_000, 560_000), (300_000, 900_000), "test")
        assert picture.size == (960, 600)


def pixels_of(image, hex_colour):
    """(x, y) of every pixel of `hex_colour` ("#rrggbb")."""
    rgb = [int(hex_colour[i:i + 2], 16) for i in (1, 3, 5)]
    rows, columns = np.nonzero((np.asarray(image) == rgb).all(-1))  # image: (H, W, 3)
    return list(zip(columns.tolist(), rows.tolist()))


def test_agreement_scatter_puts_each_point_in_its_colour_over_the_diagonal():
    # values 11..20, padded by 0.5 (the least pad): both axes span 10.5..20.5 over the plot area
    # x 70..580, y 530..60 (y up), so (x, y) lands at (70 + (x - 10.5) * 51, 530 - (y - 10.5) * 47)
    image = plot.agreement_scatter({"a": [(11, 19)], "b": [(20, 11)]}, "retrained", "inherited", "test")
    assert image.size == (600, 600)
    for name, hex_colour, (x, y) in (("a", plot.LINE_COLOURS[0], (11, 19)), ("b", plot.LINE_COLOURS[1], (20, 11))):
        dot = [p for p in pixels_of(image, hex_colour) if p[1] > 100]  # below the legend
        centre = (sum(p[0] for p in dot) / len(dot), sum(p[1] for p in dot) / len(dot))
        assert centre == pytest.approx((70 + (x - 10.5) * 51, 530 - (y - 10.5) * 47), abs=1), name
    assert image.getpixel((325, 295)) == (150, 150, 150)  # the diagonal at (15.5, 15.5)


def test_loss_curves_draw_every_run_in_its_colour():
    series = {"entangled": [(s, 2.3 / (1 + s / 50)) for s in range(0, 300, 10)],
              "classical": [(s, 2.5 / (1 + s / 80)) for s in range(0, 300, 10)]}
    image = plot.loss_curves(series, "test")
    assert image.size == (720, 420)
    for hex_colour in plot.LINE_COLOURS[:2]:
        assert len(pixels_of(image, hex_colour)) > 500  # a curve across the chart, not the legend alone
