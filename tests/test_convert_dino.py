"""Self-supervised DINO checkpoints (facebookresearch/dino) through the converter.

DINO publishes XCiT weights in three files: the backbone alone (a bare state dict without
classifier head), a full training checkpoint ('student' and 'teacher', each the XCiT under
``backbone.`` beside DINO's projection ``head.``; the student saved from a
DistributedDataParallel wrapper; the run's ``argparse.Namespace`` under 'args'), and the
classifier of its linear evaluation (``module.linear.weight`` / ``.bias`` under 'state_dict',
with the SGD state). The files here are the golden official checkpoint re-packed in those
layouts, written in torch.save's zip format without torch, so every assembly must reproduce
the official outputs.
"""
import argparse
import collections
import io
import json
import os
import pickle

import numpy as np
import paddle
import pytest

from config import get_config
from conftest import GOLDEN, ROOT, write_golden_yaml, write_torch_zip
from port_weights.convert import load_checkpoint_arrays, main
from xcit import build_xcit

LOGITS_TOL = 5e-5
FEATURES_TOL = 1e-4
GOLDEN_NAME = 'mini_p16_cls_norm'  # official layout, 10 classes
DINO_MODELS = ('xcit_small_12_p16', 'xcit_small_12_p8', 'xcit_medium_24_p16', 'xcit_medium_24_p8')  # configs/dino/


class TorchGlobal:
    """A global of torch's pickles (``module.name``), written by name: torch is not needed."""

    def __init__(self, module, name):
        self.module, self.name = module, name

    def __call__(self, *args):  # pickle's save_reduce wants a callable; never called here
        raise NotImplementedError


