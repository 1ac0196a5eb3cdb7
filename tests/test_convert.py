"""The checkpoint converter: name and layout mapping, safe reading, errors, command line.

``fixtures/torch_checkpoints/`` holds two tiny files written by torch (see the fixtures
README); every other odd or hostile file is made here.
"""
import functools
import json
import os
import pickle
import re
import zipfile

import numpy as np
import paddle
import pytest
import yaml

from conftest import FIXTURES, GOLDEN, write_torch_zip
from config import get_config
from port_weights.convert import (CheckpointError, convert_state_dict, count_parameters, find_mismatches,
                                  from_timm_layout, load_checkpoint_arrays, main, model_shapes)

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


@pytest.mark.parametrize('container', ['zip', 'bare pickle'])
@pytest.mark.parametrize('kind', ['os.system', 'subprocess.call', 'builtins.exec'])
def test_hostile_pickle_is_refused_and_never_runs(tmp_path, capsys, kind, container):
    marker = tmp_path / 'pwned'
    payload = hostile_payloads(marker)[kind]
    src, dst = tmp_path / 'evil.pth', tmp_path / 'evil.pdparams'
    if container == 'zip':  # protocol 2, as torch.save writes: GLOBAL opcodes
        write_torch_zip(src, pickle.dumps({'model': {'head.weight': payload}}, protocol=2))
    else:  # protocol 4: STACK_GLOBAL opcodes
        src.write_bytes(pickle.dumps(payload, protocol=4))
    assert main(['--src', str(src), '--dst', str(dst)]) == 1
    err = capsys.readouterr().err
    assert re.search(rf"refused global '[\w.]+\.{payload.func.__name__}'", err)
    assert str(src) in err and len(err.strip().splitlines()) == 1
    assert not marker.exists() and not dst.exists()


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
    (pickle.dumps([1, 2, 3], protocol=2), 'not a checkpoint'),
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
    assert capsys.readouterr().err.strip() == f'error: {tmp_path / "nope.pth"}: no such file'
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
