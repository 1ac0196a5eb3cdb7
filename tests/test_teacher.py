"""RegNetY-16GF (timm's regnety_160), its checkpoint converter, and build_teacher."""
import json
import math
import os
import re
import struct

import numpy as np
import paddle
import pytest

from config import ConfigError, get_config, merge_from_list
from conftest import FIXTURES, ROOT
from port_weights.convert import CheckpointError, check_fits, convert_state_dict, state_shapes
from port_weights.convert_regnet import convert_regnet_file, main as convert_main
from regnet import REGNETY_160, RegNet, regnet_stages, regnety_160
from teacher import build_teacher
from xcit import build_xcit

NANO_YAML = os.path.join(ROOT, 'configs', 'xcit_nano_12_p16_224.yaml')
with open(os.path.join(FIXTURES, 'regnety_160_timm_state_dict.json')) as f:
    TIMM_SHAPES = json.load(f)['state_dict']  # timm's names and shapes
TINY_TIMM = os.path.join(FIXTURES, 'regnety_tiny_timm.npz')  # see tests/fixtures/README.md
TINY_REGNETY = dict(w0=8, wa=8, wm=1.8, depth=6, group_size=12, se_ratio=0.25, stem_width=8)


@pytest.fixture(scope='module')
def regnet():
    """One regnety_160 for the whole module: building its 84M parameters takes seconds."""
    paddle.seed(0)
    model = regnety_160()
    model.eval()
    return model


def write_safetensors(path, shapes, values):
    """A safetensors file of float32 tensors (int64 counters) with the given ``values`` and zeros
    elsewhere; the zeros are a sparse hole, so even 335 MB cost next to nothing to write."""
    header, offset = {}, 0
    for name, shape in shapes.items():
        dtype, itemsize = ('I64', 8) if name.endswith('num_batches_tracked') else ('F32', 4)
        size = math.prod(shape) * itemsize
        header[name] = {'dtype': dtype, 'shape': shape, 'data_offsets': [offset, offset + size]}
        offset += size
    blob = json.dumps(header).encode()
    blob += b' ' * (-len(blob) % 8)
    with open(path, 'wb') as f:
        f.write(struct.pack('<Q', len(blob)) + blob)
        base = f.tell()
        f.truncate(base + offset)
        for name, value in values.items():
            f.seek(base + header[name]['data_offsets'][0])
            f.write(np.ascontiguousarray(value, dtype='float32').tobytes())


def small_config(*opts):
    config = get_config()
    config.defrost()
    merge_from_list(config, ['MODEL.NUM_CLASSES', 10] + list(opts))
    config.freeze()
    return config


def test_stage_layout():
    cfg = {k: v for k, v in REGNETY_160.items() if k != 'se_ratio'}
    assert regnet_stages(**cfg) == ([224, 448, 1232, 3024], [2, 4, 11, 1], [112, 112, 112, 112])


def test_reduced_regnety_computes_timms_logits():
    """A reduced RegNetY with timm's random weights, converted by the converter's rules, gives the
    eval-mode logits of timm's RegNet (computed in float64) on odd-sized images. Its stages
    cover what regnety_160 uses: a group size capped at the width (s1) and a width rounded to
    it (s2), several groups (s3, s4), SE widths from the block's input, strided and identity
    shortcuts, BatchNorm variances small enough for eps to matter."""
    with np.load(TINY_TIMM) as f:
        fixture = dict(f)
    timm_state = {k.split('/', 1)[1]: v for k, v in fixture.items() if k.startswith('state_dict/')}
    stage_args = {k: v for k, v in TINY_REGNETY.items() if k not in ('se_ratio', 'stem_width')}
    assert regnet_stages(**stage_args) == ([8, 12, 24, 48], [1, 1, 2, 2], [8, 12, 12, 12])
    model = RegNet(num_classes=10, **TINY_REGNETY)
    arrays = convert_state_dict(timm_state)
    check_fits(arrays, state_shapes(model.state_dict()), 'the reduced RegNetY')
    model.set_state_dict(arrays)
    model.eval()
    with paddle.no_grad():
        logits = model(paddle.to_tensor(fixture['images'])).numpy()
    np.testing.assert_allclose(logits, fixture['logits'], rtol=1e-5, atol=1e-5)


