"""The 42 model configs against the official models, and the config system itself."""
import argparse
import glob
import json
import os
import re

import numpy as np
import paddle
import pytest

from config import ConfigError, get_config, merge_from_list, settings_without_effect, update_config
from conftest import GOLDEN, ROOT
from xcit import build_xcit

CONFIGS = os.path.join(ROOT, 'configs')
ARCHS = ['nano_12', 'tiny_12', 'tiny_24', 'small_12', 'small_24', 'medium_24', 'large_24']
VARIANTS = [f'xcit_{arch}_p{patch}_{kind}'
            for arch in ARCHS for patch in (16, 8) for kind in ('224', '224_dist', '384_dist')]
NAME = re.compile(r'(?P<arch>xcit_\w+_p(?:16|8))_(?P<size>224|384)(?P<dist>_dist)?')

with open(os.path.join(GOLDEN, 'official_state_dict_manifest.json'), encoding='utf-8') as f:
    MANIFEST = json.load(f)


def config_path(name):
    return os.path.join(CONFIGS, name + '.yaml')


def paddle_layout(official_shapes):
    """Official state-dict {name: shape} -> the names and shapes a Paddle XCiT must have.

    BatchNorm statistics are ``_mean`` / ``_variance``, ``num_batches_tracked`` does not exist,
    and Linear weights (the only 2-D entries) are stored [in, out] instead of [out, in].
    """
    shapes = {}
    for name, shape in official_shapes.items():
        if name.endswith('.num_batches_tracked'):
            continue
        name = re.sub(r'\.running_mean$', '._mean', name)
        name = re.sub(r'\.running_var$', '._variance', name)
        shapes[name] = shape[::-1] if len(shape) == 2 else shape
    return shapes


def write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'w', encoding='utf-8') as f:
        f.write(text)
    return str(path)


# ----------------------------------------------------------------------------- model configs


def test_configs_folder_holds_exactly_the_42_variants():
    found = sorted(os.path.basename(p)[:-len('.yaml')]
                   for p in glob.glob(os.path.join(CONFIGS, 'xcit_*.yaml')))
    assert found == sorted(VARIANTS)


# Stochastic-depth rate per depth and width, the paper's Table B.1 (the official COCO configs give
# the same for T12, S12, S24 and M24).
STOCHASTIC_DEPTH = {'xcit_nano_12': 0.0, 'xcit_tiny_12': 0.0, 'xcit_tiny_24': 0.05, 'xcit_small_12': 0.05,
                    'xcit_small_24': 0.1, 'xcit_medium_24': 0.15, 'xcit_large_24': 0.25}


@pytest.mark.parametrize('name', VARIANTS)
def test_config_has_the_official_hyper_parameters(name):
    config = get_config(config_path(name))
    parts = NAME.fullmatch(name)
    official = MANIFEST[parts['arch']]['config']
    m = config.MODEL
    assert m.NAME == name
    assert (m.PATCH_SIZE, m.EMBED_DIM, m.DEPTH, m.NUM_HEADS, m.ETA, m.TOKENS_NORM) == (
        official['patch_size'], official['embed_dim'], official['depth'], official['num_heads'],
        official['eta'], official['tokens_norm'])
    assert (m.NUM_CLASSES, m.MLP_RATIO, m.QKV_BIAS, m.CLS_ATTN_LAYERS, m.USE_POS) == (
        1000, 4.0, True, 2, True)
    assert m.DROPPATH == STOCHASTIC_DEPTH[re.sub(r'_p(8|16)$', '', parts['arch'])]
    assert config.DATA.IMAGE_SIZE == int(parts['size'])
    assert (config.DATA.CROP_PCT, config.DATA.INTERPOLATION) == (1.0, 'bicubic')
    if parts['dist']:
        assert (config.TRAIN.DISTILLATION_TYPE, config.TRAIN.TEACHER_MODEL) == ('hard', 'regnety_160')
    else:
        assert config.TRAIN.DISTILLATION_TYPE == 'none'


