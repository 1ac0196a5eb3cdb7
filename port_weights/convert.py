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

Self-supervised DINO checkpoints (facebookresearch/dino) convert too: the backbone-only files
as they are, a full training checkpoint with ``--key teacher`` (or ``student``), whose XCiT sits
under ``backbone.`` beside DINO's projection head (left out), and ``--linear`` adds the ImageNet
classifier that DINO's linear evaluation trained on the backbone's features as the model's head.

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
           'take_backbone', 'read_linear_head', 'add_linear_head', 'convert_state_dict', 'state_shapes',
           'model_shapes', 'find_mismatches', 'format_mismatches', 'check_fits', 'count_parameters',
           'write_pdparams', 'convert_file', 'main']

CHECKPOINT_SUFFIXES = ('.pth', '.pt', '.bin', '.safetensors')
STATE_DICT_KEYS = ('model', 'state_dict')  # where training checkpoints keep the weights
BN_RENAMES = {'running_mean': '_mean', 'running_var': '_variance'}
DROPPED_LEAVES = {'num_batches_tracked'}  # a torch BatchNorm counter, not a weight
BN_BUFFERS = ('._mean', '._variance')
WRAPPER_PREFIX = 'module.'  # torch DataParallel / DistributedDataParallel saves
BACKBONE_PREFIX = 'backbone.'  # DINO's training wrapper: the XCiT, beside its projection 'head.'
SHOWN_KEYS = 5  # entries of a wrong --linear file named in its error
LINEAR_HEAD = {'linear.weight': 'head.weight', 'linear.bias': 'head.bias'}  # DINO's LinearClassifier
TIMM_SPLIT_QKV = re.compile(r'^(?P<prefix>cls_attn_blocks\.\d+\.attn)\.(?P<part>[qkv])\.(?P<leaf>weight|bias)$')

ConversionResult = namedtuple('ConversionResult', 'src dst tensors parameters ignored outside_backbone')
ConversionResult.__doc__ = """What ``convert_file`` wrote: ``tensors`` entries holding ``parameters``
trainable values (BatchNorm statistics excluded); ``ignored`` lists the checkpoint's
entries that are not weights (optimizer state, epoch, ...), ``outside_backbone`` the weights
left out beside a ``backbone.`` (DINO's projection head)."""


