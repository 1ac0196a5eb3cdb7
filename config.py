"""Configuration: defaults, YAML files with ``BASE`` inheritance, and command-line overrides.

The layout follows PaddleViT: ``DATA``, ``MODEL``, ``TRAIN`` plus a few top-level keys.
``get_config(path)`` returns a frozen yacs ``CfgNode``; ``update_config(config, args)``
applies the command-line arguments of ``main_single_gpu.py`` / ``main_multi_gpu.py``.
Every key a file or ``-opts`` sets must exist here, with a value of the same type and, where
it has one, in its range (``check_values``); otherwise ``ConfigError`` names the key and where
it came from.
"""
import ast
import math
import os
import re

import yaml
from yacs.config import CfgNode as CN

_C = CN()
_C.BASE = ['']

# data settings
_C.DATA = CN()
_C.DATA.BATCH_SIZE = 128  # per process, for training
_C.DATA.BATCH_SIZE_EVAL = 128  # per process, for evaluation
_C.DATA.DATA_PATH = ''  # the dataset's folder (imagenet2012, imagefolder, cifar*); digits is bundled
_C.DATA.DATASET = 'imagenet2012'  # imagenet2012, imagefolder, digits, cifar10 or cifar100
_C.DATA.IMAGE_SIZE = 224  # input side in pixels, training and evaluation
_C.DATA.CROP_PCT = 1.0  # eval: resize the shorter side to IMAGE_SIZE / CROP_PCT, then centre-crop
_C.DATA.INTERPOLATION = 'bicubic'  # resize for evaluation: nearest, bilinear, bicubic or lanczos
_C.DATA.NUM_WORKERS = 2  # data loading processes per training/evaluation process; 0: load in the process itself
# the classes' names in label order, for predict.py and visualize_attention.py; empty: ImageNet's
# for 1000 classes, else the indices. A training run on an image folder writes its class folders'
# names here in its config.yaml, which export_model.py passes on with the exported model.
_C.DATA.CLASS_NAMES = []
_C.DATA.IMAGENET_MEAN = [0.485, 0.456, 0.406]  # per-channel normalisation of RGB values in [0, 1]
_C.DATA.IMAGENET_STD = [0.229, 0.224, 0.225]

# model settings
_C.MODEL = CN()
_C.MODEL.NAME = 'xcit_nano_12_p16_224'  # a label for logs and exports; the keys below build the model
_C.MODEL.PRETRAINED = ''  # a converted .pdparams or a training checkpoint
_C.MODEL.RESUME = ''  # a training checkpoint to continue from
_C.MODEL.NUM_CLASSES = 1000  # 0: no classifier head, the model outputs the final-norm class token
_C.MODEL.PATCH_SIZE = 16  # 16 (four stride-2 stem convolutions) or 8 (three)
_C.MODEL.EMBED_DIM = 128  # token width
_C.MODEL.DEPTH = 12  # XCA blocks
_C.MODEL.NUM_HEADS = 4
_C.MODEL.MLP_RATIO = 4.0  # MLP hidden width / EMBED_DIM
_C.MODEL.QKV_BIAS = True
_C.MODEL.ETA = 1.0  # initial value of the layer-scale gammas
_C.MODEL.TOKENS_NORM = False  # class attention normalises all tokens (True) or only the class token
_C.MODEL.CLS_ATTN_LAYERS = 2  # class-attention blocks after the XCA blocks
_C.MODEL.USE_POS = True  # add the Fourier positional encoding
_C.MODEL.DROPOUT = 0.0  # dropout after the MLPs and projections
_C.MODEL.ATTENTION_DROPOUT = 0.0  # dropout of the attention maps
_C.MODEL.DROPPATH = 0.0  # stochastic depth: the rate at which a block's branches are dropped per sample

