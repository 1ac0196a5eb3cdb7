"""Converts official PyTorch XCiT checkpoints, or timm's, to Paddle ``.pdparams``.

    python port_weights/convert.py --src xcit_small_12_p16_224.pth --dst xcit_small_12_p16_224.pdparams \\
        --cfg configs/xcit_small_12_p16_224.yaml
    python port_weights/convert.py --src checkpoints/ --dst pdparams/      # every file in a folder

Inputs: ``torch.save`` files (zip or legacy format; ``{'model': state_dict}`` or a bare state
dict) and ``.safetensors``; nothing from the file is executed and torch is not needed (see
``safe_load.py``). The Paddle layout differs from torch's in three ways only: Linear weights
are stored [in, out] (transposed), BatchNorm's running_mean / running_var are ``_mean`` /
``_variance``, and ``num_batches_tracked`` does not exist. timm's XCiT layout is first
brought to the official one (``pos_embed.`` -> ``pos_embeder.``, class-attention q, k, v
concatenated into qkv).

With ``--cfg`` the result is checked against the model that config builds, and nothing is
written unless every key and shape matches. Output files are written atomically.
"""
import argparse
import os
import re
import sys
from collections import Counter, namedtuple

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import paddle  # noqa: E402

from config import ConfigError, get_config  # noqa: E402
from port_weights.safe_load import CheckpointError, read_checkpoint  # noqa: E402
from xcit import build_xcit  # noqa: E402

__all__ = ['CheckpointError', 'load_checkpoint_arrays', 'from_timm_layout', 'strip_wrapper_prefix',
           'convert_state_dict', 'state_shapes', 'model_shapes', 'find_mismatches', 'format_mismatches', 'check_fits',
           'count_parameters', 'write_pdparams', 'convert_file', 'main']

CHECKPOINT_SUFFIXES = ('.pth', '.pt', '.bin', '.safetensors')
STATE_DICT_KEYS = ('model', 'state_dict')  # where training checkpoints keep the weights
BN_RENAMES = {'running_mean': '_mean', 'running_var': '_variance'}
DROPPED_LEAVES = {'num_batches_tracked'}  # a torch BatchNorm counter, not a weight
BN_BUFFERS = ('._mean', '._variance')
WRAPPER_PREFIX = 'module.'  # torch DataParallel / DistributedDataParallel saves
TIMM_SPLIT_QKV = re.compile(r'^(?P<prefix>cls_attn_blocks\.\d+\.attn)\.(?P<part>[qkv])\.(?P<leaf>weight|bias)$')

ConversionResult = namedtuple('ConversionResult', 'src dst tensors parameters ignored')
ConversionResult.__doc__ = """What ``convert_file`` wrote: ``tensors`` entries holding ``parameters``
trainable values (BatchNorm statistics excluded); ``ignored`` lists the checkpoint's
entries that are not weights (optimizer state, epoch, ...)."""


def extract_state_dict(obj, path):
    """Finds the weights in a loaded checkpoint.

    Returns ``(state_dict, ignored)``: name -> array, and the names of the entries left out
    (the wrapper's other keys such as ``optimizer`` or ``epoch``, and non-tensor values).
    """
    if not isinstance(obj, dict):
        raise CheckpointError(f'{path}: not a checkpoint: holds a {type(obj).__name__}, not a dict')
    ignored = []
    for key in STATE_DICT_KEYS:
        if isinstance(obj.get(key), dict):
            ignored = [k for k in obj if k != key]
            obj = obj[key]
            break
    state_dict = {k: v for k, v in obj.items() if isinstance(v, np.ndarray)}
    ignored += [k for k in obj if k not in state_dict]
    if not state_dict:
        raise CheckpointError(f'{path}: not a checkpoint: no tensors found '
                              f'(top-level keys: {", ".join(map(str, obj)) or "none"})')
    return state_dict, ignored


def load_checkpoint_arrays(path):
    """Reads the weights of a checkpoint file as name -> numpy array, names and layout unchanged.

    Safe on untrusted files: no torch, no code execution. Raises ``CheckpointError``.
    """
    return extract_state_dict(read_checkpoint(path), path)[0]


