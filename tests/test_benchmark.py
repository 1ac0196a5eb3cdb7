"""benchmark.py: the table and --scaling modes end to end on a tiny XCiT, and the fit."""
import json

import numpy as np
import pytest
import yaml
from PIL import Image

import benchmark
import xcit
from conftest import hide_packages

TINY = {'DATA': {'IMAGE_SIZE': 32},
        'MODEL': {'NAME': 'xcit_bench_test', 'EMBED_DIM': 32, 'DEPTH': 1, 'NUM_HEADS': 2, 'NUM_CLASSES': 5}}

MEASURES_PEAK = benchmark.restart_peak()  # False where /proc/self/clear_refs cannot be written (containers)


@pytest.fixture(scope='module')
def cfg(tmp_path_factory):
    path = tmp_path_factory.mktemp('bench') / 'tiny.yaml'
    path.write_text(yaml.safe_dump(TINY), encoding='utf-8')
    return str(path)


def test_table_measures_every_path_batch_and_size(cfg, tmp_path, capsys):
    out = tmp_path / 'rows.json'
    benchmark.main(['-cfg', cfg, '--batch', '1', '2', '--sizes', '48', '--reps', '1',
                    '--threads', '1', '--json', str(out)])
    printed = capsys.readouterr().out
    rows = json.loads(out.read_text())['rows']
    assert [(r['path'], r['batch'], r['size']) for r in rows] == [
        (path, batch, 48) for batch in (1, 2) for path in ('dygraph', 'static', 'infer')]
    for r in rows:
        assert 'error' not in r, r
        assert r['images_per_s'] > 0 and r['ms_per_batch'] > 0
        assert (r['peak_mb'] is not None) == MEASURES_PEAK
        assert r['images_per_s'] == pytest.approx(r['batch'] / r['ms_per_batch'] * 1e3)
    assert printed.count('tiny.yaml') == len(rows)
    assert 'machine: ' in printed and 'img/s' in printed


def test_training_paths_and_the_memory_gradient_checkpointing_saves(tmp_path, monkeypatch, capsys):
    """A training step with and without recomputed blocks; six blocks on 256 tokens: the
    activations of five are not kept. The config is given relative to the working folder."""
    deeper = {'DATA': {'IMAGE_SIZE': 128}, 'MODEL': {**TINY['MODEL'], 'PATCH_SIZE': 8, 'DEPTH': 6}}
    (tmp_path / 'deeper.yaml').write_text(yaml.safe_dump(deeper), encoding='utf-8')
    monkeypatch.chdir(tmp_path)
    benchmark.main(['-cfg', 'deeper.yaml', '--paths', 'train', 'train_gc', '--batch', '8', '--reps', '1',
                    '--threads', '1', '--json', 'rows.json'])
    train, checkpointed = json.loads((tmp_path / 'rows.json').read_text())['rows']
    assert 'error' not in train and 'error' not in checkpointed, (train, checkpointed)
    assert (train['path'], checkpointed['path']) == ('train', 'train_gc')
    assert train['images_per_s'] > 0 and checkpointed['images_per_s'] > 0
    assert checkpointed['peak_mb'] < 0.8 * train['peak_mb'], (checkpointed['peak_mb'], train['peak_mb'])


def test_training_step_of_a_linear_probe_config_trains_the_head_alone(tmp_path, monkeypatch):
    """With TRAIN.FREEZE_BACKBONE (a linear probe's config, or a probe run's config.yaml) the
    timed step is the probe's, as training runs it: the backbone keeps its weights, the head moves."""
    probe = {**TINY, 'TRAIN': {'FREEZE_BACKBONE': True}}
    (tmp_path / 'probe.yaml').write_text(yaml.safe_dump(probe), encoding='utf-8')
    models, training_step = [], benchmark.training_step
    monkeypatch.setattr(benchmark, 'training_step',
                        lambda model, *args, **kwargs: models.append(model) or training_step(model, *args, **kwargs))
    step = benchmark.build_runner(str(tmp_path / 'probe.yaml'), 'train', 2, 32, 1)
    (model,) = models
    before = {name: value.numpy().copy() for name, value in model.state_dict().items()}
    step()
    after = model.state_dict()
    changed = sorted(name for name, value in before.items() if not np.array_equal(value, after[name].numpy()))
    assert changed == ['head.bias', 'head.weight']