# the argument defaults of the official main.py (facebookresearch/xcit), per process the batch of
# the README's single-node command (8 GPUs x --batch-size 128); 0 / [] where main.py has None
OFFICIAL_TRAINING = {
    'NUM_EPOCHS': 400, 'WARMUP_EPOCHS': 5, 'WEIGHT_DECAY': 0.05, 'BASE_LR': 5e-4, 'LINEAR_SCALED_LR': 512,
    'WARMUP_START_LR': 1e-6, 'END_LR': 1e-5, 'GRAD_CLIP': 0.0, 'MODEL_EMA': True, 'MODEL_EMA_DECAY': 0.99996,
    'SMOOTHING': 0.1, 'COLOR_JITTER': 0.4, 'RAND_AUGMENT': True, 'RAND_AUGMENT_CONFIG': 'rand-m9-mstd0.5-inc1',
    'TRAIN_INTERPOLATION': 'bicubic', 'RANDOM_RESIZED_CROP_SCALE': [0.08, 1.0], 'HFLIP': 0.5,
    'REPEATED_AUG': True, 'REPEATED_AUG_COUNT': 3, 'MIXUP_ALPHA': 0.8, 'CUTMIX_ALPHA': 1.0, 'CUTMIX_MINMAX': [],
    'MIXUP_PROB': 1.0, 'MIXUP_SWITCH_PROB': 0.5, 'MIXUP_MODE': 'batch', 'RANDOM_ERASE_PROB': 0.25,
    'RANDOM_ERASE_MODE': 'pixel', 'RANDOM_ERASE_COUNT': 1, 'DISTILLATION_ALPHA': 0.5, 'DISTILLATION_TAU': 1.0,
    'TEACHER_MODEL': 'regnety_160', 'ACCUM_ITER': 1, 'FREEZE_BACKBONE': False,
}


@pytest.mark.parametrize('name', VARIANTS)
def test_config_trains_with_the_official_recipe(name):
    config = get_config(config_path(name))
    t = config.TRAIN
    assert {key: t[key] for key in OFFICIAL_TRAINING} == OFFICIAL_TRAINING
    assert (t.OPTIMIZER.NAME, t.OPTIMIZER.EPS, list(t.OPTIMIZER.BETAS)) == ('AdamW', 1e-8, [0.9, 0.999])
    assert (config.DATA.BATCH_SIZE, config.MODEL.DROPOUT, config.MODEL.ATTENTION_DROPOUT) == (128, 0.0, 0.0)
    assert (config.DATA.IMAGENET_MEAN, config.DATA.IMAGENET_STD) == ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])


@pytest.mark.parametrize('name', VARIANTS)
def test_built_model_matches_the_official_state_dict(name):
    official = MANIFEST[NAME.fullmatch(name)['arch']]
    # LazyGuard builds every layer and parameter but skips the random initialisation,
    # which would take ~15 s for the large /8 model on CPU; names and shapes are unaffected.
    with paddle.LazyGuard():
        model = build_xcit(get_config(config_path(name)))
    trainable = sum(int(np.prod(p.shape)) for p in model.parameters() if not p.stop_gradient)
    assert trainable == official['params']
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert shapes == paddle_layout(official['state_dict'])


def test_smallest_config_builds_and_runs_at_its_image_size():
    config = get_config(config_path('xcit_nano_12_p16_384_dist'))
    model = build_xcit(config)
    model.eval()
    size = config.DATA.IMAGE_SIZE
    logits = model(paddle.randn([1, 3, size, size]))
    assert logits.shape == [1, 1000]
    assert np.isfinite(logits.numpy()).all()


# ----------------------------------------------------------------------------- config system


@pytest.mark.parametrize('text, key', [
    ('MODEL:\n  EMBED_DIMS: 128\n', 'MODEL.EMBED_DIMS'),
    ('SEEDS: 1\n', 'SEEDS'),
    ('TRIAN:\n  NUM_EPOCHS: 1\n', 'TRIAN'),
    ('MODEL:\n  12: 3\n', 'MODEL.12'),
    ('yes: 1\n', 'True'),
])
def test_unknown_key_in_file_names_key_and_file(tmp_path, text, key):
    path = write(tmp_path / 'bad.yaml', text)
    with pytest.raises(ConfigError) as err:
        get_config(path)
    assert key in str(err.value) and path in str(err.value)


def test_unknown_key_in_a_base_file_names_the_base_file(tmp_path):
    base = write(tmp_path / 'base' / 'common.yaml', 'DATA:\n  CROP: 1.0\n')
    child = write(tmp_path / 'child.yaml', "BASE: ['base/common.yaml']\n")
    with pytest.raises(ConfigError) as err:
        get_config(child)
    assert 'DATA.CROP' in str(err.value) and base in str(err.value)