# training settings: the official XCiT / DeiT recipe
_C.TRAIN = CN()
_C.TRAIN.NUM_EPOCHS = 400
_C.TRAIN.WARMUP_EPOCHS = 5  # linear warm-up from WARMUP_START_LR to the scaled BASE_LR, then a cosine to END_LR
_C.TRAIN.WEIGHT_DECAY = 0.05  # not on biases, norms, gammas and the class token (optim.py)
_C.TRAIN.BASE_LR = 5e-4  # for a global batch of LINEAR_SCALED_LR images
_C.TRAIN.WARMUP_START_LR = 1e-6
_C.TRAIN.END_LR = 1e-5  # the cosine's end, reached after the last step
_C.TRAIN.LINEAR_SCALED_LR = 512  # lr = BASE_LR * global batch / this; 0 disables scaling
_C.TRAIN.GRAD_CLIP = 0.0  # max global gradient norm; 0 disables clipping
_C.TRAIN.ACCUM_ITER = 1  # batches whose gradients add up to one optimizer step
_C.TRAIN.GRAD_CHECKPOINTING = False  # recompute each XCA block in the backward pass: less memory, more time
# BatchNorm statistics over all processes' batches, as the official training (nn.SyncBatchNorm), on
# GPUs; on the CPU (no SyncBatchNorm kernel in Paddle) and when False, each process's own batch
_C.TRAIN.SYNC_BN = True
_C.TRAIN.FREEZE_BACKBONE = False  # train the classifier head alone on the frozen model's features (a linear probe)
_C.TRAIN.OPTIMIZER = CN()
_C.TRAIN.OPTIMIZER.NAME = 'AdamW'  # AdamW, or SGD (with momentum, as DINO's linear evaluation)
_C.TRAIN.OPTIMIZER.EPS = 1e-8  # AdamW
_C.TRAIN.OPTIMIZER.BETAS = [0.9, 0.999]  # AdamW
_C.TRAIN.OPTIMIZER.MOMENTUM = 0.9  # SGD
_C.TRAIN.MODEL_EMA = True  # keep an exponential moving average of the weights, validated beside them
_C.TRAIN.MODEL_EMA_DECAY = 0.99996  # per optimizer step
_C.TRAIN.SMOOTHING = 0.1  # label smoothing (folded into the targets when mixup or cutmix is on)
_C.TRAIN.COLOR_JITTER = 0.4  # used only when RAND_AUGMENT is off
_C.TRAIN.RAND_AUGMENT = True
_C.TRAIN.RAND_AUGMENT_CONFIG = 'rand-m9-mstd0.5-inc1'  # timm's RandAugment policy string
_C.TRAIN.TRAIN_INTERPOLATION = 'bicubic'  # resize of the random crops, as DATA.INTERPOLATION
_C.TRAIN.RANDOM_RESIZED_CROP_SCALE = [0.08, 1.0]  # area range of the random crops
_C.TRAIN.HFLIP = 0.5  # probability of a horizontal flip
# each image REPEATED_AUG_COUNT times per epoch, differently augmented, on different processes
_C.TRAIN.REPEATED_AUG = True
_C.TRAIN.REPEATED_AUG_COUNT = 3
_C.TRAIN.MIXUP_ALPHA = 0.8  # Beta(alpha, alpha) mixing; 0: no mixup
_C.TRAIN.CUTMIX_ALPHA = 1.0  # 0: no cutmix
_C.TRAIN.CUTMIX_MINMAX = []  # [min, max] box ratio; empty: use CUTMIX_ALPHA
_C.TRAIN.MIXUP_PROB = 1.0  # probability of mixing a batch (or pair, or element)
_C.TRAIN.MIXUP_SWITCH_PROB = 0.5  # probability of cutmix instead of mixup when both are on
_C.TRAIN.MIXUP_MODE = 'batch'  # one draw per batch, pair or elem
_C.TRAIN.RANDOM_ERASE_PROB = 0.25
_C.TRAIN.RANDOM_ERASE_MODE = 'pixel'  # the boxes' fill: pixel (noise per value), rand (per channel), const (0)
_C.TRAIN.RANDOM_ERASE_COUNT = 1  # boxes per image
_C.TRAIN.DISTILLATION_TYPE = 'none'  # none, soft or hard
_C.TRAIN.DISTILLATION_ALPHA = 0.5  # weight of the distillation loss; the label loss has 1 - alpha
_C.TRAIN.DISTILLATION_TAU = 1.0  # temperature of soft distillation
_C.TRAIN.TEACHER_MODEL = 'regnety_160'  # regnety_160 or the path of one of our XCiT YAML files
_C.TRAIN.TEACHER_PRETRAINED = ''  # the teacher's converted .pdparams, or a training checkpoint of it

