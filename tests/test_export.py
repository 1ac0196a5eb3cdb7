"""export_model.py: round trip through paddle.inference, the mismatch check, bad input.

A tiny XCiT (2 blocks, 32 channels, 5 classes) keeps each export to a few seconds.
"""
import os
import re

import numpy as np
import paddle
import pytest
import yaml

import export_model
import xcit
from config import get_config
from conftest import hide_packages
from export_model import InferenceModel, main
from xcit import build_xcit

TINY = {'DATA': {'IMAGE_SIZE': 48},
        'MODEL': {'NAME': 'xcit_tiny_test', 'EMBED_DIM': 32, 'DEPTH': 2, 'NUM_HEADS': 2, 'NUM_CLASSES': 5,
                  'TOKENS_NORM': True, 'ETA': 0.5}}


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    """(config path, weights path, the dygraph model with those weights in eval mode)."""
    folder = tmp_path_factory.mktemp('tiny')
    cfg = str(folder / 'tiny.yaml')
    with open(cfg, 'w', encoding='utf-8') as f:
        yaml.safe_dump(TINY, f)
    paddle.seed(1)
    model = build_xcit(get_config(cfg))
    for name, value in model.state_dict().items():  # no identity layer scales or BN statistics
        if name.endswith(('gamma1', 'gamma2', 'gamma3', '_mean', '_variance', 'temperature')):
            value.set_value(paddle.rand(value.shape) + 0.5)
    weights = str(folder / 'tiny.pdparams')
    paddle.save(model.state_dict(), weights)
    model.eval()
    return cfg, weights, model


def logits(model, x):
    with paddle.no_grad():
        return model(paddle.to_tensor(x)).numpy()


def test_dynamic_export_runs_any_batch_and_size(tiny, tmp_path, capsys):
    cfg, weights, model = tiny
    main(['-cfg', cfg, '-pretrained', weights, '-output', str(tmp_path)])
    out = capsys.readouterr().out
    assert 'dynamic batch, height and width' in out and 'OK: the exported model matches' in out
    program = 'model.json' if export_model.PADDLE_MAJOR >= 3 else 'model.pdmodel'
    assert os.path.isfile(tmp_path / program) and os.path.isfile(tmp_path / 'model.pdiparams')
    assert get_config(str(tmp_path / 'config.yaml')) == get_config(cfg)  # written once the check passed
    exported = InferenceModel(str(tmp_path))
    for shape in [(3, 3, 48, 48), (1, 3, 70, 37), (3, 3, 48, 48)]:
        x = np.random.default_rng(0).standard_normal(shape).astype('float32')
        for _ in range(3):  # every run, not only the first of a shape
            np.testing.assert_allclose(exported(x), logits(model, x), atol=1e-4, rtol=0)


def test_fixed_size_export(tiny, tmp_path, capsys):
    cfg, weights, model = tiny
    main(['-cfg', cfg, '-pretrained', weights, '-output', str(tmp_path), '-image_size', '64'])
    assert '(input [N, 3, 64, 64] float32; dynamic batch)' in capsys.readouterr().out
    x = np.random.default_rng(1).standard_normal((4, 3, 64, 64)).astype('float32')
    np.testing.assert_allclose(InferenceModel(str(tmp_path), mkldnn=False)(x), logits(model, x), atol=1e-4, rtol=0)


@pytest.mark.parametrize('mkldnn', [False, True])
def test_mkldnn_flag_decides_the_kernels(tiny, tmp_path, monkeypatch, mkldnn):
    """Plain CPU kernels really are plain: a new inference Config has oneDNN on unless told otherwise."""
    from paddle import inference
    create, enabled = inference.create_predictor, []
    monkeypatch.setattr(inference, 'create_predictor', lambda config: enabled.append(config.mkldnn_enabled())
                        or create(config))
    _, _, model = tiny
    export_model.export(model, str(tmp_path), 48)
    runner = InferenceModel(str(tmp_path), mkldnn=mkldnn)
    assert enabled == [mkldnn and export_model.HAS_ONEDNN]
    assert runner.name == 'paddle.inference ' + ('oneDNN' if enabled[0] else 'CPU')