@pytest.mark.parametrize('text, key', [
    ('MODEL:\n  DEPTH: twelve\n', 'MODEL.DEPTH'),
    ('MODEL:\n  DEPTH: 12.5\n', 'MODEL.DEPTH'),
    ('MODEL:\n  TOKENS_NORM: 1\n', 'MODEL.TOKENS_NORM'),
    ('MODEL:\n  ETA: true\n', 'MODEL.ETA'),
    ('MODEL:\n  ETA: small\n', 'MODEL.ETA'),
    ('TRAIN:\n  OPTIMIZER:\n    BETAS: 0.9\n', 'TRAIN.OPTIMIZER.BETAS'),
    ('DATA: 224\n', 'DATA'),
])
def test_wrong_type_in_file_names_key_and_file(tmp_path, text, key):
    path = write(tmp_path / 'bad.yaml', text)
    with pytest.raises(ConfigError) as err:
        get_config(path)
    assert key in str(err.value) and path in str(err.value)


def test_exponent_without_dot_is_accepted_for_a_float_key(tmp_path):
    # YAML 1.1 reads 1e-5 as a string; PaddleViT's configs write ETA that way
    config = get_config(write(tmp_path / 'eta.yaml', 'MODEL:\n  ETA: 1e-5\n'))
    assert config.MODEL.ETA == 1e-5


@pytest.mark.parametrize('text, message', [
    ('MODEL:\n  ETA: .nan\n', 'MODEL.ETA must be a finite number, got nan'),
    ('MODEL:\n  MLP_RATIO: .inf\n', 'MODEL.MLP_RATIO must be a finite number, got inf'),
    ('TRAIN:\n  BASE_LR: inf\n', "TRAIN.BASE_LR must be a finite number, got 'inf'"),
    ('DATA:\n  IMAGENET_MEAN: [.nan, 0.4, 0.4]\n', 'DATA.IMAGENET_MEAN must be 3 numbers (R, G, B)'),
])
def test_non_finite_number_is_refused(tmp_path, text, message):
    """NaN or infinity would reach the weights or the learning rate and fail far from its cause."""
    path = write(tmp_path / 'bad.yaml', text)
    with pytest.raises(ConfigError, match=re.escape(f'{path}: {message}')):
        get_config(path)
    with pytest.raises(ConfigError, match=re.escape("-opts: MODEL.ETA must be a finite number, got 'nan'")):
        update_config(get_config(), argparse.Namespace(cfg=None, opts=['MODEL.ETA', 'nan']))


def test_int_is_accepted_for_a_float_key(tmp_path):
    path = write(tmp_path / 'lr.yaml', 'TRAIN:\n  BASE_LR: 1\n  WEIGHT_DECAY: 0\n')
    config = get_config(path)
    assert config.TRAIN.BASE_LR == 1.0 and isinstance(config.TRAIN.BASE_LR, float)
    assert config.TRAIN.WEIGHT_DECAY == 0.0 and isinstance(config.TRAIN.WEIGHT_DECAY, float)


def test_base_files_are_merged_first_relative_to_the_including_file(tmp_path):
    write(tmp_path / 'base' / 'root.yaml', 'MODEL:\n  DEPTH: 3\n  EMBED_DIM: 64\nSEED: 5\n')
    write(tmp_path / 'base' / 'mid.yaml', "BASE: ['root.yaml']\nMODEL:\n  DEPTH: 4\n")
    write(tmp_path / 'other.yaml', 'TRAIN:\n  NUM_EPOCHS: 9\nSEED: 6\n')
    child = write(tmp_path / 'child.yaml',
                  "BASE: ['base/mid.yaml', 'other.yaml']\nMODEL:\n  NUM_HEADS: 2\n")
    config = get_config(child)
    assert (config.MODEL.DEPTH, config.MODEL.EMBED_DIM, config.MODEL.NUM_HEADS) == (4, 64, 2)
    assert (config.TRAIN.NUM_EPOCHS, config.SEED) == (9, 6)  # later bases override earlier ones
    assert config.TRAIN.WARMUP_EPOCHS == get_config().TRAIN.WARMUP_EPOCHS  # untouched default


