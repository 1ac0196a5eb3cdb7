"""Converts a timm / DeiT RegNetY-16GF checkpoint (``regnety_160``) to Paddle ``.pdparams``.

    python port_weights/convert_regnet.py --src regnety_160-a5fe301d.pth --dst regnety_160.pdparams

DeiT's teacher checkpoint (``{'model': state_dict}``) and timm's bare state dicts are read with
``convert.py``'s safe loader and mapped by the same rules (Linear weights transposed, BatchNorm
statistics renamed, ``num_batches_tracked`` dropped). The result is always checked against
``regnet.regnety_160`` with the checkpoint's number of classes, and nothing is written unless
every key and shape matches.
"""
import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import paddle  # noqa: E402

from port_weights.convert import (CheckpointError, check_fits, convert_state_dict,  # noqa: E402
                                  count_parameters, load_checkpoint_arrays, state_shapes, write_pdparams)
from regnet import regnety_160  # noqa: E402

__all__ = ['regnety_160_shapes', 'convert_regnet_file', 'main']

HEAD_WEIGHT = 'head.fc.weight'


def regnety_160_shapes(num_classes):
    """Name -> shape of every state-dict entry of ``regnety_160(num_classes)``, without allocating it."""
    with paddle.LazyGuard():
        model = regnety_160(num_classes)
    return state_shapes(model.state_dict())


def convert_regnet_file(src, dst, dtype='float32'):
    """Converts ``src`` to ``dst``; returns the number of trainable values written.

    Raises ``CheckpointError`` (``dst`` untouched) when ``src`` cannot be read or does not fit
    ``regnety_160``; the error carries a table of the differing keys.
    """
    state_dict = load_checkpoint_arrays(src)
    try:
        arrays = convert_state_dict(state_dict, dtype)
    except CheckpointError as e:
        raise CheckpointError(f'{src}: {e}') from None
    if HEAD_WEIGHT not in arrays or arrays[HEAD_WEIGHT].ndim != 2:
        raise CheckpointError(f'{src}: no 2-D {HEAD_WEIGHT}: not a regnety_160 checkpoint')
    num_classes = arrays[HEAD_WEIGHT].shape[1]
    check_fits(arrays, regnety_160_shapes(num_classes), f'{src} does not fit regnety_160')
    write_pdparams(arrays, dst)
    return count_parameters(arrays)


def main(argv=None):
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--src', required=True,
                        help='timm or DeiT regnety_160 checkpoint (.pth, .safetensors)')
    parser.add_argument('--dst', required=True, help='output .pdparams file')
    parser.add_argument('--dtype', default='float32', choices=['float32', 'float16'],
                        help='dtype of the written floating tensors (default float32)')
    args = parser.parse_args(argv)
    try:
        parameters = convert_regnet_file(args.src, args.dst, args.dtype)
    except CheckpointError as e:
        print(f'error: {e}', file=sys.stderr)
        return 1
    print(f'{args.src} -> {args.dst}: {parameters:,} parameters, {args.dtype}, matches regnety_160')
    return 0


if __name__ == '__main__':
    sys.exit(main())