def test_export_and_check_run_on_the_cpu(tiny, tmp_path, monkeypatch, capsys):
    """Also where Paddle would default to a GPU, whose float32 kernels round differently."""
    devices, set_device = [], paddle.set_device
    monkeypatch.setattr(paddle, 'set_device', lambda device: devices.append(device) or set_device(device))
    cfg, weights, _ = tiny
    main(['-cfg', cfg, '-pretrained', weights, '-output', str(tmp_path), '-image_size', '48'])
    assert devices == ['cpu'] and 'OK: the exported model matches' in capsys.readouterr().out


IMAGE_FORWARD = xcit.LPI._image_forward


def _scaled_image_forward(self, x, H, W, weight2, bias2):
    """LPI's graph-mode path with its output scaled (a global, not a closure: Paddle 2.6's
    to_static loses closure variables)."""
    return IMAGE_FORWARD(self, x, H, W, weight2, bias2) * 1.5


def test_check_compares_with_the_dygraph_model(tiny, tmp_path, monkeypatch, capsys):
    """A graph-mode-only difference (LPI's image path runs only under to_static and on GPUs) must
    fail the check: exporting must not turn the model it is compared with into the static one."""
    cfg, weights, _ = tiny
    monkeypatch.setattr(xcit.LPI, '_image_forward', _scaled_image_forward)
    with pytest.raises(SystemExit) as exit_info:
        main(['-cfg', cfg, '-pretrained', weights, '-output', str(tmp_path), '-image_size', '32'])
    assert exit_info.value.code == 1
    assert 'does not reproduce the dygraph model' in capsys.readouterr().err


def test_an_export_writes_matmul_and_add_also_where_paddle_is_built_with_cuda(tiny, tmp_path, monkeypatch):
    """Paddle 3.3's F.linear writes the 'linear_v2' op where Paddle is built with CUDA (as
    paddlepaddle-gpu is), which Paddle2ONNX cannot convert: -onnx aborted the process."""
    _, _, model = tiny
    monkeypatch.setattr(paddle, 'is_compiled_with_cuda', lambda: True)
    export_model.export(model, str(tmp_path))
    with open(export_model.program_path(str(tmp_path)), 'rb') as f:
        program = f.read()
    assert b'linear_v2' not in program and b'matmul' in program


def test_a_backbone_without_head_is_checked_on_its_features(tiny, tmp_path, capsys):
    _, weights, _ = tiny
    cfg = tmp_path / 'backbone.yaml'
    cfg.write_text(yaml.safe_dump({**TINY, 'MODEL': {**TINY['MODEL'], 'NUM_CLASSES': 0}}), encoding='utf-8')
    paddle.save({k: v for k, v in paddle.load(weights).items() if not k.startswith('head.')},
                str(tmp_path / 'backbone.pdparams'))
    main(['-cfg', str(cfg), '-pretrained', str(tmp_path / 'backbone.pdparams'), '-output', str(tmp_path / 'out'),
          '-image_size', '32'])
    out = capsys.readouterr().out
    assert 'paddle.inference CPU: max |features - dygraph features| = ' in out and 'logits' not in out


def test_mismatch_between_exported_and_dygraph_fails(tiny, tmp_path, monkeypatch, capsys):
    cfg, weights, _ = tiny
    call = InferenceModel.__call__
    monkeypatch.setattr(InferenceModel, '__call__', lambda self, x: call(self, x) + 1e-3)
    with pytest.raises(SystemExit) as exit_info:
        main(['-cfg', cfg, '-pretrained', weights, '-output', str(tmp_path), '-image_size', '32'])
    assert exit_info.value.code == 1
    captured = capsys.readouterr()
    assert 'max |logits - dygraph logits| = 1.00e-03' in captured.out
    assert 'does not reproduce the dygraph model (tolerance 1e-04)' in captured.err
    assert f'Nothing was written to {tmp_path}.' in captured.err
    assert os.listdir(tmp_path) == []