@pytest.mark.parametrize('base', ["'common.yaml'", "[['common.yaml']]", '{common.yaml: 1}'])
def test_base_that_is_not_a_list_of_names_is_reported(tmp_path, base):
    """A single name without brackets used to be read letter by letter ('file not found: .../c')."""
    write(tmp_path / 'common.yaml', 'SEED: 1\n')
    child = write(tmp_path / 'child.yaml', f'BASE: {base}\n')
    with pytest.raises(ConfigError, match=re.escape(f"{child}: BASE must be a list of file names, e.g. ['base.yaml']")):
        get_config(child)


def test_base_cycle_is_reported(tmp_path):
    """A file that includes itself, directly or through others, used to end in RecursionError."""
    a = write(tmp_path / 'a.yaml', "BASE: ['base/b.yaml']\n")
    b = write(tmp_path / 'base' / 'b.yaml', "BASE: ['../a.yaml']\n")
    with pytest.raises(ConfigError, match=re.escape(f'{b}: BASE includes itself: {a} -> {b} -> ')):
        get_config(a)
    # a file included twice, but not by itself, is fine
    write(tmp_path / 'common.yaml', 'SEED: 4\n')
    write(tmp_path / 'c.yaml', "BASE: ['common.yaml']\n")
    assert get_config(write(tmp_path / 'd.yaml', "BASE: ['common.yaml', 'c.yaml']\n")).SEED == 4


def test_missing_base_file_is_reported(tmp_path):
    child = write(tmp_path / 'child.yaml', "BASE: ['nowhere.yaml']\n")
    with pytest.raises(ConfigError, match='nowhere.yaml'):
        get_config(child)


def test_a_folder_as_config_is_named_as_a_folder(tmp_path):
    with pytest.raises(ConfigError, match=re.escape(f'{tmp_path} is a folder, not a config file')):
        get_config(str(tmp_path))


def test_binary_file_as_config_is_named(tmp_path):
    path = tmp_path / 'weights.pdparams'
    path.write_bytes(b'\x80\x04\x95binary')
    with pytest.raises(ConfigError, match=re.escape(f'{path}: not a YAML config, which is UTF-8 text')):
        get_config(str(path))


@pytest.mark.parametrize('text, line, key', [
    ('TRAIN:\n  NUM_EPOCHS: 3\nDATA:\n  BATCH_SIZE: 8\nTRAIN:\n  BASE_LR: 0.01\n', 5, 'TRAIN'),
    ('TRAIN:\n  NUM_EPOCHS: 3\n  NUM_EPOCHS: 7\n', 3, 'NUM_EPOCHS'),
])
def test_a_key_given_twice_is_refused_naming_file_and_lines(tmp_path, text, line, key):
    path = write(tmp_path / 'twice.yaml', text)  # YAML alone would keep the last silently
    first = 2 if key == 'NUM_EPOCHS' else 1
    with pytest.raises(ConfigError, match=re.escape(f'{path}: line {line}: {key} is given a second time in the '
                                                    f'same mapping (first on line {first}), which would replace')):
        get_config(path)


@pytest.mark.parametrize('text', ['', '# only a comment\n'])
def test_a_file_that_sets_nothing_is_refused(tmp_path, text):
    path = write(tmp_path / 'empty.yaml', text)
    with pytest.raises(ConfigError, match=re.escape(f'{path}: the file sets nothing (empty, or comments only)')):
        get_config(path)


def test_opts_override_the_file():
    args = argparse.Namespace(cfg=config_path('xcit_tiny_12_p8_224'),
                              opts=['TRAIN.NUM_EPOCHS', '2', 'SEED', '3', 'MODEL.DROPPATH', '0'])
    config = update_config(get_config(), args)
    assert config.MODEL.NAME == 'xcit_tiny_12_p8_224' and config.MODEL.EMBED_DIM == 192
    assert (config.TRAIN.NUM_EPOCHS, config.SEED) == (2, 3)
    assert config.MODEL.DROPPATH == 0.0 and isinstance(config.MODEL.DROPPATH, float)
    assert config.is_frozen()


def test_text_keys_keep_the_command_line_text():
    """A folder or file named like a number or a boolean is a path, not a type error."""
    args = argparse.Namespace(cfg=None, output='2024', data_path='1e3',
                              opts=['MODEL.PRETRAINED', '123', 'MODEL.NAME', 'True', 'TRAIN.TEACHER_PRETRAINED', 'None'])
    config = update_config(get_config(), args)
    assert (config.SAVE, config.DATA.DATA_PATH, config.MODEL.PRETRAINED) == ('2024', '1e3', '123')
    assert (config.MODEL.NAME, config.TRAIN.TEACHER_PRETRAINED) == ('True', '')
    assert update_config(get_config(), argparse.Namespace(cfg=None, opts=['SEED', '7'])).SEED == 7


