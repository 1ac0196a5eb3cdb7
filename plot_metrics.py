"""Plots a training run's ``metrics.jsonl`` as a PNG: loss, top-1 accuracy and learning rate.

    python plot_metrics.py OUTPUT_DIR/metrics.jsonl [-o curves.png]
    python plot_metrics.py OUTPUT_DIR [-o curves.png]     # the same: a run's output folder

Each line of the file is one JSON object with at least ``kind`` ('train' or 'val'), ``epoch``,
``step``, ``lr``, ``loss``, ``acc1``, ``acc5``, ``images_per_sec`` and ``time``; metrics may be
null (e.g. train accuracy under mixup) and are then left out. Other kinds are ignored. Val
records of different ``model`` values (the model and its EMA) are drawn as separate curves.
The x axis is the global step when the steps never decrease through the file (one run),
otherwise the epoch (e.g. a resumed run that repeated steps). Needs only Pillow.
"""
import argparse
import json
import math
import os
import sys

from PIL import Image, ImageDraw, ImageFont

__all__ = ['MetricsError', 'read_metrics', 'plot_metrics', 'main']

METRICS_FILE = 'metrics.jsonl'  # the name training gives the file in its output folder
KINDS = ('train', 'val')
# curve colours in legend order: train, val, then e.g. 'val ema'
COLORS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189))
# (metric, title, kinds plotted); the learning rate is the training one
PANELS = (('loss', 'loss', KINDS), ('acc1', 'top-1 accuracy (%)', KINDS), ('lr', 'learning rate', ('train',)))
PANEL_SIZE = (420, 320)  # pixels per panel; the image puts the three side by side
MARGIN = dict(left=62, right=14, top=30, bottom=40)
BACKGROUND = (255, 255, 255)
INK = (40, 40, 40)
GRID = (225, 225, 225)


class MetricsError(ValueError):
    """A metrics file that cannot be plotted; the message names the file and line."""


def metrics_path(path):
    """``path``, or for a folder (a training run's output) its ``METRICS_FILE``, which must exist."""
    if not os.path.isdir(path):
        return path
    metrics = os.path.join(path, METRICS_FILE)
    if not os.path.isfile(metrics):
        raise MetricsError(f'{path}: the folder has no {METRICS_FILE}')
    return metrics


def read_metrics(path):
    """Returns the 'train' and 'val' records of ``path`` as dicts, in file order."""
    if not os.path.isfile(path):
        raise MetricsError(f'{path}: no such file')
    records = []
    with open(path, encoding='utf-8', errors='replace') as f:  # bytes that are not UTF-8: invalid JSON below
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise MetricsError(f'{path}:{lineno}: not valid JSON ({e.msg})') from None
            if not isinstance(record, dict):
                raise MetricsError(f'{path}:{lineno}: expected a JSON object, got {type(record).__name__}')
            for key in ('kind', 'epoch', 'step'):
                if key not in record:
                    raise MetricsError(f'{path}:{lineno}: missing "{key}"')
            if record['kind'] not in KINDS:
                continue
            for key in ('epoch', 'step'):  # the x axis: always there
                if not _is_number(record[key]) or not math.isfinite(record[key]):
                    raise MetricsError(f'{path}:{lineno}: "{key}" must be a finite number, got {record[key]!r}')
            for key in (panel[0] for panel in PANELS):  # null, or not finite: not drawn
                value = record.get(key)
                if value is not None and not _is_number(value):
                    raise MetricsError(f'{path}:{lineno}: "{key}" must be a number, got {value!r}')
            records.append(record)
    if not records:
        raise MetricsError(f'{path}: no train or val records')
    return records


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def x_axis(records):
    """('step' or 'epoch'): step if it never decreases through the records, else epoch."""
    steps = [r['step'] for r in records]
    return 'step' if all(a <= b for a, b in zip(steps, steps[1:])) else 'epoch'


def curve_name(record):
    """'train', 'val', or 'val <model>' for val records of another model than the trained one."""
    model = record.get('model')
    return record['kind'] if model in (None, 'model') else f"{record['kind']} {model}"


def curves(records, key, kinds, x_key):
    """{curve name: [(x, value), ...]} of one metric, for records of ``kinds``; null and
    non-finite values are skipped."""
    out = {}
    for r in records:
        if r['kind'] in kinds and r.get(key) is not None and math.isfinite(r[key]):
            out.setdefault(curve_name(r), []).append((r[x_key], r[key]))
    return out


def nice_ticks(lo, hi, count=5):
    """About ``count`` round tick values (1, 2 or 5 times a power of ten apart) covering [lo, hi]."""
    if hi <= lo:
        pad = abs(lo) * 0.05 or 1.0
        lo, hi = lo - pad, hi + pad
    raw = (hi - lo) / count
    base = 10 ** math.floor(math.log10(raw))
    step = next(m * base for m in (1, 2, 5, 10) if m * base >= raw)
    first = math.floor(lo / step) * step
    ticks = []
    k = 0
    while first + k * step <= hi + step * 1e-9:
        ticks.append(first + k * step)
        k += 1
    if ticks[-1] < hi:
        ticks.append(ticks[-1] + step)
    return ticks