# misc
_C.SAVE = './output'  # the output folder (-output): log, metrics, checkpoints, summaries
_C.SAVE_FREQ = 10  # epochs between kept epoch_N.pdparams snapshots (last.pdparams is written every epoch); 0: none
_C.REPORT_FREQ = 50  # steps between log lines
_C.VALIDATE_FREQ = 1  # epochs between evaluations; 0: only after the last epoch
_C.SEED = 0  # seeds initialisation, data order, augmentation, mixup and drop path (with the rank and epoch)
_C.EVAL = False  # evaluate MODEL.PRETRAINED (or RESUME) instead of training (-eval)
_C.AMP = False  # float16 autocast with loss scaling on GPUs (-amp); no effect on the CPU
_C.EMA_EVAL = False  # evaluate the EMA weights of a training checkpoint
_C.NGPUS = -1  # processes for main_multi_gpu.py; -1: all visible GPUs, or 2 on CPU


class ConfigError(ValueError):
    """A config file or override that does not fit the defaults."""


def _coerce(key, value, default, source):
    """Returns ``value`` converted to the type of ``default`` or raises ``ConfigError``."""
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(default, float):
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads 1e-5 (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None and math.isfinite(number):
            return number
        if number is not None:
            raise ConfigError(f'{source}: {key} must be a finite number, got {value!r}')
    elif isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(default, str):
        if isinstance(value, str):
            return value
        if value is None:
            return ''
    elif isinstance(default, (list, tuple)):
        if isinstance(value, (list, tuple)):
            return list(value)
    raise ConfigError(f'{source}: {key} must be {type(default).__name__}, '
                      f'got {value!r} ({type(value).__name__})')


def _merge(node, updates, source, prefix=''):
    """Merges a nested dict into ``node``, checking every key and type."""
    for key, value in updates.items():
        full = f'{prefix}{key}'  # YAML keys may be numbers or booleans (``12:``, ``yes:``)
        if key not in node:
            raise ConfigError(f'{source}: unknown config key {full}')
        if isinstance(node[key], CN):
            if not isinstance(value, dict):
                raise ConfigError(f'{source}: {full} must be a section (mapping), got {value!r}')
            _merge(node[key], value, source, full + '.')
        else:
            node[key] = _coerce(full, value, node[key], source)
            _check_range(full, node[key], source)


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping, which YAML itself
    resolves silently by keeping the last (e.g. a second ``TRAIN:`` section replacing the first)."""

    def construct_mapping(self, node, deep=False):
        first_line = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                seen = first_line.setdefault(key, key_node.start_mark.line + 1)
            except TypeError:  # an unhashable key: SafeLoader's own error follows
                continue
            if seen != key_node.start_mark.line + 1:
                raise ConfigError(f'{self.name}: line {key_node.start_mark.line + 1}: {key} is given a second '
                                  f'time in the same mapping (first on line {seen}), which would replace the first')
        return super().construct_mapping(node, deep)


def _load_yaml(path):
    if os.path.isdir(path):
        raise ConfigError(f'{path} is a folder, not a config file')
    if not os.path.isfile(path):
        raise ConfigError(f'config file not found: {path}')
    with open(path, encoding='utf-8') as f:
        try:
            data = yaml.load(f, Loader=_UniqueKeyLoader)
        except yaml.YAMLError as e:
            raise ConfigError(f'{path}: not valid YAML: {e}') from e
        except UnicodeDecodeError as e:  # e.g. weights given as -cfg
            raise ConfigError(f'{path}: not a YAML config, which is UTF-8 text ({e.reason} at byte {e.start})') from e
    if data is None:
        raise ConfigError(f'{path}: the file sets nothing (empty, or comments only)')
    if not isinstance(data, dict):
        raise ConfigError(f'{path}: expected a mapping at the top level')
    return data


def _base_files(data, path):
    """Removes ``BASE`` from the mapping ``data`` read from ``path``; returns the paths of the
    files it names (relative to ``path``), in order."""
    bases = data.pop('BASE', None) or []
    if not isinstance(bases, list) or not all(isinstance(base, str) for base in bases):
        raise ConfigError(f"{path}: BASE must be a list of file names, e.g. ['base.yaml'], got {bases!r}")
    return [os.path.join(os.path.dirname(path), base) for base in bases if base]


def merge_from_file(config, path, including=()):
    """Merges ``path`` into ``config``, after the files its ``BASE`` list names (relative to it).

    ``including``: the files whose ``BASE`` led here, outermost first; a file among them would
    include itself without end.
    """
    chain = including + (path,)
    if any(os.path.realpath(path) == os.path.realpath(outer) for outer in including):
        raise ConfigError(f'{including[-1]}: BASE includes itself: {" -> ".join(chain)}')
    data = _load_yaml(path)
    for base in _base_files(data, path):
        merge_from_file(config, base, chain)
    _merge(config, data, path)


def _parse_value(text, default):
    """Parses an ``-opts`` value the way yacs does: a Python literal, else a plain string.

    For a key whose ``default`` is a string (a path, a name) a number or boolean stays the text
    as typed: ``-output 2024`` is the folder 2024. ``None`` still gives the empty string.
    """
    if not isinstance(text, str):
        return text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        lowered = text.lower()
        if lowered in ('true', 'false'):
            return lowered == 'true'
        return text
    if isinstance(default, str) and isinstance(value, (int, float)):  # bool is an int
        return text
    return value


def merge_from_list(config, opts, source='-opts'):
    """Applies ``[KEY, VALUE, KEY, VALUE, ...]`` with dotted keys, e.g. ``TRAIN.NUM_EPOCHS 2``."""
    if len(opts) % 2:
        raise ConfigError(f'{source}: expected KEY VALUE pairs, got an odd number of items: {opts}')
    for key, text in zip(opts[0::2], opts[1::2]):
        if key == 'BASE':
            raise ConfigError(f'{source}: BASE is read from config files only (the files a file builds on)')
        node, parts = config, key.split('.')
        for i, part in enumerate(parts[:-1]):
            if part not in node or not isinstance(node[part], CN):
                raise ConfigError(f'{source}: unknown config key {key}')
            node = node[part]
        value = _parse_value(text, node.get(parts[-1]))
        _merge(node, {parts[-1]: value}, source, '.'.join(parts[:-1]) + '.' if len(parts) > 1 else '')


def _positive(v):
    return v > 0


def _non_negative(v):
    return v >= 0


def _probability(v):
    return 0 <= v <= 1


def _below_one(v):
    return 0 <= v < 1


def _numbers(v, count, test):
    """``v`` is a list of ``count`` finite numbers (bools excluded) that each pass ``test``."""
    return (len(v) == count and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)
            and all(math.isfinite(x) and test(x) for x in v))


def _interval(v, high=None):
    """``v`` is [low, high'] with 0 < low <= high' (<= ``high`` when given)."""
    return _numbers(v, 2, _positive) and v[0] <= v[1] and (high is None or v[1] <= high)


def _one_of(choices):
    """The rule (test, requirement) of a value that must be one of ``choices``."""
    return (lambda v: v in choices), ' or '.join(map(repr, choices))


def _magnitude_std(text):
    std = float(text)
    return math.inf if std > 100 else std  # timm: > 100 means uniform sampling


# TRAIN.RAND_AUGMENT_CONFIG section -> (RandAugment argument, parser of the number that follows)
RAND_AUGMENT_SECTIONS = {
    'm': ('magnitude', int),
    'n': ('num_layers', int),
    'p': ('prob', float),
    'mstd': ('magnitude_std', _magnitude_std),
    'mmax': ('magnitude_max', int),
    'inc': ('increasing', lambda text: bool(int(text))),
}


def rand_augment_options(config_str):
    """timm's RandAugment config string -> the arguments it sets, e.g. 'rand-m9-mstd0.5-inc1' ->
    {'magnitude': 9, 'magnitude_std': 0.5, 'increasing': True}; ValueError for any other string.

    Sections after 'rand': m (magnitude, default 10), n (layers, 2), p (op probability, 0.5),
    mstd (magnitude std, 0; > 100 means uniform), mmax (magnitude cap, 10), inc (1: increasing ops).
    """
    parts = config_str.split('-')
    if parts[0] != 'rand':
        raise ValueError(f"a RandAugment config starts with 'rand', got {config_str!r}")
    options = {}
    for part in parts[1:]:
        match = re.fullmatch(r'([a-z]+)(\d[\d.]*)', part)
        try:
            name, parse = RAND_AUGMENT_SECTIONS[match[1]]
            options[name] = parse(match[2])
        except (TypeError, KeyError, ValueError):
            raise ValueError(f'unsupported section {part!r} in {config_str!r} '
                             f'(supported: {", ".join(RAND_AUGMENT_SECTIONS)} followed by a number)') from None
    return options


def _is_rand_augment_config(v):
    try:
        rand_augment_options(v)
    except ValueError:
        return False
    return True


# TRAIN.OPTIMIZER.NAME (lower case) -> the TRAIN.OPTIMIZER settings that only this optimizer reads
OPTIMIZER_SETTINGS = {'adamw': ('EPS', 'BETAS'), 'sgd': ('MOMENTUM',)}
INTERPOLATIONS = ('nearest', 'bilinear', 'bicubic', 'lanczos')  # resampling filters, as PIL names them
MIXUP_MODES = ('batch', 'pair', 'elem')  # TRAIN.MIXUP_MODE: one mixing factor per batch, pair or image
ERASE_MODES = ('pixel', 'rand', 'const')  # TRAIN.RANDOM_ERASE_MODE: the erased box's fill
DATASETS = ('imagenet2012', 'imagefolder', 'digits', 'cifar10', 'cifar100')  # DATA.DATASET, see datasets.py

# key -> (test, what the value must be): ranges that the types alone do not enforce
_VALUE_RULES = {
    'DATA.DATASET': _one_of(DATASETS),
    'DATA.BATCH_SIZE': (_positive, '> 0'),
    'DATA.BATCH_SIZE_EVAL': (_positive, '> 0'),
    'DATA.IMAGE_SIZE': (_positive, '> 0'),
    'DATA.NUM_WORKERS': (_non_negative, '>= 0'),
    'DATA.CROP_PCT': (_positive, '> 0'),
    'DATA.INTERPOLATION': _one_of(INTERPOLATIONS),
    'DATA.CLASS_NAMES': (lambda v: all(isinstance(name, str) and name.strip() for name in v),
                         'a list of class names (text, quoted if YAML would read it as a number)'),
    'DATA.IMAGENET_MEAN': (lambda v: _numbers(v, 3, lambda x: True), '3 numbers (R, G, B)'),
    'DATA.IMAGENET_STD': (lambda v: _numbers(v, 3, _positive), '3 numbers > 0 (R, G, B)'),
    'MODEL.NUM_CLASSES': (_non_negative, '>= 0'),
    'MODEL.PATCH_SIZE': _one_of((8, 16)),
    'MODEL.EMBED_DIM': (_positive, '> 0'),
    'MODEL.DEPTH': (_positive, '> 0'),
    'MODEL.NUM_HEADS': (_positive, '> 0'),
    'MODEL.MLP_RATIO': (_positive, '> 0'),
    'MODEL.CLS_ATTN_LAYERS': (_non_negative, '>= 0'),
    'MODEL.DROPOUT': (_below_one, 'in [0, 1)'),
    'MODEL.ATTENTION_DROPOUT': (_below_one, 'in [0, 1)'),
    'MODEL.DROPPATH': (_below_one, 'in [0, 1)'),
    'TRAIN.NUM_EPOCHS': (_positive, '> 0'),
    'TRAIN.WARMUP_EPOCHS': (_non_negative, '>= 0'),
    'TRAIN.WEIGHT_DECAY': (_non_negative, '>= 0'),
    'TRAIN.BASE_LR': (_positive, '> 0'),
    'TRAIN.WARMUP_START_LR': (_non_negative, '>= 0'),
    'TRAIN.END_LR': (_non_negative, '>= 0'),
    'TRAIN.LINEAR_SCALED_LR': (_non_negative, '>= 0'),
    'TRAIN.GRAD_CLIP': (_non_negative, '>= 0'),
    'TRAIN.ACCUM_ITER': (_positive, '> 0'),
    'TRAIN.OPTIMIZER.NAME': (lambda v: v.lower() in OPTIMIZER_SETTINGS, "'AdamW' or 'SGD'"),
    'TRAIN.OPTIMIZER.EPS': (_non_negative, '>= 0'),
    'TRAIN.OPTIMIZER.MOMENTUM': (_below_one, 'in [0, 1)'),
    'TRAIN.OPTIMIZER.BETAS': (lambda v: _numbers(v, 2, _below_one), '2 numbers in [0, 1) (beta1, beta2)'),
    'TRAIN.TRAIN_INTERPOLATION': _one_of(INTERPOLATIONS),
    'TRAIN.RANDOM_RESIZED_CROP_SCALE': (_interval, '[min, max] with 0 < min <= max'),
    'TRAIN.CUTMIX_MINMAX': (lambda v: not v or _interval(v, 1), '[] or [min, max] with 0 < min <= max <= 1'),
    'TRAIN.MODEL_EMA_DECAY': (_probability, 'in [0, 1]'),
    'TRAIN.SMOOTHING': (_below_one, 'in [0, 1)'),
    'TRAIN.COLOR_JITTER': (_non_negative, '>= 0'),
    'TRAIN.RAND_AUGMENT_CONFIG': (_is_rand_augment_config, "timm's RandAugment string: 'rand', then sections "
                                  f"{', '.join(RAND_AUGMENT_SECTIONS)} each followed by a number, e.g. "
                                  "'rand-m9-mstd0.5-inc1'"),
    'TRAIN.HFLIP': (_probability, 'in [0, 1]'),
    'TRAIN.REPEATED_AUG_COUNT': (_positive, '> 0'),
    'TRAIN.MIXUP_ALPHA': (_non_negative, '>= 0'),
    'TRAIN.CUTMIX_ALPHA': (_non_negative, '>= 0'),
    'TRAIN.MIXUP_PROB': (_probability, 'in [0, 1]'),
    'TRAIN.MIXUP_SWITCH_PROB': (_probability, 'in [0, 1]'),
    'TRAIN.MIXUP_MODE': _one_of(MIXUP_MODES),
    'TRAIN.RANDOM_ERASE_MODE': _one_of(ERASE_MODES),
    'TRAIN.RANDOM_ERASE_PROB': (_probability, 'in [0, 1]'),
    'TRAIN.RANDOM_ERASE_COUNT': (_positive, '> 0'),
    'TRAIN.DISTILLATION_TYPE': (lambda v: v in ('none', 'soft', 'hard'), "'none', 'soft' or 'hard'"),
    'TRAIN.DISTILLATION_ALPHA': (_probability, 'in [0, 1]'),
    'TRAIN.DISTILLATION_TAU': (_positive, '> 0'),
    # numpy seeds below 2**32; SEED + rank (+ 1000 * epoch for Paddle) must stay there
    'SEED': (lambda v: 0 <= v < 2 ** 31, 'in [0, 2**31)'),
    'SAVE_FREQ': (_non_negative, '>= 0'),
    'REPORT_FREQ': (_positive, '> 0'),
    'VALIDATE_FREQ': (_non_negative, '>= 0'),
}


def _check_range(key, value, source):
    """Raises ``ConfigError`` naming ``key`` and ``source`` (where the value was set) when ``value``
    breaks the key's rule in ``_VALUE_RULES``."""
    if key in _VALUE_RULES:
        test, requirement = _VALUE_RULES[key]
        if not test(value):
            raise ConfigError(f'{source}: {key} must be {requirement}, got {value!r}')


def check_values(config, source):
    """Raises ``ConfigError`` naming the key and ``source`` for a value out of its range, or
    model dimensions that do not fit together. (Each value set from a file or the command line
    was already checked there, naming that file.)"""
    for key in _VALUE_RULES:
        node = config
        for part in key.split('.'):
            node = node[part]
        _check_range(key, node, source)
    _check_optimizer_settings(config.TRAIN.OPTIMIZER, source)
    m = config.MODEL
    if m.EMBED_DIM % m.NUM_HEADS:
        raise ConfigError(f'{source}: MODEL.EMBED_DIM ({m.EMBED_DIM}) must be a multiple of '
                          f'MODEL.NUM_HEADS ({m.NUM_HEADS})')
    names = config.DATA.CLASS_NAMES
    if names and len(names) != m.NUM_CLASSES:
        raise ConfigError(f'{source}: DATA.CLASS_NAMES has {len(names)} names but MODEL.NUM_CLASSES is '
                          f'{m.NUM_CLASSES}: give one per class, or none (-opts DATA.CLASS_NAMES "[]")')
    stem_divisor = 8 if m.PATCH_SIZE == 16 else 4  # the first stem convolution has EMBED_DIM / this channels
    if m.EMBED_DIM % stem_divisor:
        raise ConfigError(f'{source}: MODEL.EMBED_DIM ({m.EMBED_DIM}) must be a multiple of {stem_divisor} '
                          f'with MODEL.PATCH_SIZE {m.PATCH_SIZE}')


# (what turns them off, test on TRAIN, the TRAIN settings that nothing reads then)
_SWITCHED_SETTINGS = (
    ("TRAIN.DISTILLATION_TYPE is 'none'", lambda t: t.DISTILLATION_TYPE == 'none',
     ('TEACHER_MODEL', 'TEACHER_PRETRAINED', 'DISTILLATION_ALPHA', 'DISTILLATION_TAU')),
    ("TRAIN.DISTILLATION_TYPE is 'hard'", lambda t: t.DISTILLATION_TYPE == 'hard', ('DISTILLATION_TAU',)),
    ('TRAIN.RAND_AUGMENT is on', lambda t: t.RAND_AUGMENT, ('COLOR_JITTER',)),
    ('TRAIN.RAND_AUGMENT is off', lambda t: not t.RAND_AUGMENT, ('RAND_AUGMENT_CONFIG',)),
    ('TRAIN.RANDOM_ERASE_PROB is 0', lambda t: t.RANDOM_ERASE_PROB == 0, ('RANDOM_ERASE_MODE', 'RANDOM_ERASE_COUNT')),
    ('TRAIN.MIXUP_PROB is 0', lambda t: t.MIXUP_PROB == 0,
     ('MIXUP_ALPHA', 'CUTMIX_ALPHA', 'CUTMIX_MINMAX', 'MIXUP_SWITCH_PROB', 'MIXUP_MODE')),
    ('TRAIN.MIXUP_ALPHA and TRAIN.CUTMIX_ALPHA are 0 and TRAIN.CUTMIX_MINMAX is empty',
     lambda t: not (t.MIXUP_ALPHA > 0 or t.CUTMIX_ALPHA > 0 or t.CUTMIX_MINMAX),
     ('MIXUP_PROB', 'MIXUP_SWITCH_PROB', 'MIXUP_MODE')),
    ('only one of Mixup (TRAIN.MIXUP_ALPHA) and CutMix (TRAIN.CUTMIX_ALPHA or TRAIN.CUTMIX_MINMAX) is on',
     lambda t: not (t.MIXUP_ALPHA > 0 and (t.CUTMIX_ALPHA > 0 or t.CUTMIX_MINMAX)), ('MIXUP_SWITCH_PROB',)),
    ('TRAIN.CUTMIX_MINMAX is set', lambda t: bool(t.CUTMIX_MINMAX), ('CUTMIX_ALPHA',)),
    ('TRAIN.MODEL_EMA is off', lambda t: not t.MODEL_EMA, ('MODEL_EMA_DECAY',)),
    ('TRAIN.REPEATED_AUG is off', lambda t: not t.REPEATED_AUG, ('REPEATED_AUG_COUNT',)),
    ('TRAIN.WARMUP_EPOCHS is 0', lambda t: t.WARMUP_EPOCHS == 0, ('WARMUP_START_LR',)),
)


def with_setting(config, key, value, source):
    """``config`` (frozen) with ``key`` set to ``value`` as ``-opts`` would set it; a value of the
    wrong type or out of range raises ``ConfigError`` naming ``source`` (e.g. '-image_size')."""
    config.defrost()
    merge_from_list(config, [key, value], source=source)
    check_values(config, source)
    config.freeze()
    return config


def settings_without_effect(config):
    """Messages naming the training settings that differ from their default but have no effect,
    because what reads them is off (e.g. a teacher without distillation), for a run to report."""
    train = config.TRAIN
    reasons = {}  # key -> the first of the switches that turn it off
    for switch, is_off, keys in _SWITCHED_SETTINGS:
        for key in keys:
            if is_off(train) and train[key] != _C.TRAIN[key]:
                reasons.setdefault(key, switch)
    return [f'TRAIN.{key} is {train[key]!r}, which has no effect: {switch}' for key, switch in reasons.items()]


def _check_optimizer_settings(optimizer, source):
    """Raises ``ConfigError`` when a setting of the other optimizer differs from its default: it
    would have no effect."""
    name = optimizer.NAME.lower()
    for other, keys in OPTIMIZER_SETTINGS.items():
        for key in keys:
            if other != name and optimizer[key] != _C.TRAIN.OPTIMIZER[key]:
                raise ConfigError(f'{source}: TRAIN.OPTIMIZER.{key} is set ({optimizer[key]!r}) but only '
                                  f'{"SGD" if other == "sgd" else "AdamW"} reads it, and TRAIN.OPTIMIZER.NAME '
                                  f'is {optimizer.NAME!r}')


def get_config(path=None):
    """Returns a frozen copy of the defaults, merged with ``path`` (and its BASE files)."""
    config = _C.clone()
    if path:
        merge_from_file(config, path)
    check_values(config, path or 'defaults')
    config.freeze()
    return config


def flat_settings(node, prefix=''):
    """``{dotted key: value}`` of every setting in the nested mapping ``node`` (a config or the
    dict of its YAML dump)."""
    flat = {}
    for key, value in node.items():
        if isinstance(value, dict):
            flat.update(flat_settings(value, f'{prefix}{key}.'))
        else:
            flat[f'{prefix}{key}'] = value
    return flat


CASE_INSENSITIVE_KEYS = ('TRAIN.OPTIMIZER.NAME',)  # their values are read in any case


def changed_settings(dumped, config, ignore=()):
    """``[(key, value in dumped, value in config)]`` for the settings in which ``config`` differs
    from the config ``dumped`` as YAML text (e.g. the one a training checkpoint keeps), leaving
    out the keys in ``ignore``. Lists compare as lists whatever YAML made of them, the values of
    ``CASE_INSENSITIVE_KEYS`` in lower case."""
    before = flat_settings(yaml.safe_load(dumped) or {})
    now = flat_settings(config)

    def comparable(key, value):
        if isinstance(value, (list, tuple)):
            return list(value)
        return value.lower() if key in CASE_INSENSITIVE_KEYS and isinstance(value, str) else value
    return [(key, before.get(key), value) for key, value in now.items()
            if key not in ignore and comparable(key, before.get(key)) != comparable(key, value)]


# command-line argument -> config key, for update_config
_ARG_KEYS = {
    'dataset': 'DATA.DATASET',
    'data_path': 'DATA.DATA_PATH',
    'batch_size': 'DATA.BATCH_SIZE',
    'batch_size_eval': 'DATA.BATCH_SIZE_EVAL',
    'image_size': 'DATA.IMAGE_SIZE',
    'pretrained': 'MODEL.PRETRAINED',
    'resume': 'MODEL.RESUME',
    'output': 'SAVE',
    'ngpus': 'NGPUS',
    'eval': 'EVAL',
    'amp': 'AMP',
    'ema': 'EMA_EVAL',
}


def update_config(config, args):
    """Returns ``config`` updated by the parsed command-line ``args``.

    Arguments left at ``None`` (or ``False`` for flags) keep the config's value; ``args.opts``
    is a ``KEY VALUE ...`` list applied last, so it wins over everything else.
    """
    config.defrost()
    if getattr(args, 'cfg', None):
        merge_from_file(config, args.cfg)
        check_values(config, args.cfg)
    pairs = []
    for arg, key in _ARG_KEYS.items():
        value = getattr(args, arg, None)
        if value is None or value is False:
            continue
        pairs += [key, value]
    merge_from_list(config, pairs, source='command line')
    merge_from_list(config, list(getattr(args, 'opts', None) or []))
    check_values(config, 'command line')  # the file was fine: the command line made it wrong
    config.freeze()
    return config