class TorchPickler(pickle._Pickler):
    """Pickles like torch.save (protocol 2): each float32 numpy array becomes a tensor rebuilt by
    ``torch._utils._rebuild_tensor_v2`` from a storage; ``storages`` lists ``(key, bytes)``."""

    def __init__(self, file):
        super().__init__(file, protocol=2)
        self.storages = []
        self.storage_keys = {}  # id of a storage's bytes -> its key

    def persistent_id(self, obj):
        key = self.storage_keys.get(id(obj))
        if key is None:
            return None
        return ('storage', TorchGlobal('torch', 'FloatStorage'), key, 'cpu', len(obj) // 4)

    def save(self, obj, save_persistent_id=True):
        if isinstance(obj, TorchGlobal):
            self.write(pickle.GLOBAL + f'{obj.module}\n{obj.name}\n'.encode('ascii'))
        elif isinstance(obj, np.ndarray):
            array = np.ascontiguousarray(obj, dtype='<f4')
            raw = array.tobytes()
            self.storage_keys[id(raw)] = str(len(self.storages))
            self.storages.append((self.storage_keys[id(raw)], raw))
            strides = tuple(s // 4 for s in array.strides)
            self.save_reduce(TorchGlobal('torch._utils', '_rebuild_tensor_v2'),
                             (raw, 0, array.shape, strides, False, collections.OrderedDict()))
        else:
            super().save(obj, save_persistent_id)


def torch_save(obj, path):
    """``obj`` (dicts, lists, numbers, strings, argparse.Namespace, float32 arrays as tensors) in
    torch.save's zip layout; returns the path as a string."""
    buffer = io.BytesIO()
    pickler = TorchPickler(buffer)
    pickler.dump(obj)
    return write_torch_zip(path, buffer.getvalue(), pickler.storages)


def split_head(arrays):
    backbone = {k: v for k, v in arrays.items() if not k.startswith('head.')}
    return backbone, {k: v for k, v in arrays.items() if k.startswith('head.')}


def projection_head(dim, seed=0):
    """DINO's projection head (``DINOHead``: an MLP and a weight-normalised last layer)."""
    rng = np.random.default_rng(seed)
    shapes = {'mlp.0.weight': (32, dim), 'mlp.0.bias': (32,), 'mlp.2.weight': (16, 32), 'mlp.2.bias': (16,),
              'last_layer.weight_g': (48, 1), 'last_layer.weight_v': (48, 16)}
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}


@pytest.fixture(scope='module')
def golden():
    with open(os.path.join(GOLDEN, f'{GOLDEN_NAME}.json'), encoding='utf-8') as f:
        meta = json.load(f)
    arrays = load_checkpoint_arrays(os.path.join(GOLDEN, f'{GOLDEN_NAME}.pth'))
    return meta, arrays, np.load(os.path.join(GOLDEN, f'{GOLDEN_NAME}.npz'))


@pytest.fixture(scope='module')
def dino_files(golden, tmp_path_factory):
    """The golden checkpoint as DINO's backbone-only, full and linear-evaluation files."""
    _, arrays, _ = golden
    backbone, head = split_head(arrays)
    folder = tmp_path_factory.mktemp('dino')
    full = {}
    for role, prefix, seed in (('student', 'module.', 1), ('teacher', '', 2)):
        full[role] = {f'{prefix}backbone.{k}': v for k, v in backbone.items()}
        full[role].update({f'{prefix}head.{k}': v for k, v in projection_head(64, seed).items()})
    full.update(optimizer={'state': {}, 'param_groups': [{'lr': 0.0005, 'params': [0, 1]}]}, epoch=300,
                args=argparse.Namespace(arch='xcit_small_12_p16', patch_size=16, out_dim=65536), dino_loss={
                    'center': np.zeros((1, 48), np.float32)})
    linear = {'epoch': 100, 'best_acc': 77.8,
              'state_dict': {'module.linear.weight': head['head.weight'], 'module.linear.bias': head['head.bias']},
              'optimizer': {'state': {}, 'param_groups': [{'lr': 0.001, 'momentum': 0.9, 'params': [0, 1]}]},
              'scheduler': {'T_max': 100, 'eta_min': 0, 'last_epoch': 100, 'base_lrs': [0.001]}}
    return {'backbone': torch_save(backbone, folder / 'dino_pretrain.pth'),
            'full': torch_save(full, folder / 'dino_pretrain_full_checkpoint.pth'),
            'linear': torch_save(linear, folder / 'dino_linearweights.pth')}


def outputs(cfg, weights, x):
    model = build_xcit(get_config(cfg))
    missing, unexpected = model.set_state_dict(paddle.load(weights))
    assert missing == [] and unexpected == []
    model.eval()
    with paddle.no_grad():
        return model(paddle.to_tensor(x)).numpy()


def test_backbone_with_linear_classifier_reproduces_the_official_logits(golden, dino_files, tmp_path, capsys):
    meta, _, reference = golden
    cfg = write_golden_yaml(meta, tmp_path / 'linear.yaml', NUM_CLASSES=10)
    dst = str(tmp_path / 'linear.pdparams')
    assert main(['--src', dino_files['backbone'], '--linear', dino_files['linear'], '--dst', dst, '--cfg', cfg]) == 0
    assert f'classifier from {dino_files["linear"]}, matches {cfg}' in capsys.readouterr().out
    case = meta['cases'][0]
    assert np.abs(outputs(cfg, dst, reference[case['input']]) - reference[case['logits']]).max() <= LOGITS_TOL


@pytest.mark.parametrize('key', ['teacher', 'student'])
def test_full_checkpoint_backbone_gives_the_official_features(golden, dino_files, tmp_path, capsys, key):
    meta, _, reference = golden
    cfg = write_golden_yaml(meta, tmp_path / 'backbone.yaml', NUM_CLASSES=0)
    dst = str(tmp_path / 'backbone.pdparams')
    assert main(['--src', dino_files['full'], '--key', key, '--dst', dst, '--cfg', cfg]) == 0
    out = capsys.readouterr().out
    others = ('student', 'optimizer', 'epoch', 'args', 'dino_loss') if key == 'teacher' else (
        'teacher', 'optimizer', 'epoch', 'args', 'dino_loss')
    assert f'ignored entries that are not weights: {", ".join(others)}' in out
    assert "took the weights under 'backbone.'; left out 6 others (a projection head): head.mlp.0.weight" in out
    case = meta['cases'][0]
    features = outputs(cfg, dst, reference[case['input']])
    assert features.shape == reference[case['features']].shape
    assert np.abs(features - reference[case['features']]).max() <= FEATURES_TOL


def test_backbone_only_file_converts_as_it_is(golden, dino_files, tmp_path):
    meta, arrays, _ = golden
    dst = str(tmp_path / 'backbone.pdparams')
    assert main(['--src', dino_files['backbone'], '--dst', dst,
                 '--cfg', write_golden_yaml(meta, tmp_path / 'backbone.yaml', NUM_CLASSES=0)]) == 0
    written = paddle.load(dst, return_numpy=True)
    assert not any(k.startswith('head.') for k in written)
    np.testing.assert_array_equal(written['blocks.0.mlp.fc1.weight'], arrays['blocks.0.mlp.fc1.weight'].T)


@pytest.mark.parametrize('args, message', [
    ([], "dino_pretrain_full_checkpoint.pth: not a checkpoint: no tensors found (top-level keys: student, teacher, "
         "optimizer, epoch, args, dino_loss); name the entry that holds the weights with --key"),
    (['--key', 'ema'], "dino_pretrain_full_checkpoint.pth: no entry 'ema' holding weights (top-level keys: student"),
])
def test_full_checkpoint_needs_the_key_of_its_weights(dino_files, tmp_path, capsys, args, message):
    dst = tmp_path / 'out.pdparams'
    assert main(['--src', dino_files['full'], '--dst', str(dst), *args]) == 1
    assert message in capsys.readouterr().err
    assert not dst.exists()


def test_linear_classifier_errors(golden, dino_files, tmp_path, capsys):
    dst = tmp_path / 'out.pdparams'
    # a checkpoint with a head of its own
    assert main(['--src', os.path.join(GOLDEN, f'{GOLDEN_NAME}.pth'), '--linear', dino_files['linear'],
                 '--dst', str(dst)]) == 1
    assert f'--linear {dino_files["linear"]}: the checkpoint has a classifier head already' in capsys.readouterr().err
    # a classifier for another width
    wide = torch_save({'state_dict': {'module.linear.weight': np.zeros((10, 96), np.float32),
                                      'module.linear.bias': np.zeros(10, np.float32)}}, tmp_path / 'wide.pth')
    assert main(['--src', dino_files['backbone'], '--linear', wide, '--dst', str(dst)]) == 1
    assert f'--linear {wide}: the classifier takes 96 features, the backbone gives 64' in capsys.readouterr().err
    # a folder
    assert main(['--src', dino_files['backbone'], '--linear', str(tmp_path), '--dst', str(dst)]) == 1
    assert f'{tmp_path} is a folder, not a checkpoint file' in capsys.readouterr().err
    # not a linear classifier at all
    assert main(['--src', dino_files['backbone'], '--linear', dino_files['backbone'], '--dst', str(dst)]) == 1
    err = capsys.readouterr().err
    found = sorted(load_checkpoint_arrays(dino_files['backbone']))
    assert (f'{dino_files["backbone"]}: not a linear classifier: expected linear.weight and linear.bias, found '
            f'{len(found)} entries: {", ".join(found[:5])} and {len(found) - 5} more') in err
    assert not dst.exists()
    with pytest.raises(SystemExit):  # one classifier, one backbone
        main(['--src', GOLDEN, '--linear', dino_files['linear'], '--dst', str(tmp_path)])
    assert '--linear belongs to one backbone' in capsys.readouterr().err


def test_repository_dino_configs():
    """The backbone configs have no head and DINO's evaluation crop; the linear ones 1000 classes."""
    for name in DINO_MODELS:
        backbone = get_config(os.path.join(ROOT, 'configs', 'dino', f'{name}_dino.yaml'))
        linear = get_config(os.path.join(ROOT, 'configs', 'dino', f'{name}_dino_linear.yaml'))
        reference = get_config(os.path.join(ROOT, 'configs', f'{name}_224.yaml'))
        for key in ('PATCH_SIZE', 'EMBED_DIM', 'DEPTH', 'NUM_HEADS', 'TOKENS_NORM', 'ETA'):
            assert backbone.MODEL[key] == linear.MODEL[key] == reference.MODEL[key], (name, key)
        assert (backbone.MODEL.NUM_CLASSES, linear.MODEL.NUM_CLASSES) == (0, 1000)
        assert backbone.DATA.CROP_PCT == linear.DATA.CROP_PCT == 0.875
        assert int(backbone.DATA.IMAGE_SIZE / backbone.DATA.CROP_PCT) == 256


def test_linear_probe_recipes_are_dinos_linear_evaluation():
    """configs/dino/linear_probe/: the backbone's model and evaluation transform, a 1000-class head
    trained alone with eval_linear.py's settings (SGD 0.9, no weight decay, lr 0.001 per 256 images,
    cosine to 0 over 100 epochs, crop and flip only, plain cross-entropy)."""
    for name in DINO_MODELS:
        backbone = get_config(os.path.join(ROOT, 'configs', 'dino', f'{name}_dino.yaml'))
        probe = get_config(os.path.join(ROOT, 'configs', 'dino', 'linear_probe', f'{name}.yaml'))
        for key in ('PATCH_SIZE', 'EMBED_DIM', 'DEPTH', 'NUM_HEADS', 'TOKENS_NORM', 'ETA', 'DROPPATH'):
            assert probe.MODEL[key] == backbone.MODEL[key], (name, key)
        for key in ('IMAGE_SIZE', 'CROP_PCT', 'INTERPOLATION'):
            assert probe.DATA[key] == backbone.DATA[key], (name, key)
        assert probe.DATA.BATCH_SIZE * 8 == 1024 and probe.MODEL.NUM_CLASSES == 1000
        t = probe.TRAIN
        assert t.FREEZE_BACKBONE and (t.OPTIMIZER.NAME, t.OPTIMIZER.MOMENTUM, t.WEIGHT_DECAY) == ('SGD', 0.9, 0.0)
        assert (t.BASE_LR, t.LINEAR_SCALED_LR, t.END_LR, t.NUM_EPOCHS, t.WARMUP_EPOCHS) == (0.001, 256, 0.0, 100, 0)
        assert (t.RAND_AUGMENT, t.COLOR_JITTER, t.MIXUP_PROB, t.RANDOM_ERASE_PROB, t.REPEATED_AUG) == (
            False, 0.0, 0.0, 0.0, False)
        assert (t.SMOOTHING, t.MODEL_EMA, t.HFLIP, t.TRAIN_INTERPOLATION) == (0.0, False, 0.5, 'bilinear')
        assert list(t.RANDOM_RESIZED_CROP_SCALE) == [0.08, 1.0]
