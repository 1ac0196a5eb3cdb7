"""Reading .pdparams files (``utils.load_checkpoint``): what ``paddle.load`` gives, without
running code from the file."""
import collections
import os
import pickle
import re
import subprocess
import sys

import numpy as np
import paddle
import pytest

from conftest import FIXTURES, ROOT
from utils import CheckpointError, load_checkpoint


def same(loaded, expected, where='state'):
    """Asserts two loaded structures are equal in types, keys, dtypes and values."""
    assert type(loaded) is type(expected), where
    if isinstance(expected, dict):
        assert list(loaded) == list(expected), where
        for key in expected:
            same(loaded[key], expected[key], f'{where}/{key}')
    elif isinstance(expected, (list, tuple)):
        assert len(loaded) == len(expected), where
        for i, (a, b) in enumerate(zip(loaded, expected)):
            same(a, b, f'{where}[{i}]')
    elif isinstance(expected, paddle.Tensor):
        assert loaded.dtype == expected.dtype and loaded.shape == expected.shape, where
        np.testing.assert_array_equal(loaded.numpy(), expected.numpy(), err_msg=where)
    else:
        assert loaded == expected, where


def test_what_paddle_save_writes_reads_as_paddle_load_gives_it(tmp_path):
    """A state dict (its name table dropped) and a nested training checkpoint: ordered dicts,
    tensors of several dtypes, numpy scalars, strings, None."""
    paddle.seed(0)
    layer = paddle.nn.Linear(3, 2)
    optimizer = paddle.optimizer.AdamW(parameters=layer.parameters())
    layer(paddle.randn([4, 3])).mean().backward()
    optimizer.step()
    checkpoint = {'model': layer.state_dict(), 'optimizer': optimizer.state_dict(), 'epoch': 3,
                  'best_acc': np.float64(71.25), 'labels': paddle.to_tensor([1, 2], dtype='int64'),
                  'best_epoch': None, 'config': 'MODEL:\n  NAME: x\n', 'sizes': [224, (384, 384)]}
    for name, state in (('state_dict', layer.state_dict()), ('checkpoint', checkpoint)):
        path = str(tmp_path / f'{name}.pdparams')
        paddle.save(state, path)
        same(load_checkpoint(path), paddle.load(path), name)


def test_paddle_2_1_pairs_and_split_big_arrays(tmp_path):
    """Paddle 2.1 pickled tensors as (name, array) pairs; protocols 2 and 3 split big arrays."""
    pairs = {'w': ('linear_0.w_0', np.arange(6, dtype=np.float32).reshape(2, 3)), 'step': np.array([5])}
    path = tmp_path / 'pairs.pdparams'
    path.write_bytes(pickle.dumps(pairs, protocol=2))
    loaded = load_checkpoint(str(path))
    np.testing.assert_array_equal(loaded['w'].numpy(), pairs['w'][1])
    assert isinstance(loaded['step'], np.ndarray)  # as paddle.load: with pairs, only they are tensors
    split = {'big': np.arange(4, dtype=np.float32), 'big@@.0': np.arange(4, dtype=np.float32),
             'big@@.1': np.arange(4, 8, dtype=np.float32),
             'UnpackBigParamInfor@@': {'big': {'OriginShape': (2, 4), 'slices': ['big@@.0', 'big@@.1']}}}
    del split['big']
    path.write_bytes(pickle.dumps(split, protocol=2))
    loaded = load_checkpoint(str(path))
    assert list(loaded) == ['big']
    np.testing.assert_array_equal(loaded['big'].numpy(), np.arange(8, dtype=np.float32).reshape(2, 4))


class RunsACommand:
    """Pickles as a call of os.system: what a hostile file does."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_a_file_that_would_run_code_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / 'ran'
    path = tmp_path / 'hostile.pdparams'
    path.write_bytes(pickle.dumps({'w': np.zeros(2), 'x': RunsACommand(f'touch {marker}')}))
    with pytest.raises(CheckpointError, match=rf"{path}: not a readable Paddle checkpoint .*refused global "
                                              rf"'(os|posix).system'"):
        load_checkpoint(str(path))
    assert not marker.exists()


class Calls:
    """Pickles as a call of ``func(*args)``."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


@pytest.mark.parametrize('name', ['builtins.exec', 'builtins.eval', 'builtins.getattr', 'subprocess.call'])
def test_builtins_and_other_callables_are_refused_too(tmp_path, name):
    """Only the numpy and container globals paddle.save writes are allowed, not builtins."""
    import builtins
    marker = tmp_path / 'ran'
    payload = {'builtins.exec': Calls(builtins.exec, f'open({str(marker)!r}, "w").close()'),
               'builtins.eval': Calls(builtins.eval, f'open({str(marker)!r}, "w").close()'),
               'builtins.getattr': Calls(builtins.getattr, [], 'clear'),
               'subprocess.call': Calls(subprocess.call, ['touch', str(marker)])}[name]
    path = tmp_path / 'hostile.pdparams'
    for protocol in (2, 4):  # GLOBAL and STACK_GLOBAL opcodes
        path.write_bytes(pickle.dumps({'w': np.zeros(2), 'x': payload}, protocol=protocol))
        # protocol 2 names modules as Python 2 did (__builtin__, commands)
        with pytest.raises(CheckpointError, match=rf"refused global '[\w.]+\.{name.split('.')[1]}'"):
            load_checkpoint(str(path))
    assert not marker.exists()