def from_timm_layout(arrays):
    """Renames timm's XCiT keys to the official ones; official keys pass through unchanged.

    timm calls the positional encoder ``pos_embed`` and splits each class-attention ``qkv``
    Linear into ``q``, ``k``, ``v``; those are concatenated back in q, k, v order along the
    output axis (axis 0 of torch's [out, in] weights).
    """
    out, parts = {}, {}
    for name, value in arrays.items():
        match = TIMM_SPLIT_QKV.match(name)
        if match:
            key = f'{match["prefix"]}.qkv.{match["leaf"]}'
            parts.setdefault(key, {})[match['part']] = value
            out.setdefault(key, None)  # keep the position of the first part
        elif name.startswith('pos_embed.'):
            out['pos_embeder.' + name[len('pos_embed.'):]] = value
        else:
            out[name] = value
    for key, qkv in parts.items():
        missing = [p for p in 'qkv' if p not in qkv]
        if missing:
            raise CheckpointError(f'{key}: timm layout with {", ".join(sorted(qkv))} but no '
                                  f'{", ".join(missing)}')
        out[key] = np.concatenate([qkv['q'], qkv['k'], qkv['v']], axis=0)
    return out


def strip_wrapper_prefix(arrays):
    """Drops the ``module.`` prefix that torch's (Distributed)DataParallel adds to every key."""
    if arrays and all(name.startswith(WRAPPER_PREFIX) for name in arrays):
        return {name[len(WRAPPER_PREFIX):]: value for name, value in arrays.items()}
    return arrays


def paddle_name(name):
    """The Paddle state-dict name of a torch one, or None for entries Paddle does not have."""
    prefix, _, leaf = name.rpartition('.')
    if leaf in DROPPED_LEAVES:
        return None
    leaf = BN_RENAMES.get(leaf, leaf)
    return f'{prefix}.{leaf}' if prefix else leaf


def is_linear_weight(name, ndim):
    """Linear weights are the only 2-D ``.weight`` tensors in XCiT (convolutions are 4-D)."""
    return ndim == 2 and name.endswith('.weight')


def convert_state_dict(arrays, dtype='float32'):
    """Official or timm torch state dict -> Paddle state dict (name -> array).

    A ``module.`` prefix on every key (a DataParallel-wrapped save) is removed first.
    Linear weights [out, in] become [in, out], BatchNorm statistics are renamed, counters
    dropped, floating arrays cast to ``dtype``. Arrays are not copied when nothing changes
    (transposes are views), so shape-only stand-ins such as ``np.broadcast_to`` cost nothing.
    """
    converted = {}
    for name, value in from_timm_layout(strip_wrapper_prefix(arrays)).items():
        target = paddle_name(name)
        if target is None:
            continue
        if is_linear_weight(name, value.ndim):
            value = value.T
        if np.issubdtype(value.dtype, np.floating):
            value = value.astype(dtype, copy=False)
        converted[target] = value
    return converted


def state_shapes(state):
    """Name -> shape (a tuple) of every entry of a state dict."""
    return {name: tuple(value.shape) for name, value in state.items()}


def model_shapes(config):
    """Name -> shape of every parameter and buffer of the model ``config`` builds.

    Built under ``paddle.LazyGuard``, so no weights are allocated even for the largest models.
    """
    with paddle.LazyGuard():
        model = build_xcit(config)
    return state_shapes(model.state_dict())


def find_mismatches(arrays, expected):
    """Rows ``(name, checkpoint shape or None, model shape or None)`` where they disagree."""
    rows = [(name, tuple(arrays[name].shape) if name in arrays else None, shape)
            for name, shape in expected.items()
            if name not in arrays or tuple(arrays[name].shape) != shape]
    rows += [(name, tuple(value.shape), None) for name, value in arrays.items() if name not in expected]
    return rows


def format_mismatches(rows):
    """A table of ``find_mismatches`` rows: key, checkpoint shape, model shape, problem."""
    def show(shape):
        return '-' if shape is None else str(list(shape))
    problem = {(True, False): 'missing from checkpoint', (False, True): 'unexpected in checkpoint'}
    table = [('key', 'checkpoint', 'model', 'problem')]
    table += [(name, show(got), show(want), problem.get((got is None, want is None), 'shape mismatch'))
              for name, got, want in rows]
    widths = [max(len(row[i]) for row in table) for i in range(3)]
    return '\n'.join(f'  {a:<{widths[0]}}  {b:<{widths[1]}}  {c:<{widths[2]}}  {d}'
                     for a, b, c, d in table)


def check_fits(arrays, expected, what):
    """Raises ``CheckpointError`` starting with ``what`` and listing the differences (the
    ``format_mismatches`` table) unless ``arrays`` has exactly the names and shapes of ``expected``."""
    rows = find_mismatches(arrays, expected)
    if rows:
        raise CheckpointError(f'{what} ({len(rows)} problems):\n{format_mismatches(rows)}')


def count_parameters(arrays):
    """Number of trainable values: every entry except BatchNorm statistics."""
    return sum(int(np.prod(v.shape)) for k, v in arrays.items() if not k.endswith(BN_BUFFERS))


