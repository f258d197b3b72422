"""The pictures of the project, drawn with Pillow so that no plotting library is needed:
train.py's training curves, search.py's accuracy-against-parameters scatter, and reproduce.py's
training losses and inherited-against-retrained scatter.

They are pixel arithmetic, not what those scripts teach, so they live here, with the one rule they
share: axes carry round ticks (`ticks`, drawn by `frame`). Each returns a PIL image; the scripts
write it (atomically).
"""
import math

from PIL import Image, ImageDraw, ImageFont

LINE_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728")
PALETTE = ((68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37))  # viridis anchors
FRONT = (220, 40, 40)  # the Pareto front and the best subnet


def ticks(lo, hi, count=6):
    """Round tick values (steps of 1, 2 or 5 x 10^k) covering [lo, hi], about `count` of them."""
    raw = (hi - lo) / count
    step = min(m * 10**k for m in (1, 2, 5) for k in range(-6, 10) if m * 10**k >= raw)
    first = math.ceil(lo / step) * step
    n = math.floor((hi - first) / step + 1e-9) + 1
    return [first + i * step for i in range(n)] or [lo]  # [lo]: a range narrower than any step


def colour(t):
    """Viridis-like colour of t in [0, 1], linear between the anchors."""
    t = min(max(t, 0.0), 1.0) * (len(PALETTE) - 1)
    i = min(int(t), len(PALETTE) - 2)
    return tuple(round(a + (t - i) * (b - a)) for a, b in zip(PALETTE[i], PALETTE[i + 1]))


def frame(draw, box, x_range, y_range, xlabel, ylabel):
    """The frame of the plot area `box` (x0, y0, x1, y1) with round ticks on both axes, the x label
    below and the y label above its top-left corner. Returns pixel(x, y) -> the point in the box."""
    (x_lo, x_hi), (y_lo, y_hi) = x_range, y_range

    def pixel(x, y):
        return (box[0] + (x - x_lo) / (x_hi - x_lo) * (box[2] - box[0]),
                box[3] - (y - y_lo) / (y_hi - y_lo) * (box[3] - box[1]))

    draw.rectangle(box, outline="black")
    for x in ticks(x_lo, x_hi, 5):
        px = pixel(x, y_lo)[0]
        draw.line([(px, box[3]), (px, box[3] + 4)], fill="black")
        draw.text((px, box[3] + 6), f"{x:g}", fill="black", anchor="ma")
    for y in ticks(y_lo, y_hi, 5):
        py = pixel(x_lo, y)[1]
        draw.line([(box[0] - 4, py), (box[0], py)], fill="black")
        draw.text((box[0] - 6, py), f"{y:.4g}", fill="black", anchor="rm")
    draw.text(((box[0] + box[2]) / 2, box[3] + 38), xlabel, fill="black", anchor="ma")
    draw.text((box[0] - 52, box[1] - 22), ylabel, fill="black")
    return pixel


def line_chart(draw, left, series, xlabel, ylabel, size=(480, 320), margin=56, legend="left"):
    """One chart: `series` maps a name to its [(x, y), ...] points, drawn into a size[0] x size[1]
    box whose left edge is at x = `left`, with a frame, round ticks, labels and a legend in the
    top `legend` ("left" or "right") corner."""
    points = [p for s in series.values() for p in s]
    if not points:
        return
    width, height = size
    x_lo, x_hi = min(p[0] for p in points), max(p[0] for p in points)
    y_lo, y_hi = min(p[1] for p in points), max(p[1] for p in points)
    x_hi, y_hi = max(x_hi, x_lo + 1e-9), max(y_hi, y_lo + 1e-9)
    box = (left + margin, 24, left + width - 16, height - margin)  # plot area: x0, y0, x1, y1
    pixel = frame(draw, box, (x_lo, x_hi), (y_lo, y_hi), xlabel, ylabel)
    for i, (name, pts) in enumerate(series.items()):
        colour_i = LINE_COLOURS[i % len(LINE_COLOURS)]
        draw.line([pixel(*p) for p in pts] if len(pts) > 1 else [pixel(*pts[0])] * 2, fill=colour_i, width=2)
        at, anchor = ((box[0] + 8, "la") if legend == "left" else (box[2] - 8, "ra"))
        draw.text((at, box[1] + 6 + 14 * i), name, fill=colour_i, anchor=anchor)


def training_curves(history):
    """train.py's OUT/curves.png: the logged training loss by step (left) and the fixed subnets'
    top-1 on the held-out split by epoch (right)."""
    image = Image.new("RGB", (960, 320), "white")
    draw = ImageDraw.Draw(image)
    line_chart(draw, 0, {"train loss": history["loss"]}, "step", "training loss")
    accuracy = {name: [(e["epoch"], e["top1"][name]) for e in history["epochs"]]
                for name in (history["epochs"][0]["top1"] if history["epochs"] else {})}
    line_chart(draw, 480, accuracy, "epoch", "top-1 % on minival")
    return image


