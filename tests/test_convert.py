"""The checkpoint converter: name and layout mapping, safe reading, errors, command line.

``fixtures/torch_checkpoints/`` holds two tiny files written by torch (see the fixtures
README); every other odd or hostile file is made here.
"""
import collections
import functools
import io
import json
import os
import pickle
import shutil
import re
import struct
import zipfile

import numpy as np
import paddle
import pytest
import yaml

from conftest import FIXTURES, GOLDEN, write_torch_zip
from config import get_config
from port_weights import safe_load
from port_weights.convert import (CheckpointError, convert_state_dict, count_parameters, find_mismatches,
                                  from_timm_layout, load_checkpoint_arrays, main, model_shapes,
                                  write_pdparams)
from port_weights.safe_load import read_checkpoint

TORCH_FILES = os.path.join(FIXTURES, 'torch_checkpoints')
STORAGE_KINDS = [os.path.join(TORCH_FILES, 'storage_kinds.pth'),
                 os.path.join(TORCH_FILES, 'storage_kinds_legacy.pth')]
with open(os.path.join(GOLDEN, 'official_state_dict_manifest.json'), encoding='utf-8') as _f:
    MANIFEST = json.load(_f)


@functools.lru_cache(maxsize=None)
def manifest_model_shapes(arch):
    config = get_config()
    config.defrost()
    config.MODEL.update({k.upper(): v for k, v in MANIFEST[arch]['config'].items()})
    return model_shapes(config)


def shaped_like(shapes):
    """Zero-cost float32 arrays (one broadcast element) with the given shapes."""
    return {name: np.broadcast_to(np.float32(0), shape) for name, shape in shapes.items()}


def to_timm_layout(arrays):
    """The official layout as timm stores it: ``pos_embed.``, class-attention q, k, v split."""
    out = {}
    for name, value in arrays.items():
        if name.startswith('cls_attn_blocks.') and '.attn.qkv.' in name:
            for part, chunk in zip('qkv', np.split(value, 3, axis=0)):
                out[name.replace('.qkv.', f'.{part}.')] = chunk
        elif name.startswith('pos_embeder.'):
            out['pos_embed.' + name[len('pos_embeder.'):]] = value
        elif not name.endswith('num_batches_tracked'):
            out[name] = value
    return out


@pytest.mark.parametrize('layout', ['official', 'timm'])
@pytest.mark.parametrize('arch', sorted(MANIFEST))
def test_official_checkpoint_shapes_fill_our_model_exactly(arch, layout):
    arrays = shaped_like(MANIFEST[arch]['state_dict'])
    if layout == 'timm':
        arrays = to_timm_layout(arrays)
    converted = convert_state_dict(arrays)
    assert find_mismatches(converted, manifest_model_shapes(arch)) == []
    assert count_parameters(converted) == MANIFEST[arch]['params']


def test_mismatches_list_missing_unexpected_and_shapes():
    expected = {'a.weight': (4, 3), 'b': (2,), 'c': (5,)}
    arrays = shaped_like({'a.weight': (3, 4), 'b': (2,), 'extra': (1,)})
    assert find_mismatches(arrays, expected) == [
        ('a.weight', (3, 4), (4, 3)), ('c', None, (5,)), ('extra', (1,), None)]


def test_linear_weights_transposed_batchnorm_renamed_counters_dropped():
    arrays = {
        'head.weight': np.arange(6, dtype=np.float32).reshape(2, 3),
        'patch_embed.proj.0.0.weight': np.ones((4, 3, 3, 3), np.float32),
        'patch_embed.proj.0.1.running_mean': np.ones(4, np.float32),
        'patch_embed.proj.0.1.running_var': np.full(4, 2, np.float32),
        'patch_embed.proj.0.1.num_batches_tracked': np.array(9),
        'blocks.0.attn.temperature': np.ones((2, 1, 1), np.float64),
    }
    out = convert_state_dict(arrays)
    assert sorted(out) == ['blocks.0.attn.temperature', 'head.weight', 'patch_embed.proj.0.0.weight',
                           'patch_embed.proj.0.1._mean', 'patch_embed.proj.0.1._variance']
    np.testing.assert_array_equal(out['head.weight'], arrays['head.weight'].T)
    assert out['patch_embed.proj.0.0.weight'].shape == (4, 3, 3, 3)
    np.testing.assert_array_equal(out['patch_embed.proj.0.1._variance'], 2)
    assert all(v.dtype == np.float32 for v in out.values())
    assert all(v.dtype == np.float16 for v in convert_state_dict(arrays, 'float16').values())


def test_dataparallel_module_prefix_is_stripped_only_when_every_key_has_it():
    arrays = {'module.head.weight': np.ones((2, 3), np.float32), 'module.cls_token': np.ones((1, 1, 3), np.float32)}
    assert sorted(convert_state_dict(arrays)) == ['cls_token', 'head.weight']
    arrays['other.module.x'] = np.ones(1, np.float32)
    assert 'module.cls_token' in convert_state_dict(arrays)


