"""plot_metrics: a readable three-panel PNG from metrics.jsonl, and clear errors for bad lines."""
import json
import math

import numpy as np
import pytest
from PIL import Image

from plot_metrics import (BACKGROUND, PANEL_SIZE, MetricsError, curves, main, nice_ticks, read_metrics,
                          tick_labels, x_axis)


def record(kind, epoch, step, **metrics):
    base = dict(kind=kind, epoch=epoch, step=step, lr=None, loss=None, acc1=None, acc5=None,
                images_per_sec=100.0, time=1.0)
    return {**base, **metrics}


def write_run(path, epochs=6, steps_per_epoch=4):
    lines = []
    for epoch in range(epochs):
        for i in range(steps_per_epoch):
            step = epoch * steps_per_epoch + i + 1
            lines.append(record('train', epoch, step, lr=1e-3 * math.sin(step / 10), loss=3 / step ** 0.5,
                                acc1=None if epoch == 0 else 10.0 * epoch))
        lines.append(record('val', epoch, step, model='model', loss=2.5 / (epoch + 1), acc1=12.0 * epoch))
        lines.append(record('val', epoch, step, model='ema', loss=2.0 / (epoch + 1), acc1=8.0 * epoch))
    path.write_text('\n'.join(json.dumps(line) for line in lines) + '\n')
    return lines


def panel_ink(image, index):
    """Number of non-background pixels inside panel ``index``'s plotting area."""
    pixels = np.asarray(image)
    left = index * PANEL_SIZE[0]
    area = pixels[40:PANEL_SIZE[1] - 45, left + 65:left + PANEL_SIZE[0] - 16]
    return int(np.any(area != BACKGROUND, axis=-1).sum())


def colour_pixels(image, index, colour):
    pixels = np.asarray(image)[:, index * PANEL_SIZE[0]:(index + 1) * PANEL_SIZE[0]]
    return int(np.all(pixels == colour, axis=-1).sum())


def test_plot_png(tmp_path):
    metrics = tmp_path / 'metrics.jsonl'
    write_run(metrics)
    out = tmp_path / 'curves.png'
    assert main([str(metrics), '-o', str(out)]) == 0
    image = Image.open(out).convert('RGB')
    assert image.size == (3 * PANEL_SIZE[0], PANEL_SIZE[1])
    train_blue, val_orange, val_ema_green = (31, 119, 180), (255, 127, 14), (44, 160, 44)
    for index in range(3):
        assert panel_ink(image, index) > 500, f'panel {index} is empty'
        assert colour_pixels(image, index, train_blue) > 50
    # val curves of the model and of its EMA in the loss and accuracy panels only (lr is training's)
    for colour in (val_orange, val_ema_green):
        assert colour_pixels(image, 0, colour) > 50 and colour_pixels(image, 1, colour) > 50
        assert colour_pixels(image, 2, colour) == 0


def test_default_output_beside_metrics(tmp_path):
    metrics = tmp_path / 'metrics.jsonl'
    write_run(metrics, epochs=1, steps_per_epoch=1)
    assert main([str(metrics)]) == 0
    assert Image.open(tmp_path / 'curves.png').size == (3 * PANEL_SIZE[0], PANEL_SIZE[1])


def test_a_runs_output_folder_gives_its_metrics(tmp_path, capsys):
    """The folder training wrote (it said 'no such file'); a folder without metrics.jsonl is named."""
    write_run(tmp_path / 'metrics.jsonl', epochs=1, steps_per_epoch=1)
    assert main([str(tmp_path)]) == 0
    assert capsys.readouterr().out == f'{tmp_path / "metrics.jsonl"}: 3 records -> {tmp_path / "curves.png"}\n'
    assert Image.open(tmp_path / 'curves.png').size == (3 * PANEL_SIZE[0], PANEL_SIZE[1])
    (tmp_path / 'empty').mkdir()
    assert main([str(tmp_path / 'empty')]) == 1
    assert capsys.readouterr().err == f'error: {tmp_path / "empty"}: the folder has no metrics.jsonl\n'