def test_parameter_count_and_forward(regnet):
    # timm's regnety_160: 83,590,140 parameters (83.6M), BatchNorm statistics not counted
    assert sum(math.prod(p.shape) for p in regnet.parameters() if not p.stop_gradient) == 83_590_140
    with paddle.no_grad():
        logits = regnet(paddle.randn([2, 3, 40, 56]))
    assert logits.shape == [2, 1000]
    assert np.isfinite(logits.numpy()).all()


def test_names_and_shapes_are_timms(regnet):
    """Every timm entry maps to one of ours (BN statistics renamed, counters dropped, Linear
    transposed) and nothing else exists."""
    renames = {'running_mean': '_mean', 'running_var': '_variance'}
    expected = {}
    for name, shape in TIMM_SHAPES.items():
        prefix, leaf = name.rsplit('.', 1)
        if leaf == 'num_batches_tracked':
            continue
        expected[f'{prefix}.{renames.get(leaf, leaf)}'] = shape[::-1] if name == 'head.fc.weight' else shape
    assert {k: list(v.shape) for k, v in regnet.state_dict().items()} == expected


@pytest.fixture(scope='module')
def converted(tmp_path_factory):
    """A synthetic timm regnety_160 checkpoint (safetensors) and its conversion, deleted afterwards
    (the .pdparams holds 335 MB)."""
    folder = tmp_path_factory.mktemp('regnet')
    rng = np.random.default_rng(0)
    values = {name: rng.normal(size=TIMM_SHAPES[name]).astype('float32')
              for name in ('stem.conv.weight', 'stem.bn.running_mean', 's1.b1.se.fc1.weight',
                           's4.b1.downsample.bn.running_var', 'head.fc.weight', 'head.fc.bias')}
    src, dst = folder / 'regnety_160.safetensors', folder / 'regnety_160.pdparams'
    write_safetensors(src, TIMM_SHAPES, values)
    parameters = convert_regnet_file(str(src), str(dst))
    yield values, dst, parameters
    src.unlink()
    dst.unlink()


def test_converter_maps_timm_to_paddle(converted):
    values, dst, parameters = converted
    assert parameters == 83_590_140
    state = paddle.load(str(dst))
    assert len(state) == len(TIMM_SHAPES) - sum(n.endswith('num_batches_tracked') for n in TIMM_SHAPES)
    np.testing.assert_array_equal(state['head.fc.weight'], values['head.fc.weight'].T)
    np.testing.assert_array_equal(state['head.fc.bias'], values['head.fc.bias'])
    np.testing.assert_array_equal(state['stem.conv.weight'], values['stem.conv.weight'])
    np.testing.assert_array_equal(state['stem.bn._mean'], values['stem.bn.running_mean'])
    np.testing.assert_array_equal(state['s4.b1.downsample.bn._variance'],
                                  values['s4.b1.downsample.bn.running_var'])
    np.testing.assert_array_equal(state['s1.b1.se.fc1.weight'], values['s1.b1.se.fc1.weight'])
    assert not np.asarray(state['s3.b5.conv2.conv.weight']).any()


def test_converter_rejects_other_checkpoints(tmp_path, capsys):
    src, dst = tmp_path / 'partial.safetensors', tmp_path / 'out.pdparams'
    shapes = {'stem.conv.weight': [32, 3, 3, 3], 'head.fc.weight': [10, 3024], 'head.fc.bias': [10],
              'extra.weight': [2]}
    write_safetensors(src, shapes, {})
    with pytest.raises(CheckpointError, match='does not fit regnety_160') as info:
        convert_regnet_file(str(src), str(dst))
    message = str(info.value)
    assert 's4.b1.conv3.bn._variance' in message and 'missing from checkpoint' in message
    assert 'extra.weight' in message and 'unexpected in checkpoint' in message
    assert not dst.exists()

    write_safetensors(src, {'blocks.0.gamma1': [4]}, {})
    assert convert_main(['--src', str(src), '--dst', str(dst)]) == 1
    assert 'not a regnety_160 checkpoint' in capsys.readouterr().err

    write_safetensors(src, {'stem.bn.running_mean': [32], 'stem.bn._mean': [32]}, {})  # one name twice
    with pytest.raises(CheckpointError, match=rf'^{re.escape(str(src))}: .*both become stem.bn._mean'):
        convert_regnet_file(str(src), str(dst))
    assert not dst.exists()