def test_a_failed_export_leaves_the_last_good_one_in_place(tiny, tmp_path, monkeypatch, capsys):
    cfg, weights, _ = tiny
    main(['-cfg', cfg, '-pretrained', weights, '-output', str(tmp_path), '-image_size', '32'])
    before = {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)}
    assert 'config.yaml' in before and 'model.pdiparams' in before
    call = InferenceModel.__call__
    monkeypatch.setattr(InferenceModel, '__call__', lambda self, x: call(self, x) + 1e-3)
    with pytest.raises(SystemExit):
        main(['-cfg', cfg, '-pretrained', weights, '-output', str(tmp_path)])
    assert {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)} == before
    assert not [name for name in os.listdir(tmp_path.parent) if name.startswith(f'.{tmp_path.name}.')]


def test_onnx_export_runs_any_batch_and_size(tiny, tmp_path, capsys):
    cfg, weights, model = tiny
    main(['-cfg', cfg, '-pretrained', weights, '-output', str(tmp_path), '-onnx'])
    out = capsys.readouterr().out
    assert 'and model.pdiparams, model.onnx (ONNX opset 17)' in out and (tmp_path / 'model.onnx').is_file()
    assert 'onnxruntime: max |logits - dygraph logits|' in out and 'OK: the exported model matches' in out
    exported = export_model.OnnxModel(str(tmp_path / 'model.onnx'))
    for shape in [(3, 3, 48, 48), (1, 3, 70, 37), (2, 3, 33, 90)]:
        x = np.random.default_rng(2).standard_normal(shape).astype('float32')
        np.testing.assert_allclose(exported(x), logits(model, x), atol=1e-4, rtol=0)


def test_onnx_without_its_packages_stops_before_writing(tiny, tmp_path, monkeypatch, capsys):
    cfg, weights, _ = tiny
    hide_packages(monkeypatch, 'onnxruntime')
    with pytest.raises(SystemExit) as exit_info:
        main(['-cfg', cfg, '-pretrained', weights, '-output', str(tmp_path / 'out'), '-onnx'])
    assert exit_info.value.code == 1
    assert 'error: -onnx needs onnxruntime: pip install paddle2onnx onnxruntime' in capsys.readouterr().err
    assert not os.path.exists(tmp_path / 'out')


def test_onnx_conversion_failure_is_one_error_line(tiny, tmp_path, monkeypatch, capsys):
    import paddle2onnx

    def fail(*args, **kwargs):
        raise RuntimeError('Oops, there are some operators not supported yet')
    monkeypatch.setattr(paddle2onnx, 'export', fail)
    cfg, weights, _ = tiny
    with pytest.raises(SystemExit) as exit_info:
        main(['-cfg', cfg, '-pretrained', weights, '-output', str(tmp_path), '-image_size', '32', '-onnx'])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert ('could not convert the exported model: Oops, there are some operators not supported yet. '
            f'Nothing was written to {tmp_path}.') in err
    assert 'Traceback' not in err


def test_legacy_format_needs_paddle_2(tiny, tmp_path, capsys):
    cfg, weights, model = tiny
    argv = ['-cfg', cfg, '-pretrained', weights, '-output', str(tmp_path), '-image_size', '32', '--legacy-format']
    if export_model.PADDLE_MAJOR >= 3:
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 1
        assert 'cannot write model.pdmodel' in capsys.readouterr().err
        assert not os.listdir(tmp_path)
    else:
        main(argv)
        assert {'model.pdiparams', 'model.pdiparams.info', 'config.yaml'} <= set(os.listdir(tmp_path))
        assert os.path.isfile(tmp_path / 'model.pdmodel')


def test_ema_weights_of_a_training_checkpoint_are_exported(tiny, tmp_path, capsys):
    cfg, weights, model = tiny
    state = paddle.load(weights)
    checkpoint = str(tmp_path / 'last.pdparams')
    paddle.save({'model': {name: value * 0.5 for name, value in state.items()}, 'model_ema': state}, checkpoint)
    main(['-cfg', cfg, '-pretrained', checkpoint, '-ema', '-image_size', '48', '-output', str(tmp_path / 'out')])
    assert 'OK: the exported model matches' in capsys.readouterr().out
    assert get_config(str(tmp_path / 'out' / 'config.yaml')).DATA.IMAGE_SIZE == 48  # the export's size
    x = np.random.default_rng(1).standard_normal((2, 3, 48, 48)).astype('float32')
    np.testing.assert_allclose(InferenceModel(str(tmp_path / 'out'))(x), logits(model, x), atol=1e-4, rtol=0)