def test_onnx_path_is_measured_on_request(cfg, tmp_path, capsys):
    out = tmp_path / 'rows.json'
    benchmark.main(['-cfg', cfg, '--paths', 'infer', 'onnx', '--batch', '2', '--reps', '1',
                    '--threads', '1', '--json', str(out)])
    rows = json.loads(out.read_text())['rows']
    assert [(r['path'], r['batch'], r['size']) for r in rows] == [('infer', 2, 32), ('onnx', 2, 32)]
    assert all('error' not in r and r['images_per_s'] > 0 for r in rows), rows
    assert sum(' onnx ' in line for line in capsys.readouterr().out.splitlines()) == 1


def test_onnx_path_without_its_packages_is_one_error_line(cfg, monkeypatch, capsys):
    hide_packages(monkeypatch, 'paddle2onnx', 'onnxruntime')
    with pytest.raises(SystemExit):
        benchmark.main(['-cfg', cfg, '--paths', 'onnx'])
    assert '--paths onnx needs paddle2onnx and onnxruntime: pip install' in capsys.readouterr().err


def test_scaling_fits_draws_and_reports_the_ratios(cfg, tmp_path, capsys):
    plot = tmp_path / 'scaling.png'
    benchmark.main(['-cfg', cfg, '--scaling', '--paths', 'dygraph', '--sizes', '32', '64', '96',
                    '--reps', '1', '--threads', '1', '--plot', str(plot)])
    printed = capsys.readouterr().out
    assert 'time per image   = ' in printed and 'memory per image = ' in printed
    assert '96 / 32 pixels: tokens x9.0' in printed  # 6 x 6 against 2 x 2 tokens
    assert sum(line.startswith('tiny.yaml') and ' dygraph ' in line for line in printed.splitlines()) == 3
    assert Image.open(plot).size == (1000, 430)


@pytest.mark.parametrize('flags', [['--paths', 'dygraph', 'infer'], ['--batch', '1', '2']])
def test_scaling_refuses_more_than_one_path_or_batch(cfg, flags, capsys):
    with pytest.raises(SystemExit):
        benchmark.main(['-cfg', cfg, '--scaling', *flags])
    assert '--scaling takes one value of ' + flags[0] in capsys.readouterr().err


def test_a_bad_config_is_one_error_line_before_any_measurement(cfg, tmp_path, capsys):
    bad = tmp_path / 'bad.yaml'
    bad.write_text('MODEL:\n  EMBED_DIMS: 32\n', encoding='utf-8')
    for configs in ([cfg, str(tmp_path / 'missing.yaml')], [cfg, str(bad)]):
        with pytest.raises(SystemExit) as exit_info:
            benchmark.main(['-cfg', *configs, '--reps', '1'])
        assert exit_info.value.code == 2
        out, err = capsys.readouterr()
        assert 'machine: ' not in out
        assert ': error: ' in err.strip().splitlines()[-1]
    assert 'MODEL.EMBED_DIMS' in err and 'bad.yaml' in err


def test_a_model_without_head_has_no_training_step_to_time(tmp_path, capsys):
    headless = tmp_path / 'backbone.yaml'
    headless.write_text('MODEL:\n  NUM_CLASSES: 0\n', encoding='utf-8')
    with pytest.raises(SystemExit) as exit_info:
        benchmark.main(['-cfg', str(headless), '--paths', 'dygraph', 'train'])
    assert exit_info.value.code == 2
    assert f'{headless}: a model without classifier head (MODEL.NUM_CLASSES 0) has no training step' in \
        capsys.readouterr().err


@pytest.mark.parametrize('sizes', [['32'], ['64', '60']])  # 60 and 64 pixels: both 4 x 4 tokens of 16
def test_scaling_needs_two_numbers_of_tokens(cfg, sizes, capsys):
    with pytest.raises(SystemExit) as exit_info:
        benchmark.main(['-cfg', cfg, '--scaling', '--paths', 'dygraph', '--sizes', *sizes])
    assert exit_info.value.code == 2
    assert '--scaling needs sizes with at least two different numbers of tokens (patch 16)' in \
        capsys.readouterr().err