@pytest.mark.parametrize('bad, message', [
    ('{"kind": "train", "epoch": 0, "step": 1, "loss": 1.0', r'metrics.jsonl:3: not valid JSON'),
    ('[1, 2]', r'metrics.jsonl:3: expected a JSON object'),
    ('{"kind": "train", "epoch": 0}', r'metrics.jsonl:3: missing "step"'),
    ('{"kind": "val", "epoch": 0, "step": 2, "loss": "low"}', r'metrics.jsonl:3: "loss" must be a number'),
    ('{"kind": "val", "epoch": 0, "step": null}', r'metrics.jsonl:3: "step" must be a finite number, got None'),
    ('{"kind": "val", "epoch": null, "step": 2}', r'metrics.jsonl:3: "epoch" must be a finite number, got None'),
    ('{"kind": "val", "epoch": 0, "step": Infinity}', r'metrics.jsonl:3: "step" must be a finite number, got inf'),
])
def test_malformed_line_names_the_line(tmp_path, capsys, bad, message):
    metrics = tmp_path / 'metrics.jsonl'
    good = json.dumps(record('train', 0, 1, loss=1.0))
    metrics.write_text(f'{good}\n\n{bad}\n{good}\n')
    with pytest.raises(MetricsError, match=message):
        read_metrics(str(metrics))
    assert main([str(metrics), '-o', str(tmp_path / 'x.png')]) == 1
    assert 'metrics.jsonl:3:' in capsys.readouterr().err
    assert not (tmp_path / 'x.png').exists()


def test_binary_input_and_output_folders(tmp_path, capsys):
    """A file that is not text is one error line; the output's folder is created."""
    binary = tmp_path / 'curves.png'
    binary.write_bytes(b'\x89PNG\r\n\x1a\n\x00\xff\xfe')
    assert main([str(binary), '-o', str(tmp_path / 'x.png')]) == 1
    assert 'curves.png:1: not valid JSON' in capsys.readouterr().err
    metrics = tmp_path / 'metrics.jsonl'
    write_run(metrics, epochs=1, steps_per_epoch=1)
    assert main([str(metrics), '-o', str(tmp_path / 'new' / 'curves.png')]) == 0
    assert (tmp_path / 'new' / 'curves.png').is_file()


def test_other_kinds_are_ignored_and_empty_files_rejected(tmp_path):
    metrics = tmp_path / 'metrics.jsonl'
    metrics.write_text(json.dumps({'kind': 'note', 'epoch': 0, 'step': 0, 'text': 'hello'}) + '\n')
    with pytest.raises(MetricsError, match='no train or val records'):
        read_metrics(str(metrics))
    with pytest.raises(MetricsError, match='no such file'):
        read_metrics(str(tmp_path / 'missing.jsonl'))


def test_x_axis_falls_back_to_epoch_when_steps_repeat():
    run = [record('train', 0, 1), record('train', 0, 2), record('val', 0, 2)]
    assert x_axis(run) == 'step'
    assert x_axis(run + [record('train', 0, 1)]) == 'epoch'


def test_nice_ticks():
    assert nice_ticks(0, 3) == [0, 1, 2, 3]
    assert nice_ticks(0.45, 2.6) == pytest.approx([0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0])
    assert nice_ticks(0.3, 97.0) == [0, 20, 40, 60, 80, 100]
    assert nice_ticks(1e-6, 5e-4) == pytest.approx([0, 1e-4, 2e-4, 3e-4, 4e-4, 5e-4])
    assert nice_ticks(2.0, 2.0)[0] < 2.0 < nice_ticks(2.0, 2.0)[-1]


def test_tick_labels():
    assert tick_labels([0, 20, 40, 60, 80, 100]) == ['0', '20', '40', '60', '80', '100']
    assert tick_labels(nice_ticks(0.9, 1.05)) == ['0.90', '0.95', '1.00', '1.05']
    assert tick_labels(nice_ticks(1e-6, 5e-4)) == ['0', '1e-4', '2e-4', '3e-4', '4e-4', '5e-4']
    assert tick_labels(nice_ticks(9.5e-5, 1.05e-4)) == ['9.4e-5', '9.6e-5', '9.8e-5', '1e-4', '1.02e-4',
                                                        '1.04e-4', '1.06e-4']


def test_non_finite_values_are_left_out_of_the_curves(tmp_path):
    """A diverged step's NaN or infinite loss (valid in metrics.jsonl, as JSON NaN / Infinity) is
    skipped, so the axes still span the finite values; val records of another model are their own curve."""
    run = [record('train', 0, 1, loss=2.0), record('train', 0, 2, loss=float('nan')),
           record('train', 0, 3, loss=float('inf')), record('train', 0, 4, loss=1.5),
           record('val', 0, 4, model='model', loss=1.8), record('val', 0, 4, model='ema', loss=1.7)]
    assert curves(run, 'loss', ('train', 'val'), 'step') == {
        'train': [(1, 2.0), (4, 1.5)], 'val': [(4, 1.8)], 'val ema': [(4, 1.7)]}
    path = tmp_path / 'metrics.jsonl'
    path.write_text('\n'.join(json.dumps(line) for line in run) + '\n')
    out = tmp_path / 'out.png'
    main([str(path), '-o', str(out)])
    assert Image.open(out).size[0] == 3 * PANEL_SIZE[0]
