"""Paddle Hub entry points: one per model config, named after its file.

    import paddle
    paddle.hub.list('path/to/this/repository', source='local')         # the model names
    model = paddle.hub.load('path/to/this/repository', 'xcit_nano_12_p16_224', source='local',
                            pretrained='xcit_nano_12_p16_224.pdparams')
    print(paddle.hub.help('path/to/this/repository', 'xcit_nano_12_p16_224', source='local'))

``xcit_<size>_<depth>_p<patch>_<resolution>[_dist]`` are the 42 models of ``configs/``,
``xcit_<size>_<depth>_p<patch>_dino[_linear]`` the self-supervised DINO models of
``configs/dino/``. Each entry builds its config's model (in training mode, as ``build_xcit``
does) and, given ``pretrained`` (a converted ``.pdparams`` or a training checkpoint, with
``use_ema`` its EMA weights), loads every weight of it: a missing, unexpected or differently
shaped key raises ``CheckpointError`` with a table of them. Nothing is downloaded.
"""
import functools as _functools
import glob as _glob
import os as _os

# imported now: paddle.hub puts the repository on sys.path only while it imports this file
from config import get_config as _get_config
from utils import load_every_weight as _load_every_weight
from xcit import build_xcit as _build_xcit

dependencies = ['paddle', 'yaml', 'yacs', 'numpy']

_CONFIGS = _os.path.join(_os.path.dirname(_os.path.abspath(__file__)), 'configs')


def _description(cfg_path):
    """The header comment of a config file, as text."""
    lines = []
    with open(cfg_path, encoding='utf-8') as f:
        for line in f:
            if not line.startswith('#'):
                break
            lines.append(line[1:].strip())
    return ' '.join(lines)


def _create_model(cfg_path, pretrained=None, use_ema=False):
    model = _build_xcit(_get_config(cfg_path))
    if pretrained:
        _load_every_weight(model, pretrained, f'the model of {cfg_path}', use_ema)
    return model


def _entry(cfg_path):
    name = _os.path.splitext(_os.path.basename(cfg_path))[0]
    entry = _functools.partial(_create_model, cfg_path)
    entry.__name__ = name
    config = _os.path.relpath(cfg_path, _os.path.dirname(_CONFIGS))
    entry.__doc__ = (f'{_description(cfg_path)}\n\nThe model of {config}; keywords: pretrained (a .pdparams '
                     f'or training checkpoint to load), use_ema.')
    return name, entry


globals().update(_entry(path) for path in sorted(_glob.glob(_os.path.join(_CONFIGS, 'xcit_*.yaml')) +
                                                 _glob.glob(_os.path.join(_CONFIGS, 'dino', '*.yaml'))))