def test_the_training_entry_points_read_through_it(tmp_path):
    """-pretrained of the evaluation: the hostile file is an error line, and nothing runs."""
    marker = tmp_path / 'ran'
    path = tmp_path / 'hostile.pdparams'
    path.write_bytes(pickle.dumps({'w': np.zeros(2), 'x': RunsACommand(f'touch {marker}')}))
    done = subprocess.run([sys.executable, os.path.join(ROOT, 'main_single_gpu.py'), '-cfg',
                           os.path.join(ROOT, 'configs', 'demo', 'xcit_nano_12_p8_digits.yaml'), '-eval',
                           '-pretrained', str(path), '-output', str(tmp_path / 'out')],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 1 and 'refused global' in done.stderr.strip().splitlines()[-1]
    assert not marker.exists()


def test_containers_that_hold_themselves_or_share_parts(tmp_path):
    path = tmp_path / 'cycle.pdparams'
    loop = []
    loop.append(loop)
    path.write_bytes(pickle.dumps({'loop': loop}))
    with pytest.raises(CheckpointError, match='a container holds itself'):
        load_checkpoint(str(path))
    # one list shared 2 x 2 x ... 40 levels deep: read once, not 2 ** 40 times
    shared = [np.zeros(1)]
    for _ in range(40):
        shared = [shared, shared]
    path.write_bytes(pickle.dumps({'shared': shared}))
    assert isinstance(load_checkpoint(str(path))['shared'], list)


@pytest.mark.parametrize('content', [b'', b'\x80\x04not a pickle', pickle.dumps([1, 2]),
                                     pickle.dumps(collections.OrderedDict(a=1))[:-3]])
def test_files_that_are_no_checkpoint_are_named(tmp_path, content):
    path = tmp_path / 'bad.pdparams'
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=str(path)):
        load_checkpoint(str(path))


def test_a_missing_file_or_one_of_no_dict_says_so(tmp_path):
    path = tmp_path / 'none.pdparams'
    with pytest.raises(CheckpointError, match=re.escape(f'checkpoint not found: {path}')):
        load_checkpoint(str(path))
    with pytest.raises(CheckpointError, match=re.escape(f'{tmp_path} is a folder, not a checkpoint file')):
        load_checkpoint(str(tmp_path))
    path.write_bytes(pickle.dumps([np.zeros(2)]))
    with pytest.raises(CheckpointError, match=re.escape(f'{path}: expected a dict, got list')):
        load_checkpoint(str(path))


def test_a_dict_of_other_things_than_arrays_is_no_state_dict(tmp_path):
    """A dict whose entries are not arrays (another program's checkpoint layout) is named as no
    state dict with its first non-array entries, before any model sees it."""
    from utils import weights_of
    path = tmp_path / 'other.pdparams'
    paddle.save({'state': {'w': paddle.ones([2])}, 'w': paddle.ones([2]), 'epoch': 3}, str(path))
    with pytest.raises(CheckpointError, match=re.escape(f"{path}: not a state dict (nor a training checkpoint with "
                                                        f"one under 'model'): entries 'state', 'epoch' are not arrays")):
        weights_of(load_checkpoint(str(path)), str(path))


@pytest.mark.parametrize('name, kind', [
    ('xcit_golden/mini_p16_cls_norm.pth', 'a PyTorch checkpoint'),
    ('torch_checkpoints/storage_kinds_legacy.pth', 'a PyTorch checkpoint (legacy format)'),
    ('xcit_golden/mini_p8_tokens_norm.timm.safetensors', 'a safetensors file'),
])
def test_an_unconverted_checkpoint_is_named_with_the_conversion_to_run(name, kind):
    path = os.path.join(FIXTURES, name)
    with pytest.raises(CheckpointError, match=re.escape(f'{path} is {kind}, not a Paddle .pdparams: convert it '
                                                        f'first, e.g. python port_weights/convert.py --src {path}')):
        load_checkpoint(path)


def test_numpy_1_and_2_files_read_under_either(tmp_path):
    """numpy 2 pickles arrays by numpy._core, numpy 1 by numpy.core: both names are known.
    (Protocol 2 names globals as text lines, so that one name can be swapped for the other.)"""
    array = np.arange(3, dtype=np.float16)
    data = pickle.dumps({'a': array, 'b': np.float32(2.5)}, protocol=2)
    names = (b'numpy.core.multiarray\n', b'numpy._core.multiarray\n')
    written = next(name for name in names if name in data)
    for name in names:
        path = tmp_path / 'np.pdparams'
        path.write_bytes(data.replace(written, name))
        loaded = load_checkpoint(str(path))
        np.testing.assert_array_equal(loaded['a'].numpy(), array)
        assert loaded['b'] == np.float32(2.5)