@pytest.mark.parametrize('key', ['TRAIN.NUM_EPOCH', 'SEEDS', 'TRIAN.NUM_EPOCHS', 'SEED.X'])
def test_unknown_opts_key_is_named(key):
    args = argparse.Namespace(cfg=None, opts=[key, '2'])
    with pytest.raises(ConfigError, match=re.escape(key)):
        update_config(get_config(), args)


def test_wrong_type_in_opts_is_named():
    args = argparse.Namespace(cfg=None, opts=['TRAIN.NUM_EPOCHS', 'many'])
    with pytest.raises(ConfigError, match='TRAIN.NUM_EPOCHS'):
        update_config(get_config(), args)


@pytest.mark.parametrize('text, message', [
    ('MODEL:\n  DEPTH: 0\n', 'MODEL.DEPTH must be > 0, got 0'),
    ('MODEL:\n  NUM_CLASSES: -1\n', 'MODEL.NUM_CLASSES must be >= 0, got -1'),
    ('MODEL:\n  PATCH_SIZE: 14\n', 'MODEL.PATCH_SIZE must be 8 or 16, got 14'),
    ('MODEL:\n  NUM_HEADS: 5\n', 'MODEL.EMBED_DIM (128) must be a multiple of MODEL.NUM_HEADS (5)'),
    ('MODEL:\n  EMBED_DIM: 36\n  NUM_HEADS: 3\n',
     'MODEL.EMBED_DIM (36) must be a multiple of 8 with MODEL.PATCH_SIZE 16'),
    ('MODEL:\n  DROPPATH: 1.0\n', 'MODEL.DROPPATH must be in [0, 1), got 1.0'),
    ('DATA:\n  IMAGE_SIZE: -3\n', 'DATA.IMAGE_SIZE must be > 0, got -3'),
    ('TRAIN:\n  MIXUP_PROB: 1.5\n', 'TRAIN.MIXUP_PROB must be in [0, 1], got 1.5'),
    ('TRAIN:\n  DISTILLATION_TYPE: hardest\n', "TRAIN.DISTILLATION_TYPE must be 'none', 'soft' or 'hard'"),
    ('TRAIN:\n  OPTIMIZER:\n    NAME: LAMB\n', "TRAIN.OPTIMIZER.NAME must be 'AdamW' or 'SGD', got 'LAMB'"),
    ('TRAIN:\n  OPTIMIZER:\n    BETAS: [0.9]\n', 'TRAIN.OPTIMIZER.BETAS must be 2 numbers in [0, 1) (beta1, beta2)'),
    ('TRAIN:\n  OPTIMIZER:\n    BETAS: [0.9, 1.0]\n', 'TRAIN.OPTIMIZER.BETAS must be 2 numbers in [0, 1)'),
    ('TRAIN:\n  OPTIMIZER:\n    EPS: -1.0e-8\n', 'TRAIN.OPTIMIZER.EPS must be >= 0, got -1e-08'),
    ('TRAIN:\n  RAND_AUGMENT: False\n  COLOR_JITTER: -0.4\n', 'TRAIN.COLOR_JITTER must be >= 0, got -0.4'),
    ('DATA:\n  IMAGENET_MEAN: [0.5, 0.5]\n', 'DATA.IMAGENET_MEAN must be 3 numbers (R, G, B), got [0.5, 0.5]'),
    ('DATA:\n  IMAGENET_STD: [0.2, 0.0, 0.2]\n', 'DATA.IMAGENET_STD must be 3 numbers > 0 (R, G, B)'),
    ('TRAIN:\n  RANDOM_RESIZED_CROP_SCALE: [1.0, 0.5]\n',
     'TRAIN.RANDOM_RESIZED_CROP_SCALE must be [min, max] with 0 < min <= max'),
    ('TRAIN:\n  CUTMIX_MINMAX: [0.2]\n', 'TRAIN.CUTMIX_MINMAX must be [] or [min, max] with 0 < min <= max <= 1'),
    ('TRAIN:\n  MIXUP_MODE: garbage\n', "TRAIN.MIXUP_MODE must be 'batch' or 'pair' or 'elem', got 'garbage'"),
    ('SEED: -1\n', 'SEED must be in [0, 2**31), got -1'),  # Paddle and numpy refuse it when training starts
    ('SEED: 4294967296\n', 'SEED must be in [0, 2**31), got 4294967296'),
    ('DATA:\n  INTERPOLATION: cubic\n',
     "DATA.INTERPOLATION must be 'nearest' or 'bilinear' or 'bicubic' or 'lanczos', got 'cubic'"),
    ('TRAIN:\n  TRAIN_INTERPOLATION: area\n', "TRAIN.TRAIN_INTERPOLATION must be 'nearest' or 'bilinear'"),
    ('DATA:\n  CROP_PCT: 0.0\n', 'DATA.CROP_PCT must be > 0, got 0.0'),
    ('TRAIN:\n  RAND_AUGMENT_CONFIG: rand-m9-tweights\n',
     "TRAIN.RAND_AUGMENT_CONFIG must be timm's RandAugment string: 'rand', then sections m, n, p, mstd, mmax, "
     "inc each followed by a number, e.g. 'rand-m9-mstd0.5-inc1', got 'rand-m9-tweights'"),
    ('TRAIN:\n  MIXUP_PROB: 0.0\n  RANDOM_ERASE_MODE: noise\n',
     "TRAIN.RANDOM_ERASE_MODE must be 'pixel' or 'rand' or 'const', got 'noise'"),
    ('DATA:\n  CLASS_NAMES: [cat, dog]\nMODEL:\n  NUM_CLASSES: 3\n',
     'DATA.CLASS_NAMES has 2 names but MODEL.NUM_CLASSES is 3: give one per class, or none'),
    ('DATA:\n  CLASS_NAMES: [cat, 3]\n', "DATA.CLASS_NAMES must be a list of class names (text, quoted if YAML"),
    ('DATA:\n  DATASET: imagenet\n',
     "DATA.DATASET must be 'imagenet2012' or 'imagefolder' or 'digits' or 'cifar10' or 'cifar100', got 'imagenet'"),
])
def test_value_out_of_range_in_file_names_key_and_file(tmp_path, text, message):
    path = write(tmp_path / 'bad.yaml', text)
    with pytest.raises(ConfigError, match=re.escape(f'{path}: {message}')):
        get_config(path)
    with pytest.raises(ConfigError, match=re.escape(f'{path}: {message}')):  # as -cfg of the scripts
        update_config(get_config(), argparse.Namespace(cfg=path, opts=None))