def extract_state_dict(obj, path, key=None):
    """Finds the weights in a loaded checkpoint: its ``key`` entry if given, else its 'model' or
    'state_dict' entry, else the top level.

    Returns ``(state_dict, ignored)``: name -> array, and the names of the entries left out
    (the wrapper's other keys such as ``optimizer`` or ``epoch``, and non-tensor values).
    """
    if not isinstance(obj, dict):
        raise CheckpointError(f'{path}: not a checkpoint: holds a {type(obj).__name__}, not a dict')
    top_level = ', '.join(map(str, obj)) or 'none'
    if key is not None and not isinstance(obj.get(key), dict):
        raise CheckpointError(f'{path}: no entry {key!r} holding weights (top-level keys: {top_level})')
    ignored = []
    for name in (key,) if key is not None else STATE_DICT_KEYS:
        if isinstance(obj.get(name), dict):
            ignored = [k for k in obj if k != name]
            obj = obj[name]
            break
    state_dict = {k: v for k, v in obj.items() if isinstance(v, np.ndarray)}
    ignored += [k for k in obj if k not in state_dict]
    for name, value in state_dict.items():
        if not isinstance(name, str):
            raise CheckpointError(f'{path}: key {name!r} of a tensor of shape {list(value.shape)} '
                                  f'is not a string')
    if not state_dict:
        hint = ('; name the entry that holds the weights with --key'
                if key is None and any(isinstance(v, dict) for v in obj.values()) else '')
        raise CheckpointError(f'{path}: not a checkpoint: no tensors found (top-level keys: {top_level}){hint}')
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
    output axis (axis 0 of torch's [out, in] weights). Raises ``CheckpointError`` when two keys
    give the same official one (``pos_embed.x`` beside ``pos_embeder.x``, ``q`` beside ``qkv``)
    or the parts do not make one ``qkv``.
    """
    out, parts, sources = {}, {}, {}
    for name, value in arrays.items():
        match = TIMM_SPLIT_QKV.match(name)
        if match:
            key = f'{match["prefix"]}.qkv.{match["leaf"]}'
        elif name.startswith('pos_embed.'):
            key = 'pos_embeder.' + name[len('pos_embed.'):]
        else:
            key = name
        if key in sources and not (match and key in parts):
            raise CheckpointError(f'{sources[key]} and {name} both become {key}')
        sources.setdefault(key, name)
        if match:
            parts.setdefault(key, {})[match['part']] = value
            out.setdefault(key, None)  # keep the position of the first part
        else:
            out[key] = value
    for key, qkv in parts.items():
        missing = [p for p in 'qkv' if p not in qkv]
        if missing:
            raise CheckpointError(f'{key}: timm layout with {", ".join(sorted(qkv))} but no '
                                  f'{", ".join(missing)}')
        shapes = [qkv[p].shape for p in 'qkv']
        if any(len(shape) == 0 or shape[1:] != shapes[0][1:] for shape in shapes):
            raise CheckpointError(f'{key}: timm parts q {list(shapes[0])}, k {list(shapes[1])}, '
                                  f'v {list(shapes[2])} do not concatenate along their first axis')
        out[key] = np.concatenate([qkv['q'], qkv['k'], qkv['v']], axis=0)
    return out


def strip_wrapper_prefix(arrays):
    """Drops the ``module.`` prefix that torch's (Distributed)DataParallel adds to every key."""
    if arrays and all(name.startswith(WRAPPER_PREFIX) for name in arrays):
        return {name[len(WRAPPER_PREFIX):]: value for name, value in arrays.items()}
    return arrays


def take_backbone(arrays):
    """The weights under ``backbone.`` with that prefix removed, when there are any (a DINO
    training checkpoint's student or teacher), and the names of the others (DINO's projection
    head); otherwise ``arrays`` unchanged and no names."""
    arrays = strip_wrapper_prefix(arrays)
    if not any(name.startswith(BACKBONE_PREFIX) for name in arrays):
        return arrays, []
    backbone = {name[len(BACKBONE_PREFIX):]: value for name, value in arrays.items()
                if name.startswith(BACKBONE_PREFIX)}
    return backbone, [name for name in arrays if not name.startswith(BACKBONE_PREFIX)]


def read_linear_head(path):
    """The classifier of DINO's linear evaluation (``eval_linear.py``: one Linear on the final-norm
    class token, saved from a DistributedDataParallel wrapper under 'state_dict'), as the
    official XCiT ``head.weight`` [classes, features] and ``head.bias``. Raises ``CheckpointError``."""
    state_dict, _ = extract_state_dict(read_checkpoint(path), path)
    state_dict = strip_wrapper_prefix(state_dict)
    if sorted(state_dict) != sorted(LINEAR_HEAD):
        found = sorted(state_dict)
        more = f' and {len(found) - SHOWN_KEYS} more' if len(found) > SHOWN_KEYS else ''
        listed = ', '.join(found[:SHOWN_KEYS]) + more
        raise CheckpointError(f'{path}: not a linear classifier: expected {" and ".join(LINEAR_HEAD)}, '
                              f'found {len(found)} entries: {listed}')
    weight, bias = state_dict['linear.weight'], state_dict['linear.bias']
    if weight.ndim != 2 or bias.shape != weight.shape[:1]:
        raise CheckpointError(f'{path}: linear.weight {list(weight.shape)} and linear.bias {list(bias.shape)} '
                              f'do not make a classifier')
    return {LINEAR_HEAD[name]: value for name, value in state_dict.items()}


def add_linear_head(arrays, head, path):
    """``arrays`` (official layout) with the classifier ``head`` from ``path``; a backbone that
    already has a head, or whose width is not the classifier's input, raises ``CheckpointError``."""
    if any(name.startswith('head.') for name in arrays):
        raise CheckpointError(f'--linear {path}: the checkpoint has a classifier head already')
    width = arrays['norm.weight'].shape[0] if 'norm.weight' in arrays else None
    if width is not None and head['head.weight'].shape[1] != width:
        raise CheckpointError(f'--linear {path}: the classifier takes {head["head.weight"].shape[1]} features, '
                              f'the backbone gives {width}')
    return {**arrays, **head}


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
    Two keys that give one Paddle name (``x.running_mean`` beside ``x._mean``) raise
    ``CheckpointError``, as ``from_timm_layout``'s problems do.
    """
    converted, sources = {}, {}
    for name, value in from_timm_layout(strip_wrapper_prefix(arrays)).items():
        target = paddle_name(name)
        if target is None:
            continue
        if target in sources:
            raise CheckpointError(f'{sources[target]} and {name} both become {target}')
        sources[target] = name
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
    """``paddle.save`` to a temporary file beside ``dst`` that then replaces it whole, once on disk
    (``utils.replacing``).

    Raises ``CheckpointError`` when ``dst`` cannot be written."""
    from utils import replacing  # here, not at the top: utils imports this module
    try:
        os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
        with replacing(dst) as tmp:
            paddle.save({k: np.ascontiguousarray(v) for k, v in arrays.items()}, tmp)
    except OSError as e:  # replacing's OutputWriteError names dst already
        raise CheckpointError(f'cannot write {dst} ({e.strerror})' if e.strerror else str(e)) from None


def convert_file(src, dst, cfg_path=None, dtype='float32', key=None, linear=None):
    """Converts checkpoint ``src`` to Paddle file ``dst``; returns a ``ConversionResult``.

    ``key`` names the checkpoint entry holding the weights (default 'model', 'state_dict' or the
    top level); weights under ``backbone.`` are taken alone (see ``take_backbone``). ``linear``
    is a DINO linear-evaluation checkpoint whose classifier becomes the head. With ``cfg_path``
    (a model YAML) the converted keys and shapes must equal those of the model it builds;
    otherwise ``CheckpointError`` carries a table of the differences and ``dst`` is not
    written. ``dtype`` is the dtype of floating arrays in the output.
    """
    state_dict, ignored = extract_state_dict(read_checkpoint(src), src, key)
    state_dict, outside_backbone = take_backbone(state_dict)
    if linear:
        state_dict = add_linear_head(state_dict, read_linear_head(linear), linear)
    try:
        arrays = convert_state_dict(state_dict, dtype)
    except CheckpointError as e:
        raise CheckpointError(f'{src}: {e}') from None
    if cfg_path:
        try:
            expected = model_shapes(get_config(cfg_path))
        except ConfigError as e:
            raise CheckpointError(str(e)) from None
        check_fits(arrays, expected, f'{src} does not fit the model of {cfg_path}')
    write_pdparams(arrays, dst)
    return ConversionResult(src, dst, len(arrays), count_parameters(arrays), ignored, outside_backbone)


def split_suffix(name):
    """``'a.timm.pth'`` -> ``('a.timm', '.pth')``; the suffix is '' when not a checkpoint's."""
    for suffix in CHECKPOINT_SUFFIXES:
        if name.endswith(suffix):
            return name[:-len(suffix)], suffix
    return name, ''


def conversion_jobs(src, dst):
    """(src file, dst file) pairs: one for a file, one per checkpoint file of a folder.

    Outputs are named ``<stem>.pdparams`` (also for a file and a ``dst`` ending in a slash, a
    folder made if need be); files that share a stem (``a.pth`` and
    ``a.safetensors``) keep their suffix apart: ``a_pth.pdparams``, ``a_safetensors.pdparams``.
    """
    if not os.path.isdir(src):
        if os.path.isdir(dst) or dst.endswith(('/', os.sep)):  # a folder, maybe one still to be made
            dst = os.path.join(dst, split_suffix(os.path.basename(src))[0] + '.pdparams')
        if os.path.realpath(dst) == os.path.realpath(src):
            raise CheckpointError(f'--dst {dst} is --src: the conversion would replace the checkpoint it reads')
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
    parser.add_argument('--key', help="the checkpoint entry that holds the weights, e.g. 'teacher' or 'student' "
                                      "of a DINO training checkpoint (default: 'model', 'state_dict' or the top level)")
    parser.add_argument('--linear', help="a DINO linear-evaluation checkpoint (*_linearweights.pth): its classifier "
                                         "becomes the model's head")
    args = parser.parse_args(argv)
    if args.linear and os.path.isdir(args.src):
        parser.error('--linear belongs to one backbone: give --src a file, not a folder')
    return args


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
            result = convert_file(src, dst, args.cfg, args.dtype, args.key, args.linear)
        except CheckpointError as e:
            failures += 1
            print(f'error: {e}', file=sys.stderr)
            continue
        if result.ignored:
            print(f'{src}: ignored entries that are not weights: {", ".join(map(str, result.ignored))}')
        if result.outside_backbone:
            print(f'{src}: took the weights under {BACKBONE_PREFIX!r}; left out {len(result.outside_backbone)} others '
                  f'(a projection head): {", ".join(result.outside_backbone)}')
        print(f'{src} -> {dst}: {result.tensors} tensors, {result.parameters:,} parameters, {args.dtype}'
              + (f', classifier from {args.linear}' if args.linear else '')
              + (f', matches {args.cfg}' if args.cfg else ''))
    if len(jobs) > 1:
        print(f'{len(jobs) - failures} of {len(jobs)} files converted')
    return 1 if failures else 0


if __name__ == '__main__':
    sys.exit(main())
