"""The frozen teacher model for distillation (``TRAIN.DISTILLATION_TYPE`` 'soft' or 'hard')."""
import os

import paddle

from config import get_config
from regnet import regnety_160
from xcit import build_xcit

__all__ = ['build_teacher']

YAML_SUFFIXES = ('.yaml', '.yml')


def _build_architecture(name, num_classes):
    """``regnety_160``, or the XCiT of one of our YAML configs, with ``num_classes`` outputs."""
    if name == 'regnety_160':
        return regnety_160(num_classes)
    if name.endswith(YAML_SUFFIXES):
        if not os.path.isfile(name):
            raise FileNotFoundError(f'TRAIN.TEACHER_MODEL: config file not found: {name}')
        teacher_config = get_config(name)
        teacher_config.defrost()
        teacher_config.MODEL.NUM_CLASSES = num_classes
        return build_xcit(teacher_config)
    raise ValueError(f"TRAIN.TEACHER_MODEL must be 'regnety_160' or the path of an XCiT YAML config, "
                     f"got {name!r}")


def _check_weights_path(path):
    if not path:
        raise ValueError('TRAIN.TEACHER_PRETRAINED is empty: distilling from an untrained teacher is '
                         'useless; set it to the teacher\'s converted .pdparams '
                         '(see port_weights/convert_regnet.py)')
    if not os.path.isfile(path):
        raise FileNotFoundError(f'TRAIN.TEACHER_PRETRAINED: no such file: {path}')


def _load_weights(model, path):
    """Loads a ``.pdparams`` state dict into ``model``; every name and shape must match."""
    try:
        state_dict = paddle.load(path)
    except ValueError as e:
        raise ValueError(f'TRAIN.TEACHER_PRETRAINED: {e}') from e
    if not isinstance(state_dict, dict):
        raise ValueError(f'TRAIN.TEACHER_PRETRAINED: {path} holds a {type(state_dict).__name__}, '
                         'not a state dict')
    missing, unexpected = model.set_state_dict(state_dict)
    if missing or unexpected:
        raise ValueError(f'TRAIN.TEACHER_PRETRAINED: {path} does not fit the teacher model: '
                         f'{len(missing)} entries missing or mis-shaped (e.g. {missing[:3]}), '
                         f'{len(unexpected)} unexpected or mis-shaped (e.g. {unexpected[:3]})')


def build_teacher(config):
    """Builds ``TRAIN.TEACHER_MODEL`` with ``MODEL.NUM_CLASSES`` outputs (as DeiT: the student's
    classes), loads ``TRAIN.TEACHER_PRETRAINED``, and returns it in eval mode with every
    parameter frozen. ``forward(x)``: images (B, 3, H, W) -> logits (B, MODEL.NUM_CLASSES).
    """
    _check_weights_path(config.TRAIN.TEACHER_PRETRAINED)
    model = _build_architecture(config.TRAIN.TEACHER_MODEL, config.MODEL.NUM_CLASSES)
    _load_weights(model, config.TRAIN.TEACHER_PRETRAINED)
    model.eval()
    for param in model.parameters():
        param.stop_gradient = True
    return model