def search_scatter(records, front, key, band, space_range, title):
    """search.py's OUT/search.png: the held-out fitness `key` ("top1" or "loglik") against parameters
    for every scored subnet, coloured by generation; the Pareto front as a staircase, the parameter
    window shaded, the best subnet ringed. `band` is the window and `space_range` the space's
    smallest and largest counts."""
    W, H, box = 960, 600, (90, 70, 800, 530)  # plot area x0, y0, x1, y1
    image = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(image)
    font, small = ImageFont.load_default(16), ImageFont.load_default(13)
    pad = (min(band[1], space_range[1]) - max(band[0], space_range[0])) / 3  # show the window's edges
    x_lo, x_hi = max(band[0] - pad, space_range[0]) / 1e6, min(band[1] + pad, space_range[1]) / 1e6
    scores = [r[key] for r in records]
    y_pad = 2 if key == "top1" else (max(scores) - min(scores)) / 20 or 0.1
    y_lo, y_hi = min(scores) - y_pad, max(scores) + y_pad
    if key == "top1":
        y_lo, y_hi = max(y_lo, 0), min(y_hi, 100)
    px = lambda x: box[0] + (x - x_lo) / (x_hi - x_lo) * (box[2] - box[0])  # noqa: E731
    py = lambda y: box[3] - (y - y_lo) / (y_hi - y_lo) * (box[3] - box[1])  # noqa: E731
    band_lo, band_hi = max(band[0] / 1e6, x_lo), min(band[1] / 1e6, x_hi)
    draw.rectangle((px(band_lo), box[1], px(band_hi), box[3]), fill=(232, 232, 238))
    draw.text((px(band_lo) + 4, box[1] + 4), "--params window", fill=(110, 110, 130), font=small)
    for x in ticks(x_lo, x_hi):
        draw.line((px(x), box[3], px(x), box[3] + 5), fill="black")
        draw.text((px(x), box[3] + 8), f"{x:g}", fill="black", anchor="ma", font=small)
    for y in ticks(y_lo, y_hi, 8):
        draw.line((box[0], py(y), box[2], py(y)), fill=(222, 222, 222))
        draw.text((box[0] - 8, py(y)), f"{y:g}", fill="black", anchor="rm", font=small)
    last = max(r["generation"] for r in records) or 1
    for r in records:  # oldest first: the later generations lie on top
        x, y = px(r["params"] / 1e6), py(r[key])
        draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=colour(r["generation"] / last))
    steps = []
    for r in front:  # a staircase: the best fitness reachable with at most x parameters
        x, y = px(r["params"] / 1e6), py(r[key])
        steps += [(x, steps[-1][1]), (x, y)] if steps else [(x, y)]
    draw.line(steps + [(px(band_hi), steps[-1][1])], fill=FRONT, width=2)
    best = front[-1]
    x, y = px(best["params"] / 1e6), py(best[key])
    draw.ellipse((x - 8, y - 8, x + 8, y + 8), outline=FRONT, width=2)
    draw.text((x - 10, y - 10), f"best: held-out top-1 {best['top1']:.1f}%, val {best['val_top1']:.1f}%", fill=FRONT,
              anchor="rb", font=small)
    draw.rectangle(box, outline="black")
    draw.text(((box[0] + box[2]) / 2, box[3] + 30), "parameters (M)", fill="black", anchor="ma", font=font)
    label = "held-out top-1 (%)" if key == "top1" else "held-out mean log-likelihood of the right class"
    draw.text((box[0], box[1] - 6), label, fill="black", anchor="ld", font=font)
    draw.text((W / 2, 20), title, fill="black", anchor="ma", font=font)
    bar = (850, box[1] + 30, 875, box[3] - 30)  # the colour bar: generation 0 at the bottom
    for i in range(bar[1], bar[3] + 1):
        draw.line((bar[0], i, bar[2], i), fill=colour((bar[3] - i) / (bar[3] - bar[1])))
    draw.rectangle(bar, outline="black")
    for g in sorted({round(g) for g in ticks(0, last, 4)}):
        draw.text((bar[2] + 6, bar[3] - g / last * (bar[3] - bar[1])), str(g), fill="black", anchor="lm", font=small)
    draw.text(((bar[0] + bar[2]) / 2, bar[1] - 10), "generation", fill="black", anchor="md", font=small)
    draw.line((bar[0] - 20, bar[3] + 30, bar[0] + 2, bar[3] + 30), fill=FRONT, width=2)
    draw.text((bar[0] + 6, bar[3] + 30), "Pareto front", fill="black", anchor="lm", font=small)
    return image


def loss_curves(series, title):
    """reproduce.py's training-loss picture: the logged loss by step of each run in `series`
    (name -> [(step, loss), ...]), in one chart, so that runs of the same steps compare point by point."""
    image = Image.new("RGB", (720, 420), "white")
    draw = ImageDraw.Draw(image)
    line_chart(draw, 0, series, "step", "training loss", size=(720, 400), legend="right")  # a loss falls from the left
    draw.text((360, 404), title, fill="black", anchor="ma")
    return image


def agreement_scatter(series, xlabel, ylabel, title):
    """reproduce.py's scatter of two measurements of the same items: each series (name -> [(x, y),
    ...]) in its colour, over the diagonal y = x. Both axes span the same range, so a point's
    distance from the diagonal is how far its two numbers disagree."""
    image = Image.new("RGB", (600, 600), "white")
    draw = ImageDraw.Draw(image)
    values = [v for points in series.values() for point in points for v in point]
    pad = max((max(values) - min(values)) * 0.05, 0.5)
    lo, hi = min(values) - pad, max(values) + pad
    box = (70, 60, 580, 530)  # plot area: x0, y0, x1, y1
    pixel = frame(draw, box, (lo, hi), (lo, hi), xlabel, ylabel)
    draw.line([pixel(lo, lo), pixel(hi, hi)], fill=(150, 150, 150), width=1)
    for i, (name, points) in enumerate(series.items()):
        fill = LINE_COLOURS[i % len(LINE_COLOURS)]
        for x, y in points:
            px, py = pixel(x, y)
            draw.ellipse((px - 4, py - 4, px + 4, py + 4), fill=fill)
        draw.text((box[0] + 8, box[1] + 6 + 14 * i), name, fill=fill)
    draw.text((300, 8), title, fill="black", anchor="ma")
    return image