def tick_labels(ticks):
    """Labels for evenly spaced ``ticks``: fixed-point with as many decimals as the spacing needs,
    or short scientific notation (e.g. ``5e-4``) for axes of very small or very large values."""
    step = ticks[1] - ticks[0]
    largest = max(abs(t) for t in ticks)
    if 1e-2 <= largest < 1e5:
        decimals = max(0, -math.floor(math.log10(step) + 1e-9))
        return [f'{t:.{decimals}f}' for t in ticks]
    for digits in range(1, 8):
        labels = [_scientific(t, digits) for t in ticks]
        if len(set(labels)) == len(labels):
            break
    return labels


def _scientific(value, digits):
    """``value`` with ``digits`` significant digits as mantissa 'e' exponent, no padding zeros."""
    if abs(value) < 1e-300:
        return '0'
    mantissa, exponent = f'{value:.{digits - 1}e}'.split('e')
    if '.' in mantissa:
        mantissa = mantissa.rstrip('0').rstrip('.')
    return f'{mantissa}e{int(exponent)}'


def load_font(size):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed-size bitmap font
        return ImageFont.load_default()


def draw_panel(draw, origin, title, lines, colors, x_label, font):
    """Draws one panel at pixel ``origin``: frame, grid, ticks, labels, legend and ``lines``.

    ``lines``: {curve name: [(x, y), ...]}, drawn in ``colors[name]``; a single point is a dot.
    """
    left = origin[0] + MARGIN['left']
    top = origin[1] + MARGIN['top']
    right = origin[0] + PANEL_SIZE[0] - MARGIN['right']
    bottom = origin[1] + PANEL_SIZE[1] - MARGIN['bottom']
    draw.text((left, origin[1] + 8), title, fill=INK, font=font)
    points = [p for pts in lines.values() for p in pts]
    if not points:
        draw.rectangle([left, top, right, bottom], outline=INK)
        draw.text((left + 10, (top + bottom) // 2), 'no data', fill=INK, font=font)
        return
    xticks = nice_ticks(min(x for x, _ in points), max(x for x, _ in points))
    yticks = nice_ticks(min(y for _, y in points), max(y for _, y in points))

    def to_pixel(x, y):
        px = left + (x - xticks[0]) / (xticks[-1] - xticks[0]) * (right - left)
        py = bottom - (y - yticks[0]) / (yticks[-1] - yticks[0]) * (bottom - top)
        return px, py

    for x, label in zip(xticks, tick_labels(xticks)):
        px, _ = to_pixel(x, yticks[0])
        draw.line([px, top, px, bottom], fill=GRID)
        draw.line([px, bottom, px, bottom + 4], fill=INK)
        draw.text((px, bottom + 6), label, fill=INK, font=font, anchor='ma')
    for y, label in zip(yticks, tick_labels(yticks)):
        _, py = to_pixel(xticks[0], y)
        draw.line([left, py, right, py], fill=GRID)
        draw.line([left - 4, py, left, py], fill=INK)
        draw.text((left - 6, py), label, fill=INK, font=font, anchor='rm')
    draw.rectangle([left, top, right, bottom], outline=INK)
    draw.text(((left + right) // 2, bottom + 22), x_label, fill=INK, font=font, anchor='ma')
    legend_x = right
    for name in sorted(lines, key=list(colors).index, reverse=True):
        legend_x -= draw.textlength(name, font=font)
        draw.text((legend_x, origin[1] + 8), name, fill=INK, font=font)
        legend_x -= 22
        draw.line([legend_x, origin[1] + 15, legend_x + 16, origin[1] + 15], fill=colors[name], width=3)
        legend_x -= 12
    for name, pts in lines.items():
        pixels = [to_pixel(x, y) for x, y in pts]
        if len(pixels) > 1:
            draw.line(pixels, fill=colors[name], width=2, joint='curve')
        for px, py in pixels if len(pixels) <= 50 else ():
            draw.ellipse([px - 2.5, py - 2.5, px + 2.5, py + 2.5], fill=colors[name])


def plot_metrics(records, out_path):
    """Writes the three-panel PNG for ``records`` (from ``read_metrics``); returns its (width, height)."""
    size = (PANEL_SIZE[0] * len(PANELS), PANEL_SIZE[1])
    image = Image.new('RGB', size, BACKGROUND)
    draw = ImageDraw.Draw(image)
    font = load_font(13)
    x_key = x_axis(records)
    names = sorted({curve_name(r) for r in records}, key=lambda n: (n != 'train', n != 'val', n))
    colors = {name: COLORS[i % len(COLORS)] for i, name in enumerate(names)}
    for i, (key, title, kinds) in enumerate(PANELS):
        lines = curves(records, key, kinds, x_key)
        draw_panel(draw, (i * PANEL_SIZE[0], 0), title, lines, colors, x_key, font)
    image.save(out_path, format='PNG')
    return size


def main(argv=None):
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('metrics', help='metrics.jsonl written by training, or the output folder that holds it')
    parser.add_argument('-o', '--output', help='PNG to write (default: curves.png beside the metrics file)')
    args = parser.parse_args(argv)
    try:
        args.metrics = metrics_path(args.metrics)
        out_path = args.output or os.path.join(os.path.dirname(os.path.abspath(args.metrics)), 'curves.png')
        records = read_metrics(args.metrics)
        os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
        plot_metrics(records, out_path)
    except (MetricsError, OSError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 1
    print(f'{args.metrics}: {len(records)} records -> {out_path}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