def test_value_out_of_range_in_a_base_file_names_the_base_file(tmp_path):
    base = write(tmp_path / 'base' / 'common.yaml', 'TRAIN:\n  SMOOTHING: 1.0\n')
    child = write(tmp_path / 'child.yaml', "BASE: ['base/common.yaml']\nSEED: 3\n")
    with pytest.raises(ConfigError, match=re.escape(f'{base}: TRAIN.SMOOTHING must be in [0, 1), got 1.0')):
        get_config(child)


def test_base_is_for_files_only():
    args = argparse.Namespace(cfg=None, opts=['BASE', "['configs/xcit_small_12_p16_224.yaml']"])
    with pytest.raises(ConfigError, match='-opts: BASE is read from config files only'):
        update_config(get_config(), args)


def test_value_out_of_range_from_the_command_line_is_blamed_on_it():
    args = argparse.Namespace(cfg=os.path.join(ROOT, 'configs', 'xcit_nano_12_p16_224.yaml'), image_size=0,
                              opts=['TRAIN.SMOOTHING', '0.1'])
    with pytest.raises(ConfigError, match=re.escape('command line: DATA.IMAGE_SIZE must be > 0, got 0')):
        update_config(get_config(), args)
    # a later override may fix what an earlier one set: only the final values are checked
    args = argparse.Namespace(cfg=None, opts=['MODEL.NUM_HEADS', '3', 'MODEL.EMBED_DIM', '192'])
    assert update_config(get_config(), args).MODEL.NUM_HEADS == 3


