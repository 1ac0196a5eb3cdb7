"""Paddle Hub entry points: one per model config, named after its file.

    import paddle
    paddle.hub.list('path/to/this/repository', source='local')         # the model names
    model = paddle.hub.load('path/to/this/repository', 'xcit_nano_12_p16_224', source='local',
                            pretrained='xcit_nano_12_p16_224.pdparams')
    print(paddle.hub.help('path/to/this/repository', 'xcit_nano_12_p16_224', source='local'))

``xcit_<size>_<depth>_p<patch>_<resolution>[_dist]`` are the 42 models of ``configs/``,
``xcit_<size>_<depth>_p<patch>_dino[_linear]`` the self-supervised DINO models of
``configs/dino/``. Each entry builds its config's model (in training mode, as ``build_xcit``
does), with a head of ``num_classes`` outputs when given (0: none; e.g. the number of classes
a model of this config was fine-tuned on), and, given ``pretrained`` (a converted ``.pdparams``
or a training checkpoint, with ``use_ema`` its EMA weights), loads every weight of it: a
missing, unexpected or differently shaped key raises ``CheckpointError`` with a table of them.
Nothing is downloaded.
"""
import functools as _functools
import glob as _glob
import os as _os
import sys as _sys

dependencies = ['paddle', 'yaml', 'yacs', 'numpy']

_HERE = _os.path.dirname(_os.path.abspath(__file__))
_CONFIGS = _os.path.join(_HERE, 'configs')
_OWN_PACKAGES = ('config', 'utils', 'xcit', 'port_weights')  # what the entries import from here


def _is_here(module):
    path = getattr(module, '__file__', None)
    return bool(path) and _os.path.abspath(path).startswith(_HERE + _os.sep)


def _import_own_modules():
    """(get_config, with_setting, load_every_weight, build_xcit) of this repository, imported
    now, while paddle.hub has put it on sys.path. A caller's own modules of the same names (e.g.
    a ``utils``) are set aside meanwhile and put back afterwards, and the modules imported here
    leave ``sys.modules`` again (unless the caller had them already), so that neither side gets
    the other's: the caller's later ``import utils`` finds its own."""
    def top(name):
        return name.partition('.')[0]
    clashing = {top(n) for n, m in _sys.modules.items() if top(n) in _OWN_PACKAGES and not _is_here(m)}
    theirs = {n: _sys.modules.pop(n) for n in list(_sys.modules) if top(n) in clashing}
    loaded = set(_sys.modules)
    try:
        from config import get_config, with_setting
        from utils import load_every_weight
        from xcit import build_xcit
    finally:
        for name in [n for n in _sys.modules if top(n) in _OWN_PACKAGES and n not in loaded]:
            del _sys.modules[name]
        _sys.modules.update(theirs)
    return get_config, with_setting, load_every_weight, build_xcit


_get_config, _with_setting, _load_every_weight, _build_xcit = _import_own_modules()


def _description(cfg_path):
    """The header comment of a config file, as text."""
    lines = []
    with open(cfg_path, encoding='utf-8') as f:
        for line in f:
            if not line.startswith('#'):
                break
            lines.append(line[1:].strip())
    return ' '.join(lines)


def _create_model(cfg_path, pretrained=None, use_ema=False, num_classes=None):
    if use_ema and not pretrained:
        raise ValueError('use_ema selects the EMA weights of the pretrained checkpoint: give pretrained')
    config = _get_config(cfg_path)
    if num_classes is not None:
        config = _with_setting(config, 'MODEL.NUM_CLASSES', num_classes, 'num_classes')
    model = _build_xcit(config)
    if pretrained:
        _load_every_weight(model, pretrained, f'the model of {cfg_path}', use_ema)
    return model


def _entry(cfg_path):
    name = _os.path.splitext(_os.path.basename(cfg_path))[0]
    entry = _functools.partial(_create_model, cfg_path)
    entry.__name__ = name
    config = _os.path.relpath(cfg_path, _os.path.dirname(_CONFIGS))
    entry.__doc__ = (f'{_description(cfg_path)}\n\nThe model of {config}; keywords: pretrained (a .pdparams '
                     f'or training checkpoint to load), use_ema, num_classes (the head\'s outputs, if not '
                     f'the config\'s; 0: no head).')
    return name, entry


globals().update(_entry(path) for path in sorted(_glob.glob(_os.path.join(_CONFIGS, 'xcit_*.yaml')) +
                                                 _glob.glob(_os.path.join(_CONFIGS, 'dino', '*.yaml'))))