def fake_worker(failing_size):
    """A ``run_worker`` measuring nothing: rows of 10 ms, or an error at ``failing_size``."""
    def run(cfg, path, batch, size, threads, reps):
        if size == failing_size:
            return {'cfg': cfg, 'path': path, 'batch': batch, 'size': size, 'error': 'exit 1: out of memory'}
        return {'cfg': cfg, 'path': path, 'batch': batch, 'size': size, 'threads': threads, 'ms_per_batch': 10.0,
                'images_per_s': batch * 100.0, 'peak_mb': size / 10, 'total_peak_mb': size}
    return run


def test_scaling_needs_two_measured_sizes(cfg, monkeypatch, capsys):
    monkeypatch.setattr(benchmark, 'run_worker', fake_worker(failing_size=64))
    with pytest.raises(SystemExit) as exit_info:
        benchmark.main(['-cfg', cfg, '--scaling', '--paths', 'dygraph', '--sizes', '32', '64', '96'])
    assert 'fewer than two sizes could be measured' in str(exit_info.value)
    assert '96' not in capsys.readouterr().out.splitlines()[-1]  # it stopped at the failing size


def test_a_failed_measurement_fails_the_table(cfg, monkeypatch, capsys):
    monkeypatch.setattr(benchmark, 'run_worker', fake_worker(failing_size=64))
    with pytest.raises(SystemExit) as exit_info:
        benchmark.main(['-cfg', cfg, '--paths', 'dygraph', '--batch', '1', '--sizes', '32', '64'])
    assert exit_info.value.code == '1 of 2 measurements failed'
    assert 'failed: exit 1: out of memory' in capsys.readouterr().out


def test_plot_without_scaling_is_a_usage_error(cfg, capsys):
    with pytest.raises(SystemExit) as exit_info:
        benchmark.main(['-cfg', cfg, '--plot', 'table.png'])
    assert exit_info.value.code == 2 and '--plot names the figure of --scaling' in capsys.readouterr().err


@pytest.mark.parametrize('flag', ['--batch', '--sizes', '--threads', '--reps'])
def test_counts_must_be_positive(cfg, flag, capsys):
    with pytest.raises(SystemExit) as exit_info:
        benchmark.main(['-cfg', cfg, flag, '0'])
    assert exit_info.value.code == 2 and f'{flag} must be > 0, got 0' in capsys.readouterr().err


def test_static_path_is_traced_before_the_measurement(cfg, monkeypatch):
    """Tracing, like building the model, must not count in the peak memory of the forward passes."""
    import paddle
    to_static, calls = paddle.jit.to_static, []

    def recording_to_static(*args, **kwargs):
        net = to_static(*args, **kwargs)
        return lambda x: calls.append(x.shape) or net(x)
    monkeypatch.setattr(paddle.jit, 'to_static', recording_to_static)
    run = benchmark.build_runner(cfg, 'static', 2, 32, 1)
    assert calls == [[2, 3, 32, 32]]
    assert run().shape == (2, 5) and len(calls) == 2


