"""Numerical parity with the official PyTorch XCiT through the converter.

Every golden checkpoint (official layout, timm's layout, float16 storage) is converted by
the command-line tool, loaded into the model its JSON describes, and run on the reference
inputs; logits and features must match the official outputs within the golden tolerance.
Run with ``pytest -s`` to see the errors.
"""
import glob
import json
import os
import subprocess
import sys

import numpy as np
import paddle
import pytest

import export_model
from conftest import GOLDEN, ROOT, write_golden_yaml
from config import get_config
from xcit import build_xcit

LOGITS_TOL = 5e-5
FEATURES_TOL = 1e-4
CONVERT = os.path.join(ROOT, 'port_weights', 'convert.py')
GOLDEN_NAMES = sorted(os.path.basename(p)[:-len('.npz')] for p in glob.glob(os.path.join(GOLDEN, '*.npz')))
# converted file (folder mode names files sharing a stem by suffix) -> golden case it must match
CONVERTED = {f'{name}.pdparams': name for name in GOLDEN_NAMES}
CONVERTED.update({'mini_p8_tokens_norm.timm_pth.pdparams': 'mini_p8_tokens_norm',
                  'mini_p8_tokens_norm.timm_safetensors.pdparams': 'mini_p8_tokens_norm'})


def run_convert(*args):
    return subprocess.run([sys.executable, CONVERT, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def golden_meta(name):
    with open(os.path.join(GOLDEN, f'{name}.json'), encoding='utf-8') as f:
        return json.load(f)


@pytest.fixture(scope='module')
def converted(tmp_path_factory):
    """Folder with every golden checkpoint converted by one folder-mode run of the tool."""
    out = tmp_path_factory.mktemp('converted')
    proc = run_convert('--src', GOLDEN, '--dst', str(out))
    assert proc.returncode == 0, proc.stderr
    assert f'{len(CONVERTED)} of {len(CONVERTED)} files converted' in proc.stdout
    for name in GOLDEN_NAMES:
        assert f'{name}.pdparams: ' in proc.stdout
        assert f'{golden_meta(name)["params"]:,} parameters' in proc.stdout
    return out


@pytest.mark.parametrize('filename', sorted(CONVERTED))
def test_converted_weights_reproduce_official_outputs(converted, tmp_path, filename):
    name = CONVERTED[filename]
    meta = golden_meta(name)
    model = build_xcit(get_config(write_golden_yaml(meta, tmp_path / 'model.yaml')))
    missing, unexpected = model.set_state_dict(paddle.load(str(converted / filename)))
    assert missing == [] and unexpected == []
    model.eval()
    reference = np.load(os.path.join(GOLDEN, f'{name}.npz'))
    for case in meta['cases']:
        x = paddle.to_tensor(reference[case['input']])
        with paddle.no_grad():
            logits = model(x).numpy()
            features = model.forward_features(x).numpy()
        logits_err = np.abs(logits - reference[case['logits']]).max()
        features_err = np.abs(features - reference[case['features']]).max()
        print(f'\n{filename} {case["input"]} {case["shape"]}: max abs err '
              f'logits {logits_err:.2e}, features {features_err:.2e}')
        assert logits_err <= LOGITS_TOL
        assert features_err <= FEATURES_TOL


def test_exported_models_reproduce_official_logits(converted, tmp_path):
    """The deployment formats of the nano checkpoint (paddle.inference with and without oneDNN,
    ONNX through Paddle2ONNX and ONNX Runtime) meet the same bar as the dygraph model."""
    meta = golden_meta('xcit_nano_12_p16')
    model = build_xcit(get_config(write_golden_yaml(meta, tmp_path / 'model.yaml')))
    model.set_state_dict(paddle.load(str(converted / 'xcit_nano_12_p16.pdparams')))
    model.eval()
    folder = str(tmp_path / 'export')
    export_model.export(model, folder)  # dynamic height and width: the cases have two sizes
    runners = [export_model.InferenceModel(folder, mkldnn=mkldnn) for mkldnn in (False, True)]
    runners.append(export_model.OnnxModel(export_model.export_onnx(folder)))
    reference = np.load(os.path.join(GOLDEN, 'xcit_nano_12_p16.npz'))
    for case in meta['cases']:
        for run in runners:
            logits_err = np.abs(run(reference[case['input']]) - reference[case['logits']]).max()
            print(f'\n{run.name} {case["shape"]}: max abs err logits {logits_err:.2e}')
            assert logits_err <= LOGITS_TOL
    # a fixed size (export_model.py -image_size, and what -eval runs) lets the oneDNN passes fuse more
    fixed = str(tmp_path / 'export_224')
    export_model.export(model, fixed, 224)
    case = next(case for case in meta['cases'] if case['shape'][2:] == [224, 224])
    for mkldnn in (False, True):
        run = export_model.InferenceModel(fixed, mkldnn=mkldnn)
        logits_err = np.abs(run(reference[case['input']]) - reference[case['logits']]).max()
        print(f'\n{run.name} fixed {case["shape"]}: max abs err logits {logits_err:.2e}')
        assert logits_err <= LOGITS_TOL


@pytest.mark.parametrize('filename', ['mini_p8_tokens_norm.timm_pth.pdparams',
                                      'mini_p8_tokens_norm.timm_safetensors.pdparams'])
def test_timm_layout_converts_to_the_official_arrays(converted, filename):
    official = paddle.load(str(converted / 'mini_p8_tokens_norm.pdparams'), return_numpy=True)
    timm = paddle.load(str(converted / filename), return_numpy=True)
    assert sorted(timm) == sorted(official)
    for key, value in official.items():
        assert timm[key].dtype == value.dtype == np.float32
        np.testing.assert_array_equal(timm[key], value, err_msg=key)


def test_cli_checks_the_repository_config_and_writes(converted, tmp_path):
    dst = tmp_path / 'nano.pdparams'
    cfg = os.path.join('configs', 'xcit_nano_12_p16_224.yaml')
    proc = run_convert('--src', os.path.join(GOLDEN, 'xcit_nano_12_p16.pth'), '--dst', str(dst), '--cfg', cfg)
    assert proc.returncode == 0, proc.stderr
    assert f'367 tensors, 3,053,224 parameters, float32, matches {cfg}' in proc.stdout
    written = paddle.load(str(dst), return_numpy=True)
    reference = paddle.load(str(converted / 'xcit_nano_12_p16.pdparams'), return_numpy=True)
    assert sorted(written) == sorted(reference)
    assert all(np.array_equal(written[k], reference[k]) for k in reference)