def test_checkpoint_that_does_not_fit_is_named(tiny, tmp_path, capsys):
    cfg, weights, _ = tiny
    state = paddle.load(weights)
    del state['blocks.1.attn.temperature']
    state['head.weight'] = paddle.zeros([32, 7])
    broken = str(tmp_path / 'broken.pdparams')
    paddle.save(state, broken)
    with pytest.raises(SystemExit):
        main(['-cfg', cfg, '-pretrained', broken, '-output', str(tmp_path / 'out')])
    err = capsys.readouterr().err
    assert f'error: {broken} does not fit the model' in err
    assert 'blocks.1.attn.temperature' in err and 'missing from checkpoint' in err
    assert 'head.weight' in err and 'shape mismatch' in err


def test_a_new_export_replaces_every_file_of_the_last(tiny, tmp_path, capsys):
    """A model.onnx, config.yaml or program of another Paddle left from an earlier export into the
    same folder would not belong to the new one."""
    cfg, weights, _ = tiny
    stale = {name: b'stale' for name in ('model.json', 'model.pdmodel', 'model.onnx', 'config.yaml')}
    for name, content in stale.items():
        (tmp_path / name).write_bytes(content)
    main(['-cfg', cfg, '-pretrained', weights, '-output', str(tmp_path), '-image_size', '32'])
    program = 'model.json' if export_model.PADDLE_MAJOR >= 3 else 'model.pdmodel'
    assert f'exported xcit_tiny_test to {tmp_path / program}' in capsys.readouterr().out
    assert not any((tmp_path / name).read_bytes() == b'stale' for name in stale if (tmp_path / name).exists())
    assert not (tmp_path / 'model.onnx').exists()


def test_output_that_is_a_file_is_an_error(tiny, tmp_path, capsys):
    cfg, weights, _ = tiny
    (tmp_path / 'taken').write_text('not a folder')
    with pytest.raises(SystemExit) as exit_info:
        main(['-cfg', cfg, '-pretrained', weights, '-output', str(tmp_path / 'taken'), '-image_size', '32'])
    assert exit_info.value.code == 1
    assert f'error: -output {tmp_path / "taken"} is a file, not a folder' in capsys.readouterr().err


def test_image_size_zero_is_an_error_not_a_dynamic_export(tiny, tmp_path, capsys):
    cfg, weights, _ = tiny
    with pytest.raises(SystemExit) as exit_info:
        main(['-cfg', cfg, '-pretrained', weights, '-output', str(tmp_path), '-image_size', '0'])
    assert exit_info.value.code == 1
    assert 'error: -image_size: DATA.IMAGE_SIZE must be > 0, got 0' in capsys.readouterr().err


@pytest.fixture
def exported(tiny, tmp_path):
    export_model.export(tiny[2], str(tmp_path), 32)
    return tmp_path