def test_timm_class_attention_qkv_concatenated_in_q_k_v_order():
    arrays = {f'cls_attn_blocks.0.attn.{p}.{leaf}': np.full(shape, i, np.float32)
              for i, p in enumerate('qkv') for leaf, shape in [('weight', (2, 2)), ('bias', (2,))]}
    out = from_timm_layout(arrays)
    np.testing.assert_array_equal(out['cls_attn_blocks.0.attn.qkv.bias'], [0, 0, 1, 1, 2, 2])
    assert out['cls_attn_blocks.0.attn.qkv.weight'].shape == (6, 2)
    del arrays['cls_attn_blocks.0.attn.k.bias']
    with pytest.raises(CheckpointError, match=r'cls_attn_blocks\.0\.attn\.qkv\.bias: .* no k'):
        from_timm_layout(arrays)


@pytest.mark.parametrize('path', STORAGE_KINDS, ids=['zip', 'legacy'])
def test_reads_every_storage_kind_exactly(path):
    arrays = load_checkpoint_arrays(path)
    base = np.arange(20, dtype=np.float32).reshape(4, 5)
    expected = {
        'head.weight': (np.arange(12, dtype=np.float32).reshape(3, 4) / 8, np.float32),  # bfloat16
        'head.bias': (np.arange(3) / 4, np.float16),
        'blocks.0.gamma1': (np.arange(4) / 2, np.float64),
        'blocks.0.attn.proj.weight': (base.T, np.float32),  # non-contiguous view
        'cls_token': (base[1:3], np.float32),  # storage offset 5 into the same storage
        'patch_embed.proj.0.1.running_mean': ([1, 2], np.float32),
        'patch_embed.proj.0.1.running_var': ([3, 4], np.float32),
        'patch_embed.proj.0.1.num_batches_tracked': (7, np.int64),
    }
    assert list(arrays) == list(expected)
    for name, (values, dtype) in expected.items():
        assert arrays[name].dtype == dtype, name
        np.testing.assert_array_equal(arrays[name], values, err_msg=name)


def test_cli_reports_ignored_entries_and_writes_float32(tmp_path, capsys):
    dst = tmp_path / 'out.pdparams'
    assert main(['--src', STORAGE_KINDS[0], '--dst', str(dst)]) == 0
    out = capsys.readouterr().out
    assert 'ignored entries that are not weights: optimizer, epoch, args' in out
    assert f'-> {dst}: 7 tensors, 49 parameters, float32' in out
    written = paddle.load(str(dst), return_numpy=True)
    assert all(v.dtype == np.float32 for v in written.values())
    np.testing.assert_array_equal(written['head.weight'], np.arange(12).reshape(3, 4).T / 8)
    assert os.listdir(tmp_path) == ['out.pdparams']  # no temporary file left


def test_cli_float16_output_into_a_folder(tmp_path):
    assert main(['--src', STORAGE_KINDS[0], '--dst', str(tmp_path), '--dtype', 'float16']) == 0
    written = paddle.load(str(tmp_path / 'storage_kinds.pdparams'), return_numpy=True)
    assert all(v.dtype == np.float16 for v in written.values())


def test_a_dst_ending_in_a_slash_is_a_folder_made_for_it(tmp_path):
    assert main(['--src', STORAGE_KINDS[0], '--dst', str(tmp_path / 'new') + '/']) == 0
    assert sorted(os.listdir(tmp_path / 'new')) == ['storage_kinds.pdparams']


def test_dst_that_is_src_is_refused(tmp_path, capsys):
    src = tmp_path / 'model.pth'
    shutil.copy(STORAGE_KINDS[0], src)
    assert main(['--src', str(src), '--dst', str(src)]) == 1
    assert f'error: --dst {src} is --src: the conversion would replace the checkpoint it reads' in capsys.readouterr().err
    assert src.read_bytes() == open(STORAGE_KINDS[0], 'rb').read()


def test_float16_weights_load_into_a_float32_model(tmp_path):
    """What ``--dtype float16`` writes is taken by every loader of the project (set_state_dict alone
    refuses another dtype), as the float32 values of its float16 numbers."""
    import logging

    import engine
    from utils import load_every_weight
    from xcit import build_xcit
    config = get_config()
    config.defrost()
    config.MODEL.update({'EMBED_DIM': 32, 'DEPTH': 1, 'NUM_HEADS': 2, 'NUM_CLASSES': 3})
    source = build_xcit(config)
    half = {name: value.numpy().astype(np.float16) for name, value in source.state_dict().items()}
    path = str(tmp_path / 'half.pdparams')
    paddle.save(half, path)
    for load in (lambda model: load_every_weight(model, path, 'the model'),
                 lambda model: engine.load_pretrained(model, path, False, logging.getLogger('test'))):
        model = build_xcit(config)
        load(model)
        for name, value in model.state_dict().items():
            assert value.dtype == paddle.float32, name
            np.testing.assert_array_equal(value.numpy(), half[name].astype(np.float32))


