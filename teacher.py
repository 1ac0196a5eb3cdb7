"""The frozen teacher model for distillation (``TRAIN.DISTILLATION_TYPE`` 'soft' or 'hard')."""
import os

from config import ConfigError, get_config
from regnet import regnety_160
from utils import CheckpointError, check_checkpoint_file, load_every_weight
from xcit import build_xcit

__all__ = ['build_teacher']

YAML_SUFFIXES = ('.yaml', '.yml')


def _build_architecture(name, num_classes):
    """``regnety_160``, or the XCiT of one of our YAML configs, with ``num_classes`` outputs."""
    if name == 'regnety_160':
        return regnety_160(num_classes)
    if name.endswith(YAML_SUFFIXES):
        if not os.path.isfile(name):
            raise ConfigError(f'TRAIN.TEACHER_MODEL: config file not found: {name}')
        teacher_config = get_config(name)
        teacher_config.defrost()
        teacher_config.MODEL.NUM_CLASSES = num_classes
        return build_xcit(teacher_config)
    raise ConfigError(f"TRAIN.TEACHER_MODEL must be 'regnety_160' or the path of an XCiT YAML config, "
                      f"got {name!r}")


def _check_weights_path(path):
    """Fails early, before a large teacher is built, when there are no weights to load."""
    if not path:
        raise ConfigError('TRAIN.TEACHER_PRETRAINED is empty: distilling from an untrained teacher is '
                          'useless; set it to the teacher\'s converted .pdparams '
                          '(see port_weights/convert_regnet.py)')
    check_checkpoint_file(path, 'TRAIN.TEACHER_PRETRAINED')


def build_teacher(config):
    """Builds ``TRAIN.TEACHER_MODEL`` with ``MODEL.NUM_CLASSES`` outputs (as DeiT: the student's
    classes), loads ``TRAIN.TEACHER_PRETRAINED`` (a converted ``.pdparams`` or a training
    checkpoint), which must fill every weight, and returns it in eval mode with every
    parameter frozen. ``forward(x)``: images (B, 3, H, W) -> logits (B, MODEL.NUM_CLASSES).
    """
    path = config.TRAIN.TEACHER_PRETRAINED
    _check_weights_path(path)
    model = _build_architecture(config.TRAIN.TEACHER_MODEL, config.MODEL.NUM_CLASSES)
    try:
        load_every_weight(model, path, 'the teacher model')
    except CheckpointError as e:
        raise CheckpointError(f'TRAIN.TEACHER_PRETRAINED: {e}') from e
    model.eval()
    for param in model.parameters():
        param.stop_gradient = True
    return model