def test_missing_or_truncated_weights_of_an_export_are_named(exported):
    params = exported / 'model.pdiparams'
    content = params.read_bytes()
    params.write_bytes(content[:len(content) // 2])
    with pytest.raises(export_model.ExportError, match='Paddle Inference cannot load the exported model'):
        InferenceModel(str(exported))
    params.unlink()
    with pytest.raises(export_model.ExportError, match='model.pdiparams, are missing'):
        InferenceModel(str(exported))


def test_missing_folder_and_foreign_program_format_are_named(exported, monkeypatch):
    with pytest.raises(export_model.ExportError, match='nowhere: no such folder'):
        export_model.program_path(str(exported / 'nowhere'))
    program = 'model.json' if export_model.PADDLE_MAJOR >= 3 else 'model.pdmodel'
    (exported / program).rename(exported / 'model.json')
    monkeypatch.setattr(export_model, 'PROGRAM_SUFFIXES', ('.pdmodel',))  # as under Paddle 2.6
    with pytest.raises(export_model.ExportError, match='model.json is a Paddle 3 export'):
        export_model.program_path(str(exported))


def test_check_images_cover_the_exported_sizes():
    """A fixed-size export is checked on a batch of 2 at that size; a dynamic one also on a
    non-square image whose sides are not multiples of the patch (56 x 29 for 48 and patch 16)."""
    fixed = export_model.check_inputs(48, False, 16)
    assert [x.shape for x in fixed] == [(2, 3, 48, 48)] and fixed[0].dtype == np.float32
    dynamic = export_model.check_inputs(64, True, 8)
    assert [x.shape for x in dynamic] == [(2, 3, 64, 64), (1, 3, 68, 53)]
    assert [x.shape for x in export_model.check_inputs(48, True, 16)][1] == (1, 3, 56, 29)


@pytest.mark.parametrize('diff, fails', [(float('nan'), True), (1.01e-4, True), (1e-4, False)])
def test_check_fails_on_a_difference_above_the_tolerance_or_not_a_number(monkeypatch, capsys, diff, fails):
    """The largest logit difference must be at most 1e-4; NaN logits (no comparison holds) fail."""
    monkeypatch.setattr(export_model, 'InferenceModel', lambda *args, **kwargs: None)
    monkeypatch.setattr(export_model, 'HAS_ONEDNN', False)
    monkeypatch.setattr(export_model, 'max_difference', lambda model, runners, inputs: [('paddle.inference', diff)])
    config = get_config()
    if fails:
        with pytest.raises(export_model.ExportError, match=re.escape('tolerance 1e-04): paddle.inference')):
            export_model.check_export(None, 'unused', config, 224, onnx=False)
    else:
        export_model.check_export(None, 'unused', config, 224, onnx=False)
    assert f'paddle.inference: max |logits - dygraph logits| = {diff:.2e} on [2, 3, 224, 224]\n' in capsys.readouterr().out


def test_publish_removes_the_old_config_first_and_moves_the_new_one_last(tmp_path, monkeypatch):
    """config.yaml marks a usable export (predict.py reads it): while the files are swapped, an
    interrupted publish must never leave a config.yaml beside files of another export."""
    program = 'model' + export_model.PROGRAM_SUFFIXES[0]  # the format this Paddle writes
    staging, output = tmp_path / 'staging', tmp_path / 'out'
    staging.mkdir()
    output.mkdir()
    for name in ('config.yaml', program, 'model.pdiparams'):
        (staging / name).write_text(f'new {name}')
        (output / name).write_text(f'old {name}')
    (output / 'notes.txt').write_text('kept')
    events = []
    remove, replace = os.remove, os.replace
    monkeypatch.setattr(os, 'remove', lambda path: events.append(('remove', os.path.basename(path))) or remove(path))
    monkeypatch.setattr(os, 'replace', lambda a, b: events.append(('move', os.path.basename(b))) or replace(a, b))
    assert export_model.publish(str(staging), str(output)) == str(output / program)
    assert events[0] == ('remove', 'config.yaml') and events[-1] == ('move', 'config.yaml')
    assert sorted(e for e in events if e[0] == 'move') == sorted([('move', 'config.yaml'), ('move', program),
                                                                 ('move', 'model.pdiparams')])
    assert {p.name: p.read_text() for p in output.iterdir()} == {
        'config.yaml': 'new config.yaml', program: f'new {program}', 'model.pdiparams': 'new model.pdiparams',
        'notes.txt': 'kept'}


def test_publish_refused_by_the_system_is_one_error(tmp_path):
    """A folder where the export's weights file should go: os.replace refuses it. The error names
    the output and the file, and says the folder holds no usable export (no config.yaml)."""
    staging, output = tmp_path / 'staging', tmp_path / 'out'
    staging.mkdir()
    (output / 'model.pdiparams').mkdir(parents=True)
    for name in ('config.yaml', 'model.pdiparams'):
        (staging / name).write_text(f'new {name}')
    with pytest.raises(export_model.ExportError, match=re.escape(f'-output {output}: cannot put the checked export there (')
                       + r'.*' + re.escape(f'{output / "model.pdiparams"}); it holds no usable export now (no config.yaml)')):
        export_model.publish(str(staging), str(output))
    assert not (output / 'config.yaml').exists()