def write_pdparams(arrays, dst):
    """``paddle.save`` to a temporary file beside ``dst``, then renamed onto it atomically.

    Raises ``CheckpointError`` when ``dst`` cannot be written."""
    folder = os.path.dirname(os.path.abspath(dst))
    tmp = os.path.join(folder, f'.{os.path.basename(dst)}.{os.getpid()}.tmp')
    try:
        os.makedirs(folder, exist_ok=True)
        paddle.save({k: np.ascontiguousarray(v) for k, v in arrays.items()}, tmp)
        os.replace(tmp, dst)
    except OSError as e:
        raise CheckpointError(f'{dst}: cannot write: {e.strerror or e}') from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def convert_file(src, dst, cfg_path=None, dtype='float32'):
    """Converts checkpoint ``src`` to Paddle file ``dst``; returns a ``ConversionResult``.

    With ``cfg_path`` (a model YAML) the converted keys and shapes must equal those of the
    model it builds; otherwise ``CheckpointError`` carries a table of the differences and
    ``dst`` is not written. ``dtype`` is the dtype of floating arrays in the output.
    """
    state_dict, ignored = extract_state_dict(read_checkpoint(src), src)
    arrays = convert_state_dict(state_dict, dtype)
    if cfg_path:
        try:
            expected = model_shapes(get_config(cfg_path))
        except ConfigError as e:
            raise CheckpointError(str(e)) from None
        check_fits(arrays, expected, f'{src} does not fit the model of {cfg_path}')
    write_pdparams(arrays, dst)
    return ConversionResult(src, dst, len(arrays), count_parameters(arrays), ignored)


def split_suffix(name):
    """``'a.timm.pth'`` -> ``('a.timm', '.pth')``; the suffix is '' when not a checkpoint's."""
    for suffix in CHECKPOINT_SUFFIXES:
        if name.endswith(suffix):
            return name[:-len(suffix)], suffix
    return name, ''


def conversion_jobs(src, dst):
    """(src file, dst file) pairs: one for a file, one per checkpoint file of a folder.

    Outputs are named ``<stem>.pdparams``; files that share a stem (``a.pth`` and
    ``a.safetensors``) keep their suffix apart: ``a_pth.pdparams``, ``a_safetensors.pdparams``.
    """
    if not os.path.isdir(src):
        if os.path.isdir(dst):
            dst = os.path.join(dst, split_suffix(os.path.basename(src))[0] + '.pdparams')
        return [(src, dst)]
    names = sorted(n for n in os.listdir(src)
                   if split_suffix(n)[1] and os.path.isfile(os.path.join(src, n)))
    if not names:
        raise CheckpointError(f'{src}: no checkpoint files ({", ".join(CHECKPOINT_SUFFIXES)}) in this folder')
    if os.path.isfile(dst):
        raise CheckpointError(f'{dst}: must be a folder when --src is a folder')
    stems = Counter(split_suffix(n)[0] for n in names)
    jobs = []
    for name in names:
        stem, suffix = split_suffix(name)
        out = stem + ('_' + suffix[1:] if stems[stem] > 1 else '') + '.pdparams'
        jobs.append((os.path.join(src, name), os.path.join(dst, out)))
    return jobs


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--src', required=True, help='checkpoint file, or a folder of them')
    parser.add_argument('--dst', required=True,
                        help='output .pdparams file, or a folder (required when --src is a folder)')
    parser.add_argument('--cfg', help='model YAML; check the result against that model before writing')
    parser.add_argument('--dtype', default='float32', choices=['float32', 'float16'],
                        help='dtype of the written floating tensors (default float32)')
    return parser.parse_args(argv)


def main(argv=None):
    """Command-line entry point; returns the exit status (0 only if every file converted)."""
    args = parse_args(argv)
    try:
        jobs = conversion_jobs(args.src, args.dst)
    except CheckpointError as e:
        print(f'error: {e}', file=sys.stderr)
        return 1
    failures = 0
    for src, dst in jobs:
        try:
            result = convert_file(src, dst, args.cfg, args.dtype)
        except CheckpointError as e:
            failures += 1
            print(f'error: {e}', file=sys.stderr)
            continue
        if result.ignored:
            print(f'{src}: ignored entries that are not weights: {", ".join(map(str, result.ignored))}')
        print(f'{src} -> {dst}: {result.tensors} tensors, {result.parameters:,} parameters, {args.dtype}'
              + (f', matches {args.cfg}' if args.cfg else ''))
    if len(jobs) > 1:
        print(f'{len(jobs) - failures} of {len(jobs)} files converted')
    return 1 if failures else 0


if __name__ == '__main__':
    sys.exit(main())