@pytest.mark.skipif(not MEASURES_PEAK, reason='this system cannot restart the peak mark (/proc/self/clear_refs)')
def test_peak_restarts_at_the_current_resident_size():
    """What a model's build allocated and freed (tracing, export, conversion) must not count
    as memory of the forward passes, nor hide in the heap for them to reuse unseen."""
    assert xcit  # imported: it raises malloc's thresholds, so the heap keeps freed large blocks
    scratch = np.ones(64 * 2 ** 20 // 8)  # 64 MiB, touched, freed into the heap
    del scratch
    before = benchmark.memory_kb('VmHWM')
    assert benchmark.restart_peak()
    after = benchmark.peak_kb()
    assert before - after > 60 * 1024
    assert abs(after - benchmark.memory_kb('VmRSS')) < 8 * 1024


def test_least_squares_and_summary():
    assert benchmark.least_squares([1, 2, 3], [5, 7, 9]) == pytest.approx((3, 2))
    rows = [{'size': s, 'batch': 2, 'ms_per_batch': 2 * (10 + 0.5 * (s // 16) ** 2),
             'peak_mb': 2 * (20 + 0.01 * (s // 16) ** 2)} for s in (224, 448, 896)]
    rows.append({'size': 1024, 'batch': 2, 'error': 'exit 1: out of memory'})
    summary = benchmark.scaling_summary(rows, patch=16)
    assert summary['sizes'] == [224, 448, 896] and summary['tokens'] == [196, 784, 3136]
    assert summary['time_fit'] == pytest.approx((10, 0.5))
    assert summary['memory_fit'] == pytest.approx((20, 0.01))
    assert summary['token_ratio'] == 16
    assert summary['time_ratio'] == pytest.approx((10 + 0.5 * 3136) / (10 + 0.5 * 196))
    assert summary['memory_ratio'] == pytest.approx((20 + 0.01 * 3136) / (20 + 0.01 * 196))
    assert summary['ms_per_image'][0] == pytest.approx(10 + 0.5 * 196)
    assert summary['mb_per_image'][2] == pytest.approx(20 + 0.01 * 3136)


def test_scaling_without_memory_figures_fits_and_draws_the_time(tmp_path):
    """Where the peak mark cannot be restarted (no /proc) peak_mb is None: the time is fitted,
    printed and drawn, memory said to be unmeasured (this ended in a TypeError once every size had
    run); a zero peak at the smallest size gives no memory ratio instead of a ZeroDivisionError."""
    rows = [{'size': s, 'batch': 1, 'ms_per_batch': 10 + 0.5 * (s // 16) ** 2, 'peak_mb': None} for s in (224, 448)]
    summary = benchmark.scaling_summary(rows, patch=16)
    assert summary['time_fit'] == pytest.approx((10, 0.5)) and summary['memory_fit'] is None
    assert benchmark.format_scaling(summary).endswith('(0.93 of the token ratio), peak memory not measured on this system')
    benchmark.draw_scaling(summary, 'no memory', tmp_path / 'time.png')
    assert Image.open(tmp_path / 'time.png').size == (1000, 430)
    rows = [dict(row, peak_mb=mb) for row, mb in zip(rows, (0.0, 8.0))]
    summary = benchmark.scaling_summary(rows, patch=16)
    assert summary['memory_fit'] == pytest.approx((-8 / 588 * 196, 8 / 588)) and summary['memory_ratio'] is None
    assert 'memory per image = ' in benchmark.format_scaling(summary)


@pytest.mark.parametrize('flags', [['--json'], ['--scaling', '--paths', 'dygraph', '--plot']])
def test_an_output_that_is_a_folder_is_refused_before_any_measurement(cfg, tmp_path, flags, capsys):
    """--json or --plot naming a folder: a usage error before anything is measured (it was an
    IsADirectoryError traceback once every measurement had run)."""
    with pytest.raises(SystemExit) as exit_info:
        benchmark.main(['-cfg', cfg, '--reps', '1', *flags, str(tmp_path)])
    assert exit_info.value.code == 2
    out, err = capsys.readouterr()
    assert out == '' and err.splitlines()[-1].endswith(f': error: {flags[-1]} {tmp_path} is a folder, not a file')


def test_a_measurement_is_the_median_of_its_timed_runs(monkeypatch):
    """After one untimed warm-up run, ``reps`` timed runs; the row gives their median in ms per
    batch, batch / median images per second, and the peak above the resident size at the start."""
    runs = []
    monkeypatch.setattr(benchmark, 'build_runner', lambda *args: lambda: runs.append(1))
    clock = iter([0.0, 0.3, 1.0, 1.1, 2.0, 2.2])  # runs of 0.3, 0.1 and 0.2 s
    monkeypatch.setattr(benchmark.time, 'perf_counter', lambda: next(clock))
    monkeypatch.setattr(benchmark, 'restart_peak', lambda: True)
    monkeypatch.setattr(benchmark, 'memory_kb', lambda field: 2048)
    monkeypatch.setattr(benchmark, 'peak_kb', lambda: 2048 + 5120)
    row = benchmark.measure('configs/tiny.yaml', 'dygraph', 4, 32, 1, reps=3)
    assert len(runs) == 4
    assert row['ms_per_batch'] == pytest.approx(200) and row['images_per_s'] == pytest.approx(20)
    assert (row['cfg'], row['batch'], row['size']) == ('tiny.yaml', 4, 32)
    assert row['peak_mb'] == pytest.approx(5) and row['total_peak_mb'] == pytest.approx(7)