def test_build_regnet_teacher(converted):
    values, dst, _ = converted
    config = small_config('MODEL.NUM_CLASSES', 1000, 'TRAIN.TEACHER_PRETRAINED', str(dst))
    teacher = build_teacher(config)
    assert not teacher.training and all(p.stop_gradient for p in teacher.parameters())
    np.testing.assert_array_equal(teacher.head.fc.weight.numpy(), values['head.fc.weight'].T)
    np.testing.assert_array_equal(teacher.stem.bn._mean.numpy(), values['stem.bn.running_mean'])


def test_build_xcit_teacher_from_yaml(tmp_path):
    paddle.seed(1)
    source = build_xcit(small_config('MODEL.EMBED_DIM', 64, 'MODEL.DEPTH', 1, 'MODEL.NUM_HEADS', 2))
    weights = tmp_path / 'teacher.pdparams'
    paddle.save(source.state_dict(), str(weights))
    yaml = tmp_path / 'teacher.yaml'
    yaml.write_text('MODEL:\n  EMBED_DIM: 64\n  DEPTH: 1\n  NUM_HEADS: 2\n  NUM_CLASSES: 1000\n')
    # the student's MODEL.NUM_CLASSES (10) wins over the teacher YAML's
    teacher = build_teacher(small_config('TRAIN.TEACHER_MODEL', str(yaml),
                                         'TRAIN.TEACHER_PRETRAINED', str(weights)))
    assert not teacher.training and all(p.stop_gradient for p in teacher.parameters())
    source.eval()
    x = paddle.randn([2, 3, 32, 32])
    np.testing.assert_array_equal(teacher(x).numpy(), source(x).numpy())

    # a training checkpoint of the teacher works as well: its 'model' weights are used
    checkpoint = tmp_path / 'last.pdparams'
    paddle.save({'model': source.state_dict(), 'epoch': 3}, str(checkpoint))
    teacher = build_teacher(small_config('TRAIN.TEACHER_MODEL', str(yaml),
                                         'TRAIN.TEACHER_PRETRAINED', str(checkpoint)))
    np.testing.assert_array_equal(teacher(x).numpy(), source(x).numpy())

    other = tmp_path / 'other.pdparams'
    paddle.save(build_xcit(get_config(NANO_YAML)).state_dict(), str(other))
    mismatch = 'TRAIN.TEACHER_PRETRAINED: .*other.pdparams does not fit the teacher model'
    with pytest.raises(CheckpointError, match=mismatch) as info:
        build_teacher(small_config('TRAIN.TEACHER_MODEL', str(yaml), 'TRAIN.TEACHER_PRETRAINED', str(other)))
    # the differences come as a table of keys and shapes
    assert re.search(r'cls_token +\[1, 1, 128\] +\[1, 1, 64\] +shape mismatch', str(info.value))
    assert re.search(r'blocks\.1\.norm1\.weight +\[128\] +- +unexpected in checkpoint', str(info.value))


def test_teacher_errors(tmp_path):
    with pytest.raises(ConfigError, match='TRAIN.TEACHER_PRETRAINED is empty'):
        build_teacher(small_config())
    with pytest.raises(CheckpointError, match='TRAIN.TEACHER_PRETRAINED: checkpoint not found: .*nowhere.pdparams'):
        build_teacher(small_config('TRAIN.TEACHER_PRETRAINED', str(tmp_path / 'nowhere.pdparams')))
    junk = tmp_path / 'junk.pdparams'
    junk.write_text('not a checkpoint')
    with pytest.raises(ConfigError, match='TRAIN.TEACHER_MODEL.*resnet50'):
        build_teacher(small_config('TRAIN.TEACHER_MODEL', 'resnet50', 'TRAIN.TEACHER_PRETRAINED', str(junk)))
    with pytest.raises(ConfigError, match='TRAIN.TEACHER_MODEL.*missing.yaml'):
        build_teacher(small_config('TRAIN.TEACHER_MODEL', str(tmp_path / 'missing.yaml'),
                                   'TRAIN.TEACHER_PRETRAINED', str(junk)))
    with pytest.raises(CheckpointError, match='TRAIN.TEACHER_PRETRAINED: .*junk.pdparams: not a readable'):
        build_teacher(small_config('TRAIN.TEACHER_MODEL', NANO_YAML, 'TRAIN.TEACHER_PRETRAINED', str(junk)))