class Payload:
    """Pickles as a call of ``func(*args)``: what a hostile checkpoint would smuggle in."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def hostile_payloads(marker):
    import builtins
    import os as os_module
    import subprocess
    return {
        'os.system': Payload(os_module.system, f'touch {marker}'),
        'subprocess.call': Payload(subprocess.call, ['touch', str(marker)]),
        'builtins.exec': Payload(builtins.exec, f'open({str(marker)!r}, "w").close()'),
    }


@pytest.mark.parametrize('container', ['zip', 'legacy'])
@pytest.mark.parametrize('kind', ['os.system', 'subprocess.call', 'builtins.exec'])
def test_hostile_pickle_is_refused_and_never_runs(tmp_path, capsys, kind, container):
    marker = tmp_path / 'pwned'
    payload = hostile_payloads(marker)[kind]
    src, dst = tmp_path / 'evil.pth', tmp_path / 'evil.pdparams'
    if container == 'zip':  # protocol 2, as torch.save writes: GLOBAL opcodes
        write_torch_zip(src, pickle.dumps({'model': {'head.weight': payload}}, protocol=2))
    else:  # protocol 4: STACK_GLOBAL opcodes
        src.write_bytes(pickle.dumps(safe_load.LEGACY_MAGIC, protocol=4) + pickle.dumps(payload, protocol=4))
    assert main(['--src', str(src), '--dst', str(dst)]) == 1
    err = capsys.readouterr().err
    assert re.search(rf"refused global '[\w.]+\.{payload.func.__name__}'", err)
    assert str(src) in err and len(err.strip().splitlines()) == 1
    assert not marker.exists() and not dst.exists()


def test_a_paddle_file_is_not_converted_again(tmp_path, capsys):
    src = tmp_path / 'converted.pdparams'
    paddle.save({'w': paddle.ones([2])}, str(src))
    assert main(['--src', str(src), '--dst', str(tmp_path / 'again.pdparams')]) == 1
    assert (f'{src}: a pickle, but not one written by torch.save; a Paddle .pdparams (a converted file or a '
            f'training checkpoint) needs no conversion: use it as it is') in capsys.readouterr().err


def test_view_past_the_end_of_its_storage_is_refused(tmp_path):
    # the golden's first tensor, cls_token (64 elements of a 64-element storage), moved to offset 16
    with zipfile.ZipFile(os.path.join(GOLDEN, 'mini_p16_cls_norm.pth')) as archive:
        files = {n: archive.read(n) for n in archive.namelist()}
    pkl = 'mini_p16_cls_norm/data.pkl'
    assert files[pkl].count(b'QK\x00') > 1
    files[pkl] = files[pkl].replace(b'QK\x00', b'QK\x10', 1)  # BINPERSID, then offset BININT1 0 -> 16
    src = tmp_path / 'bad_view.pth'
    with zipfile.ZipFile(src, 'w') as archive:
        for name, raw in files.items():
            archive.writestr(name, raw)
    with pytest.raises(CheckpointError, match=r'model\.cls_token: tensor of size \[1, 1, 64\] reads past '
                                              r'the end of its storage \(64 elements\)'):
        load_checkpoint_arrays(str(src))


@pytest.mark.parametrize('name', ['xcit_golden/mini_p16_cls_norm.pth',
                                  'xcit_golden/mini_p8_tokens_norm.timm.safetensors',
                                  'torch_checkpoints/storage_kinds_legacy.pth'])
def test_truncated_file_is_a_clear_error(tmp_path, capsys, name):
    raw = open(os.path.join(FIXTURES, name), 'rb').read()
    src, dst = tmp_path / os.path.basename(name), tmp_path / 'out.pdparams'
    src.write_bytes(raw[:len(raw) // 2])
    assert main(['--src', str(src), '--dst', str(dst)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f'error: {src}: ') and len(err.splitlines()) == 1
    assert 'truncated' in err or 'corrupt' in err
    assert os.listdir(tmp_path) == [src.name]


@pytest.mark.parametrize('content,message', [
    (b'model weights, honestly\n', 'not a checkpoint'),
    (pickle.dumps([1, 2, 3], protocol=2), 'a pickle, but not one written by torch.save'),
    (None, 'zip archive without data.pkl'),
])
def test_files_that_are_not_checkpoints(tmp_path, capsys, content, message):
    src = tmp_path / 'x.pth'
    if content is None:
        with zipfile.ZipFile(src, 'w') as archive:
            archive.writestr('notes.txt', 'hello')
    else:
        src.write_bytes(content)
    assert main(['--src', str(src), '--dst', str(tmp_path / 'x.pdparams')]) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / 'x.pdparams').exists()


def test_missing_source(tmp_path, capsys):
    assert main(['--src', str(tmp_path / 'nope.pth'), '--dst', str(tmp_path / 'x.pdparams')]) == 1
    assert capsys.readouterr().err.strip() == f'error: checkpoint not found: {tmp_path / "nope.pth"}'
    assert os.listdir(tmp_path) == []


def test_wrong_architecture_lists_mismatches_and_writes_nothing(tmp_path, capsys):
    cfg = tmp_path / 'mini.yaml'
    cfg.write_text(yaml.safe_dump({'MODEL': {'PATCH_SIZE': 16, 'EMBED_DIM': 64, 'DEPTH': 2, 'NUM_HEADS': 2}}))
    dst = tmp_path / 'nano.pdparams'
    src = os.path.join(GOLDEN, 'xcit_nano_12_p16.pth')
    assert main(['--src', src, '--dst', str(dst), '--cfg', str(cfg)]) == 1
    err = capsys.readouterr().err
    assert f'{src} does not fit the model of {cfg}' in err
    rows = {line.split()[0]: line.split(None, 1)[1] for line in err.splitlines()[2:]}
    assert rows['cls_token'].split() == ['[1,', '1,', '128]', '[1,', '1,', '64]', 'shape', 'mismatch']
    assert rows['blocks.11.attn.qkv.weight'].endswith('unexpected in checkpoint')
    assert rows['head.weight'].startswith('[128, 1000]')
    assert not dst.exists()


def test_folder_mode_reports_each_file_and_fails_if_any_fails(tmp_path, capsys):
    src, out = tmp_path / 'in', tmp_path / 'out'
    src.mkdir()
    (src / 'good.pth').write_bytes(open(STORAGE_KINDS[0], 'rb').read())
    (src / 'bad.bin').write_bytes(b'nothing here')
    (src / 'notes.txt').write_text('not a checkpoint name, skipped')
    assert main(['--src', str(src), '--dst', str(out)]) == 1
    captured = capsys.readouterr()
    assert f'{src / "good.pth"} -> {out / "good.pdparams"}' in captured.out
    assert '1 of 2 files converted' in captured.out
    assert f'error: {src / "bad.bin"}: not a checkpoint' in captured.err
    assert os.listdir(out) == ['good.pdparams']


class TorchName:
    """A torch global (``module.name``) that ``RecordPickler`` writes by name: torch is not needed."""

    def __init__(self, module, name):
        self.module, self.name = module, name

    def __call__(self, *args):  # pickle's save_reduce wants a callable; never called here
        raise NotImplementedError


Storage = collections.namedtuple('Storage', 'key numel')  # a FloatStorage of ``numel`` elements


class Tensor:
    """A tensor as torch pickles it: ``size`` elements of ``storage`` from ``offset`` by ``stride``
    (in elements), whatever those are; one object pickled twice is one object unpickled."""

    def __init__(self, storage, offset, size, stride):
        self.args = (storage, offset, tuple(size), tuple(stride), False, collections.OrderedDict())

    def __reduce__(self):
        return TorchName('torch._utils', '_rebuild_tensor_v2'), self.args


class RecordPickler(pickle._Pickler):
    """Pickles ``Tensor`` and ``Storage`` objects as torch.save does (protocol 2)."""

    def __init__(self, file):
        super().__init__(file, protocol=2)

    def persistent_id(self, obj):
        if isinstance(obj, Storage):
            return 'storage', TorchName('torch', 'FloatStorage'), obj.key, 'cpu', obj.numel
        return None

    def save(self, obj, save_persistent_id=True):
        if isinstance(obj, TorchName):
            self.write(pickle.GLOBAL + f'{obj.module}\n{obj.name}\n'.encode('ascii'))
        else:
            super().save(obj, save_persistent_id)


def record_pickle(obj):
    buffer = io.BytesIO()
    RecordPickler(buffer).dump(obj)
    return buffer.getvalue()


def float_storages(**values):
    """``(key, bytes)`` storage files of float32 ``values`` per key, as ``write_torch_zip`` takes."""
    return [(key, np.asarray(v, '<f4').tobytes()) for key, v in values.items()]


def legacy_file(path, obj, storages, little_endian=True, numels=None):
    """``obj`` in torch.save's legacy format with the ``(key, bytes)`` float32 ``storages``; each
    storage's element count is written as ``numels[key]`` when given; returns the path."""
    sys_info = {'protocol_version': 1001, 'little_endian': little_endian,
                'type_sizes': {'short': 2, 'int': 4, 'long': 4}}
    parts = [pickle.dumps(safe_load.LEGACY_MAGIC, protocol=2), pickle.dumps(1001, protocol=2),
             pickle.dumps(sys_info, protocol=2), record_pickle(obj), pickle.dumps([k for k, _ in storages], protocol=2)]
    for key, raw in storages:
        parts += [struct.pack('<q', (numels or {}).get(key, len(raw) // 4)), raw]
    path.write_bytes(b''.join(parts))
    return str(path)


def test_expanded_and_overlapping_views_are_read_exactly(tmp_path):
    values = Storage('0', 12)
    src = write_torch_zip(tmp_path / 'views.pth', record_pickle({'model': {
        'rows': Tensor(values, 0, (4, 3), (3, 1)), 'columns': Tensor(values, 0, (3, 4), (1, 3)),
        'expanded': Tensor(values, 9, (5, 3), (0, 1))}}), float_storages(**{'0': np.arange(12)}))
    arrays = load_checkpoint_arrays(src)
    np.testing.assert_array_equal(arrays['rows'], np.arange(12).reshape(4, 3))
    np.testing.assert_array_equal(arrays['columns'], arrays['rows'].T)
    np.testing.assert_array_equal(arrays['expanded'], np.broadcast_to([9, 10, 11], (5, 3)))


@pytest.mark.parametrize('numel, model, message', [
    (1, {'w': Tensor(Storage('0', 1), 0, (2 ** 11, 2 ** 10), (0, 0))},
     r'model\.w: tensor of size \[2048, 1024\] has more elements than its storage \(1\) and than an '
     r'expanded view may \(1048576\)'),
    (1, {'w': Tensor(Storage('0', 1), 0, (10 ** 30,), (0,))}, r'model\.w: tensor of size \[10{30}\] has more'),
    (1, {f'w{i}': Tensor(Storage('0', 1), 0, (2 ** 20,), (0,)) for i in range(2)},
     r'model\.w1: the tensors hold more than 4 times the 1 elements of the storages plus 1048576'),
    (2 ** 18, {f'w{i}': Tensor(Storage('0', 2 ** 18), 0, (2 ** 18,), (1,)) for i in range(9)},
     r'model\.w8: the tensors hold more than 4 times the 262144 elements'),
])
def test_views_that_would_multiply_memory_are_refused(tmp_path, capsys, numel, model, message):
    """A tensor larger than its storage (a stride-0 view) may have MAX_EXPANDED elements, and the
    tensors of a file together MAX_OVERLAP times the elements of its storages plus MAX_EXPANDED:
    past that, a small file would claim gigabytes."""
    src = write_torch_zip(tmp_path / 'bomb.pth', record_pickle({'model': model}),
                          float_storages(**{'0': np.zeros(numel)}))
    assert main(['--src', src, '--dst', str(tmp_path / 'out.pdparams')]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f'error: {src}: ') and len(err.strip().splitlines()) == 1
    assert re.search(message, err)


def test_shared_objects_are_built_once(tmp_path):
    """One object the pickle refers to many times (a tensor, a list of lists of ... built from
    two references at each level) is built once, not once per reference."""
    tensor = Tensor(Storage('0', 1024), 0, (1024,), (1,))
    laughs = [0]
    for _ in range(20):
        laughs = [laughs, laughs]
    data_pkl = record_pickle({'model': {'w': tensor}, 'ema': [tensor] * 1000, 'laughs': laughs})
    out = read_checkpoint(write_torch_zip(tmp_path / 'shared.pth', data_pkl, float_storages(**{'0': np.arange(1024)})))
    np.testing.assert_array_equal(out['model']['w'], np.arange(1024))
    assert all(w is out['model']['w'] for w in out['ema'])
    assert out['laughs'][0] is out['laughs'][1]


def nested_lists(depth):
    """A pickle of ``depth`` lists, each in the one before, built without recursion."""
    return b'\x80\x02' + b']' * depth + b'a' * (depth - 1) + b'.'


def cyclic_list():
    cycle = []
    cycle.append(cycle)
    return record_pickle({'model': {'w': Tensor(Storage('0', 2), 0, (2,), (1,))}, 'cycle': cycle})


@pytest.mark.parametrize('data_pkl, message', [
    (nested_lists(100000), r'\[0\]: containers nested more than 100 deep$'),
    (cyclic_list(), r'cycle\[0\]: a container holds itself$'),
])
def test_deep_or_cyclic_containers_are_refused(tmp_path, capsys, data_pkl, message):
    src = write_torch_zip(tmp_path / 'nested.pth', data_pkl, float_storages(**{'0': [1, 2]}))
    assert main(['--src', src, '--dst', str(tmp_path / 'out.pdparams')]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f'error: {src}: ') and len(err.splitlines()) == 1
    assert re.search(message, err)


def recorded_zip_reads(monkeypatch):
    """The list to which every ``ZipFile.read`` from now on adds the name of the entry it reads."""
    read, names = zipfile.ZipFile.read, []
    monkeypatch.setattr(zipfile.ZipFile, 'read',
                        lambda self, name, *args: names.append(getattr(name, 'filename', name)) or read(self, name, *args))
    return names


def test_storage_file_of_another_size_is_refused_before_it_is_read(tmp_path, monkeypatch):
    """A storage file larger than the elements its records declare is refused by its size in
    the archive's directory alone."""
    src = tmp_path / 'oversized.pth'
    with zipfile.ZipFile(src, 'w') as archive:
        archive.writestr('archive/data.pkl', record_pickle({'model': {'w': Tensor(Storage('0', 1), 0, (1,), (1,))}}))
        archive.writestr('archive/byteorder', 'little')
        archive.writestr('archive/data/0', bytes(64))
    names = recorded_zip_reads(monkeypatch)
    with pytest.raises(CheckpointError, match=rf'^{re.escape(str(src))}: storage file archive/data/0 holds 64 '
                                              rf'bytes, not the 4 of its 1 elements$'):
        read_checkpoint(str(src))
    assert names == ['archive/data.pkl']


@pytest.mark.parametrize('entry', ['archive/data.pkl', 'archive/data/0'])
def test_compressed_entries_are_refused_before_they_are_inflated(tmp_path, monkeypatch, entry):
    """A decompression bomb: 16 MB of zeros deflated to a few KB, declared consistently as the
    storage of 4 M float32 elements, or a deflated data.pkl. torch.save stores its entries
    uncompressed; a compressed one is refused unread."""
    src = tmp_path / 'bomb.pth'
    pkl = record_pickle({'model': {'w': Tensor(Storage('0', 2 ** 22), 0, (2 ** 22,), (1,))}})
    with zipfile.ZipFile(src, 'w') as archive:
        for name, data in (('archive/data.pkl', pkl), ('archive/byteorder', 'little'), ('archive/data/0', bytes(2 ** 24))):
            archive.writestr(name, data, compress_type=zipfile.ZIP_DEFLATED if name == entry else zipfile.ZIP_STORED)
    assert os.path.getsize(src) < (2 ** 24 if entry == 'archive/data.pkl' else 10 ** 5) + 10 ** 5
    names = recorded_zip_reads(monkeypatch)
    with pytest.raises(CheckpointError, match=rf'^{re.escape(str(src))}: {entry} is compressed, which torch.save '
                                              rf'never does; re-save the checkpoint with torch.save$'):
        read_checkpoint(str(src))
    assert entry not in names


def small_checkpoint(path, byteorder='little'):
    """A zip checkpoint of one 2-element tensor whose byteorder record says ``byteorder``."""
    with zipfile.ZipFile(path, 'w') as archive:
        tensor = Tensor(Storage('0', 2), 0, (2,), (1,))
        archive.writestr('archive/data.pkl', record_pickle({'model': {'head.bias': tensor}}))
        archive.writestr('archive/byteorder', byteorder)
        archive.writestr('archive/data/0', np.array([1, 2], '<f4').tobytes())
    return str(path)


def edit_zip(path, signature, offset, raw):
    """Writes ``raw`` at ``offset`` of every zip header starting with ``signature`` in the file."""
    data = bytearray(open(path, 'rb').read())
    start = data.find(signature)
    while start >= 0:
        data[start + offset:start + offset + len(raw)] = raw
        start = data.find(signature, start + 4)
    open(path, 'wb').write(data)
    return path


def deep_json_safetensors(path):
    header = b'{"a": ' + b'[' * 100000 + b']' * 100000 + b'}'
    path.write_bytes(struct.pack('<Q', len(header)) + header)
    return str(path)


def zip_of(path, model):
    """``{'model': model}`` in torch.save's zip layout, with storage '0' holding [1, 2]."""
    return write_torch_zip(path, record_pickle({'model': model}), float_storages(**{'0': [1, 2]}))


def legacy_of(path, numel, model):
    """``model`` in the legacy layout, with storage '0' holding [1, 2] but said to hold ``numel``."""
    return legacy_file(path, model, float_storages(**{'0': [1, 2]}), numels={'0': numel})


CORRUPT_FILES = {
    'encrypted entries': (lambda p: edit_zip(small_checkpoint(p), b'PK\x01\x02', 8, b'\x01\x00'),
                          "unsupported zip file (RuntimeError: File 'archive/byteorder' is encrypted"),
    'unknown compression': (lambda p: edit_zip(small_checkpoint(p), b'PK\x01\x02', 10, b'\x09\x00'),
                            'unsupported zip file (NotImplementedError: That compression method is not supported)'),
    'zip version': (lambda p: edit_zip(small_checkpoint(p), b'PK\x01\x02', 6, b'\x56\x00'),
                    'unsupported zip file (NotImplementedError: zip file version 8.6)'),
    'directory offset': (lambda p: edit_zip(small_checkpoint(p), b'PK\x05\x06', 16, b'\xff\xff\xff\x7f'),
                         'unsupported zip file (OSError: '),
    'byteorder': (lambda p: small_checkpoint(p, 'middle'), "byteorder record 'middle' is neither little nor big"),
    'huge stride': (lambda p: zip_of(p, {'w': Tensor(Storage('0', 2), 0, (1,), (2 ** 70,))}),
                    'corrupt zip checkpoint (OverflowError: '),
    'legacy storage beyond the file': (
        lambda p: legacy_of(p, 2 ** 40, {'w': Tensor(Storage('0', 2 ** 40), 0, (2,), (1,))}),
        'file ends inside a storage: truncated'),
    'legacy element count': (lambda p: legacy_of(p, 2 ** 60, {'w': Tensor(Storage('0', 2), 0, (2,), (1,))}),
                             'storage 0 has 1152921504606846976 elements where the pickle says 2'),
    'deep safetensors header': (deep_json_safetensors, 'corrupt safetensors header: maximum recursion depth'),
}


@pytest.mark.parametrize('kind', sorted(CORRUPT_FILES))
def test_corrupt_files_are_one_line_errors(tmp_path, capsys, kind):
    make, message = CORRUPT_FILES[kind]
    src = make(tmp_path / 'corrupt.pth')
    assert main(['--src', src, '--dst', str(tmp_path / 'out.pdparams')]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f'error: {src}: ') and len(err.splitlines()) == 1
    assert message in err


def test_running_out_of_memory_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    def allocate(*args):
        raise MemoryError('Unable to allocate 64.0 GiB')
    monkeypatch.setattr(safe_load, 'decode_elements', allocate)
    src = small_checkpoint(tmp_path / 'big.pth')
    assert main(['--src', src, '--dst', str(tmp_path / 'out.pdparams')]) == 1
    assert capsys.readouterr().err.strip() == (f'error: {src}: not enough memory to read this zip file '
                                               f'(Unable to allocate 64.0 GiB)')


def test_legacy_storages_are_little_endian_whatever_the_header_says(tmp_path):
    """torch writes a legacy file's storages little-endian on any host and ignores the header's
    little_endian (the saving host's); a file saved on a big-endian host reads the same."""
    raw = open(STORAGE_KINDS[1], 'rb').read()
    flag = b'little_endianq\x02\x88'  # pickle's NEWTRUE
    assert raw.count(flag) == 1
    src = tmp_path / 'big_endian_host.pth'
    src.write_bytes(raw.replace(flag, flag[:-1] + b'\x89'))  # NEWFALSE
    expected = load_checkpoint_arrays(STORAGE_KINDS[1])
    arrays = load_checkpoint_arrays(str(src))
    assert list(arrays) == list(expected)
    for name, value in expected.items():
        assert arrays[name].dtype == value.dtype, name
        np.testing.assert_array_equal(arrays[name], value, err_msg=name)
    hand_made = legacy_file(tmp_path / 'hand_made.pth', {'w': Tensor(Storage('0', 3), 0, (3,), (1,))},
                            float_storages(**{'0': [1.5, -2, 3]}), little_endian=False)
    np.testing.assert_array_equal(read_checkpoint(hand_made)['w'], [1.5, -2, 3])


def test_non_string_key_of_a_tensor_is_refused(tmp_path, capsys):
    src = zip_of(tmp_path / 'keys.pth', {('blocks', 0): Tensor(Storage('0', 2), 0, (2,), (1,))})
    assert main(['--src', src, '--dst', str(tmp_path / 'out.pdparams')]) == 1
    assert capsys.readouterr().err.strip() == (f"error: {src}: key ('blocks', 0) of a tensor of shape [2] "
                                               f"is not a string")


@pytest.mark.parametrize('shapes', [[(4, 8), (4, 9), (4, 8)], [(), (), ()]])
def test_timm_qkv_parts_that_do_not_concatenate(shapes):
    arrays = {f'cls_attn_blocks.0.attn.{p}.weight': np.zeros(shape, np.float32) for p, shape in zip('qkv', shapes)}
    listed = ', '.join(f'{p} {list(shape)}' for p, shape in zip('qkv', shapes))
    with pytest.raises(CheckpointError, match=re.escape(f'cls_attn_blocks.0.attn.qkv.weight: timm parts {listed} '
                                                        f'do not concatenate along their first axis')):
        from_timm_layout(arrays)


@pytest.mark.parametrize('names, message', [
    (['pos_embed.token_projection.bias', 'pos_embeder.token_projection.bias'],
     'pos_embed.token_projection.bias and pos_embeder.token_projection.bias both become '
     'pos_embeder.token_projection.bias'),
    (['patch_embed.proj.0.1.running_mean', 'patch_embed.proj.0.1._mean'],
     'patch_embed.proj.0.1.running_mean and patch_embed.proj.0.1._mean both become patch_embed.proj.0.1._mean'),
    ([f'cls_attn_blocks.0.attn.{p}.bias' for p in ('q', 'k', 'v', 'qkv')],
     'cls_attn_blocks.0.attn.q.bias and cls_attn_blocks.0.attn.qkv.bias both become cls_attn_blocks.0.attn.qkv.bias'),
    ([f'cls_attn_blocks.0.attn.{p}.bias' for p in ('qkv', 'q', 'k', 'v')],
     'cls_attn_blocks.0.attn.qkv.bias and cls_attn_blocks.0.attn.q.bias both become cls_attn_blocks.0.attn.qkv.bias'),
])
def test_two_names_for_one_paddle_name_are_refused(tmp_path, capsys, names, message):
    with pytest.raises(CheckpointError, match=re.escape(message)):
        convert_state_dict({name: np.ones(2, np.float32) for name in names})
    src = write_torch_zip(tmp_path / 'twice.pth', record_pickle(
        {name: Tensor(Storage(str(i), 2), 0, (2,), (1,)) for i, name in enumerate(names)}),
        float_storages(**{str(i): [1, 2] for i in range(len(names))}))
    assert main(['--src', src, '--dst', str(tmp_path / 'out.pdparams')]) == 1
    assert capsys.readouterr().err.strip() == f'error: {src}: {message}'


def test_files_of_one_stem_in_a_folder_keep_their_suffix_apart(tmp_path, capsys):
    """a.pth and a.safetensors convert to a_pth.pdparams and a_safetensors.pdparams, neither
    replacing the other; a stem of its own keeps the plain name."""
    src, out = tmp_path / 'in', tmp_path / 'out'
    src.mkdir()
    small_checkpoint(src / 'a.pth')
    shutil.copy(os.path.join(GOLDEN, 'mini_p8_tokens_norm.timm.safetensors'), src / 'a.safetensors')
    shutil.copy(STORAGE_KINDS[0], src / 'b.pth')
    assert main(['--src', str(src), '--dst', str(out)]) == 0
    assert sorted(os.listdir(out)) == ['a_pth.pdparams', 'a_safetensors.pdparams', 'b.pdparams']
    assert list(paddle.load(str(out / 'a_pth.pdparams'), return_numpy=True)) == ['head.bias']
    assert sorted(paddle.load(str(out / 'a_safetensors.pdparams'), return_numpy=True)) == sorted(
        convert_state_dict(load_checkpoint_arrays(str(src / 'a.safetensors'))))


def test_big_endian_zip_checkpoints_are_read_in_their_byte_order(tmp_path):
    """torch.save on a big-endian machine records 'big' and stores the elements big-endian."""
    path = tmp_path / 'big.pth'
    with zipfile.ZipFile(path, 'w') as archive:
        archive.writestr('archive/data.pkl', record_pickle({'model': {'head.bias': Tensor(Storage('0', 3), 0, (3,), (1,))}}))
        archive.writestr('archive/byteorder', 'big')
        archive.writestr('archive/data/0', np.array([1.5, -2, 3e5], '>f4').tobytes())
    bias = load_checkpoint_arrays(str(path))['head.bias']
    np.testing.assert_array_equal(bias, np.array([1.5, -2, 3e5], np.float32))
    assert bias.dtype == np.float32 and bias.dtype.isnative


def test_a_view_one_element_past_its_storage_is_refused(tmp_path):
    """Offset 1 and 2 elements of a 2-element storage end one element past it."""
    path = tmp_path / 'past.pth'
    with zipfile.ZipFile(path, 'w') as archive:
        archive.writestr('archive/data.pkl', record_pickle({'model': {'head.bias': Tensor(Storage('0', 2), 1, (2,), (1,))}}))
        archive.writestr('archive/data/0', np.array([1, 2], '<f4').tobytes())
    with pytest.raises(CheckpointError, match=r'head\.bias: tensor of size \[2\] reads past the end of its storage '
                                              r'\(2 elements\)'):
        load_checkpoint_arrays(str(path))


def test_regnet_teacher_of_another_class_count_converts_with_its_head(tmp_path, monkeypatch):
    """A regnety_160 fine-tuned on 10 classes converts: the model it is checked against takes its
    class count from head.fc.weight; its parameters are counted with that head."""
    from port_weights import convert_regnet
    with open(os.path.join(FIXTURES, 'regnety_160_timm_state_dict.json'), encoding='utf-8') as f:
        shapes = json.load(f)['state_dict']
    shapes.update({'head.fc.weight': [10, 3024], 'head.fc.bias': [10]})
    arrays = {name: np.broadcast_to(np.float32(0), shape) for name, shape in shapes.items()}  # shapes only
    written = {}
    monkeypatch.setattr(convert_regnet, 'load_checkpoint_arrays', lambda path: arrays)
    monkeypatch.setattr(convert_regnet, 'write_pdparams', lambda state, dst: written.update(state))
    parameters = convert_regnet.convert_regnet_file('regnety_160_10.pth', str(tmp_path / 'out.pdparams'))
    assert parameters == 83_590_140 - 1000 * 3025 + 10 * 3025
    assert written['head.fc.weight'].shape == (3024, 10) and written['head.fc.bias'].shape == (10,)


def safetensors_file(path, tensors, metadata=None):
    """A .safetensors file of ``tensors`` (name -> (safetensors dtype, little-endian bytes, shape)),
    laid out in order after the JSON header; returns the path."""
    header, body = {'__metadata__': metadata or {'format': 'pt'}}, b''
    for name, (dtype, raw, shape) in tensors.items():
        header[name] = {'dtype': dtype, 'shape': list(shape), 'data_offsets': [len(body), len(body) + len(raw)]}
        body += raw
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack('<Q', len(text)) + text + body)
    return str(path)


def test_safetensors_entries_are_read_from_their_offsets_in_their_dtypes(tmp_path):
    """Each entry is its own bytes of the body (data_offsets), in its dtype and shape; bfloat16
    is widened to float32 exactly; an entry whose byte count does not fit its shape is refused."""
    weight = np.arange(6, dtype='<f4').reshape(2, 3) - 2.5
    bf16 = (np.array([1.5, -3.0, 0.15625], '<f4').view('<u4') >> 16).astype('<u2')
    path = safetensors_file(tmp_path / 'w.safetensors', {
        'head.weight': ('F32', weight.tobytes(), (2, 3)),
        'head.bias': ('F16', np.array([0.5, 1, 2], '<f2').tobytes(), (3,)),
        'blocks.0.gamma1': ('BF16', bf16.tobytes(), (3,)),
        'step': ('I64', np.array([7], '<i8').tobytes(), ()),
    })
    arrays = load_checkpoint_arrays(path)
    np.testing.assert_array_equal(arrays['head.weight'], weight)
    assert arrays['head.bias'].dtype == np.float16 and arrays['head.bias'].tolist() == [0.5, 1, 2]
    assert arrays['blocks.0.gamma1'].dtype == np.float32 and arrays['blocks.0.gamma1'].tolist() == [1.5, -3.0, 0.15625]
    assert arrays['step'].shape == () and arrays['step'] == 7
    bad = safetensors_file(tmp_path / 'bad.safetensors', {'head.bias': ('F32', np.zeros(4, '<f4').tobytes(), (3,))})
    with pytest.raises(CheckpointError, match=re.escape('head.bias: data offsets [0, 16] do not fit shape [3]')):
        load_checkpoint_arrays(bad)


def test_a_converted_file_replaces_the_previous_one_whole_and_synced(tmp_path, monkeypatch):
    """A failed write leaves the previous output and no temporary file; a good one is synced to
    disk before the rename puts it in place."""
    dst = tmp_path / 'model.pdparams'
    write_pdparams({'w': np.ones(3, np.float32)}, str(dst))
    save, events = paddle.save, []

    def crash(obj, path):
        save(obj, path)
        raise OSError(28, 'No space left on device')
    monkeypatch.setattr(paddle, 'save', crash)
    with pytest.raises(CheckpointError, match=r'cannot write .*model.pdparams \(No space left on device\); '
                                              r'the file is as it was before'):
        write_pdparams({'w': np.zeros(3, np.float32)}, str(dst))
    assert [p.name for p in tmp_path.iterdir()] == ['model.pdparams']
    np.testing.assert_array_equal(paddle.load(str(dst))['w'], np.ones(3))

    monkeypatch.setattr(paddle, 'save', save)
    fsync, replace = os.fsync, os.replace
    monkeypatch.setattr(os, 'fsync', lambda fd: events.append('fsync') or fsync(fd))
    monkeypatch.setattr(os, 'replace', lambda a, b: events.append('replace') or replace(a, b))
    write_pdparams({'w': np.zeros(3, np.float32)}, str(dst))
    assert events == ['fsync', 'replace']
    np.testing.assert_array_equal(paddle.load(str(dst))['w'], np.zeros(3))