def test_settings_without_effect_are_named():
    """A teacher without distillation, colour jitter under RandAugment, an EMA decay without EMA:
    each named with what turns it off; defaults and the shipped configs name nothing."""
    config = get_config()
    config.defrost()
    merge_from_list(config, ['TRAIN.TEACHER_PRETRAINED', 'teacher.pdparams', 'TRAIN.COLOR_JITTER', '0.9',
                             'TRAIN.MODEL_EMA', 'False', 'TRAIN.MODEL_EMA_DECAY', '0.5'])
    assert settings_without_effect(config) == [
        "TRAIN.TEACHER_PRETRAINED is 'teacher.pdparams', which has no effect: TRAIN.DISTILLATION_TYPE is 'none'",
        'TRAIN.COLOR_JITTER is 0.9, which has no effect: TRAIN.RAND_AUGMENT is on',
        'TRAIN.MODEL_EMA_DECAY is 0.5, which has no effect: TRAIN.MODEL_EMA is off']
    assert settings_without_effect(get_config()) == []
    for path in glob.glob(os.path.join(ROOT, 'configs', '**', '*.yaml'), recursive=True):
        assert settings_without_effect(get_config(path)) == [], path


@pytest.mark.parametrize('opts, named', [
    (['TRAIN.MIXUP_ALPHA', '0', 'TRAIN.CUTMIX_ALPHA', '0', 'TRAIN.MIXUP_SWITCH_PROB', '0.3', 'TRAIN.MIXUP_MODE', 'pair'],
     ["TRAIN.MIXUP_SWITCH_PROB is 0.3, which has no effect: TRAIN.MIXUP_ALPHA and TRAIN.CUTMIX_ALPHA are 0 "
      "and TRAIN.CUTMIX_MINMAX is empty",
      "TRAIN.MIXUP_MODE is 'pair', which has no effect: TRAIN.MIXUP_ALPHA and TRAIN.CUTMIX_ALPHA are 0 "
      "and TRAIN.CUTMIX_MINMAX is empty"]),
    (['TRAIN.MIXUP_ALPHA', '0', 'TRAIN.MIXUP_SWITCH_PROB', '0.3'],
     ['TRAIN.MIXUP_SWITCH_PROB is 0.3, which has no effect: only one of Mixup (TRAIN.MIXUP_ALPHA) and CutMix '
      '(TRAIN.CUTMIX_ALPHA or TRAIN.CUTMIX_MINMAX) is on']),
    (['TRAIN.MIXUP_PROB', '0.0', 'TRAIN.CUTMIX_MINMAX', '[0.3, 0.8]', 'TRAIN.CUTMIX_ALPHA', '2.0'],
     ['TRAIN.CUTMIX_ALPHA is 2.0, which has no effect: TRAIN.MIXUP_PROB is 0',  # once, for the first reason
      'TRAIN.CUTMIX_MINMAX is [0.3, 0.8], which has no effect: TRAIN.MIXUP_PROB is 0']),
])
def test_mixup_settings_that_nothing_reads_are_named(opts, named):
    """Without Mixup and CutMix their probability and mode are not read; the switch probability is read
    only when both are on (as in timm's Mixup)."""
    config = get_config()
    config.defrost()
    merge_from_list(config, opts)
    assert settings_without_effect(config) == named


def test_command_line_flags_apply_after_the_file_and_opts_after_the_flags(tmp_path):
    """-batch_size etc. override the -cfg file, -opts override both; a flag left out (None, or
    False for -eval / -amp / -ema) keeps the file's value."""
    cfg = write(tmp_path / 'run.yaml', 'DATA:\n  BATCH_SIZE: 8\n  IMAGE_SIZE: 64\nEVAL: true\nAMP: true\n')
    args = argparse.Namespace(cfg=cfg, batch_size=16, image_size=None, eval=False, amp=False, ema=False,
                              opts=['DATA.BATCH_SIZE', '32'])
    config = update_config(get_config(), args)
    assert (config.DATA.BATCH_SIZE, config.DATA.IMAGE_SIZE, config.EVAL, config.AMP) == (32, 64, True, True)
    args = argparse.Namespace(cfg=cfg, batch_size=16, image_size=96, opts=[])
    config = update_config(get_config(), args)
    assert (config.DATA.BATCH_SIZE, config.DATA.IMAGE_SIZE) == (16, 96)


@pytest.mark.parametrize('text, value', [('true', True), ('false', False), ('True', True), ('FALSE', False)])
def test_opts_booleans_in_any_case(text, value):
    config = update_config(get_config(), argparse.Namespace(cfg=None, opts=['TRAIN.RAND_AUGMENT', text]))
    assert config.TRAIN.RAND_AUGMENT is value
