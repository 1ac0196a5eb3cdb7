"""Image transforms on PIL images: the official evaluation pipeline and the DeiT/XCiT training recipe.

Evaluation (``build_eval_transform``) reproduces torchvision's ``Resize(int(S / CROP_PCT))``,
``CenterCrop(S)``, ``ToTensor()`` and ``Normalize(mean, std)`` pixel for pixel, as torchvision
0.8.2 computes them (the version of the official evaluation).

Training (``build_train_transform``) follows timm's ``create_transform`` as DeiT and XCiT call it:
``RandomResizedCrop`` + horizontal flip, then RandAugment (e.g. ``rand-m9-mstd0.5-inc1``) or,
without RandAugment, ``ColorJitter``, then to-array + normalise, then ``RandomErasing`` on the
normalised array. (For inputs of 32 pixels or less, XCiT's and DeiT's ``build_transform`` swap the
crop for ``RandomCrop(S, padding=4)``, as for CIFAR; here the crop stays ``RandomResizedCrop``,
whose scale range ``TRAIN.RANDOM_RESIZED_CROP_SCALE`` sets, e.g. for the bundled digits.) Every
random draw comes from the ``np.random.Generator`` passed with the image, so an image's
augmentation is a pure function of that generator's seed.

Outputs are float32 arrays (3, S, S): RGB, scaled to [0, 1], normalised by the dataset mean/std.
"""
import math

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from config import ERASE_MODES, INTERPOLATIONS as INTERPOLATION_NAMES, ConfigError, rand_augment_options

# DATA.INTERPOLATION and TRAIN.TRAIN_INTERPOLATION (checked by the config) -> PIL's filter
INTERPOLATIONS = {name: Image.Resampling[name.upper()] for name in INTERPOLATION_NAMES}


WIDE_GRAY_MODES = ('I', 'I;16', 'I;16B', 'I;16L', 'I;16N')  # 16-bit grayscale (32-bit 'I' read as 16-bit)


def to_rgb(img):
    """``img`` in RGB mode (a no-op when it already is).

    16-bit grayscale (e.g. a 16-bit PNG) is scaled to 8 bits first (value / 257, rounded, so
    that 65535 is white), where PIL's own conversion would clip every value above 255 to white;
    a floating-point image, whose range is unknown, raises ``ValueError``.
    """
    if img.mode == 'RGB':
        return img
    if img.mode in WIDE_GRAY_MODES:
        values = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.rint(np.clip(values, 0, 65535) / 257).astype(np.uint8), 'L')
    elif img.mode == 'F':
        raise ValueError('a floating-point image (PIL mode F) has no defined 8-bit range; save it as 8 or 16 bits')
    return img.convert('RGB')


class Normalize:
    """PIL RGB image (W x H) -> float32 array (3, H, W): ``(pixel / 255 - mean) / std``.

    The arithmetic is torchvision's ``ToTensor`` + ``Normalize``, in float32 and in that order.
    """

    def __init__(self, mean, std):
        self.mean = np.asarray(mean, dtype=np.float32).reshape(3, 1, 1)
        self.std = np.asarray(std, dtype=np.float32).reshape(3, 1, 1)

    def __call__(self, img):
        x = np.asarray(to_rgb(img)).transpose(2, 0, 1).astype(np.float32, order='C')
        x /= np.float32(255)
        x -= self.mean
        x /= self.std
        return x


# ---------------------------------------------------------------- evaluation

def resize_shorter_side(img, size, resample):
    """torchvision ``Resize(size)``: shorter side -> ``size``, longer -> int(size * long / short)."""
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    new_size = (new_short, new_long) if w <= h else (new_long, new_short)
    if new_size == img.size:
        return img
    return img.resize(new_size, resample)


def center_crop(img, size):
    """torchvision 0.8.2's ``CenterCrop(size)``, the version the official evaluation pins: the box
    starts at top = int((h - size + 1) / 2), likewise left, so an odd margin puts its extra pixel
    above (left of) the crop (torchvision 0.9 and later round half to even: one pixel less where
    the margin is 1 modulo 4). Where the image is smaller than ``size`` the box reaches outside it
    and PIL fills that part with zeros."""
    w, h = img.size
    top = int((h - size + 1) * 0.5)
    left = int((w - size + 1) * 0.5)
    return img.crop((left, top, left + size, top + size))


class EvalTransform:
    """PIL image -> float32 (3, size, size): RGB, resize the shorter side to int(size / crop_pct),
    centre-crop ``size``, normalise."""

    def __init__(self, size, crop_pct, resample, normalize):
        self.size = size
        self.resize_to = int(size / crop_pct)
        self.resample = resample
        self.normalize = normalize

    def __call__(self, img):
        img = resize_shorter_side(to_rgb(img), self.resize_to, self.resample)
        return self.normalize(center_crop(img, self.size))


def _normalize_from_config(config):
    return Normalize(config.DATA.IMAGENET_MEAN, config.DATA.IMAGENET_STD)


def build_eval_transform(config):
    """The evaluation transform: callable(PIL.Image) -> float32 (3, DATA.IMAGE_SIZE, DATA.IMAGE_SIZE)."""
    return EvalTransform(config.DATA.IMAGE_SIZE, config.DATA.CROP_PCT, INTERPOLATIONS[config.DATA.INTERPOLATION],
                         _normalize_from_config(config))


# ---------------------------------------------------------------- random resized crop

def random_resized_crop_box(width, height, scale, ratio, rng):
    """timm/torchvision ``RandomResizedCrop`` parameters: (left, top, w, h) of the crop.

    Up to 10 tries of area fraction ~ U(scale) and log aspect (w/h) ~ U(log ratio); if none fits,
    the centred largest crop with aspect clamped to ``ratio``.
    """
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = rng.uniform(*scale) * area
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if w <= width and h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return left, top, w, h
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


# ---------------------------------------------------------------- RandAugment (timm)

LEVEL_DENOM = 10.0  # magnitude M maps to the op's strength as M / 10 of its range


def _random_sign(value, rng):
    return -value if rng.random() > 0.5 else value


def _affine(img, matrix, fill, resample):
    return img.transform(img.size, Image.Transform.AFFINE, matrix, resample=resample, fillcolor=fill)


def _auto_contrast(img, _arg, _fill, _resample):
    return ImageOps.autocontrast(img)


def _equalize(img, _arg, _fill, _resample):
    return ImageOps.equalize(img)


def _invert(img, _arg, _fill, _resample):
    return ImageOps.invert(img)


def _rotate(img, degrees, fill, resample):
    return img.rotate(degrees, resample=resample, fillcolor=fill)


def _posterize(img, bits, _fill, _resample):
    """Keeps the ``bits`` (0..8) most significant bits; 0 gives black (PIL's own posterize rejects 0)."""
    mask = ~(2 ** (8 - bits) - 1) & 0xFF
    return img.point([i & mask for i in range(256)] * len(img.getbands()))


def _solarize(img, threshold, _fill, _resample):
    return ImageOps.solarize(img, threshold)


def _solarize_add(img, add, _fill, _resample, threshold=128):
    lut = [min(255, i + add) if i < threshold else i for i in range(256)]
    return img.point(lut * len(img.getbands()))


def _color(img, factor, _fill, _resample):
    return ImageEnhance.Color(img).enhance(factor)


def _contrast(img, factor, _fill, _resample):
    return ImageEnhance.Contrast(img).enhance(factor)


def _brightness(img, factor, _fill, _resample):
    return ImageEnhance.Brightness(img).enhance(factor)


def _sharpness(img, factor, _fill, _resample):
    return ImageEnhance.Sharpness(img).enhance(factor)


def _shear_x(img, factor, fill, resample):
    return _affine(img, (1, factor, 0, 0, 1, 0), fill, resample)


def _shear_y(img, factor, fill, resample):
    return _affine(img, (1, 0, 0, factor, 1, 0), fill, resample)


def _translate_x_rel(img, fraction, fill, resample):
    return _affine(img, (1, 0, fraction * img.size[0], 0, 1, 0), fill, resample)


def _translate_y_rel(img, fraction, fill, resample):
    return _affine(img, (1, 0, 0, 0, 1, fraction * img.size[1]), fill, resample)


# level (0..10) -> op argument; signed arguments get a random sign
def _rotate_arg(level, rng):
    return _random_sign(level / LEVEL_DENOM * 30.0, rng)  # degrees in [-30, 30]


def _enhance_arg(level, _rng):
    return level / LEVEL_DENOM * 1.8 + 0.1  # [0.1, 1.9], 1 = unchanged


def _enhance_increasing_arg(level, rng):
    return max(0.1, 1.0 + _random_sign(level / LEVEL_DENOM * 0.9, rng))  # away from 1 as level grows


def _shear_arg(level, rng):
    return _random_sign(level / LEVEL_DENOM * 0.3, rng)


def _translate_rel_arg(level, rng):
    return _random_sign(level / LEVEL_DENOM * 0.45, rng)  # fraction of the image side


def _posterize_arg(level, _rng):
    return int(level / LEVEL_DENOM * 4)  # bits kept, 0..4


def _posterize_increasing_arg(level, rng):
    return 4 - _posterize_arg(level, rng)  # bits kept, 4..0


def _solarize_arg(level, _rng):
    return min(256, int(level / LEVEL_DENOM * 256))  # threshold


def _solarize_increasing_arg(level, rng):
    return 256 - _solarize_arg(level, rng)


def _solarize_add_arg(level, _rng):
    return min(128, int(level / LEVEL_DENOM * 110))


# name -> (apply(img, arg, fill, resample), level_to_arg(level, rng) or None)
AUGMENT_OPS = {
    'AutoContrast': (_auto_contrast, None),
    'Equalize': (_equalize, None),
    'Invert': (_invert, None),
    'Rotate': (_rotate, _rotate_arg),
    'Posterize': (_posterize, _posterize_arg),
    'PosterizeIncreasing': (_posterize, _posterize_increasing_arg),
    'Solarize': (_solarize, _solarize_arg),
    'SolarizeIncreasing': (_solarize, _solarize_increasing_arg),
    'SolarizeAdd': (_solarize_add, _solarize_add_arg),
    'Color': (_color, _enhance_arg),
    'ColorIncreasing': (_color, _enhance_increasing_arg),
    'Contrast': (_contrast, _enhance_arg),
    'ContrastIncreasing': (_contrast, _enhance_increasing_arg),
    'Brightness': (_brightness, _enhance_arg),
    'BrightnessIncreasing': (_brightness, _enhance_increasing_arg),
    'Sharpness': (_sharpness, _enhance_arg),
    'SharpnessIncreasing': (_sharpness, _enhance_increasing_arg),
    'ShearX': (_shear_x, _shear_arg),
    'ShearY': (_shear_y, _shear_arg),
    'TranslateXRel': (_translate_x_rel, _translate_rel_arg),
    'TranslateYRel': (_translate_y_rel, _translate_rel_arg),
}

# timm's RandAugment op sets: 'inc0' (default) and 'inc1' (severity increases with magnitude)
RAND_TRANSFORMS = [
    'AutoContrast', 'Equalize', 'Invert', 'Rotate', 'Posterize', 'Solarize', 'SolarizeAdd',
    'Color', 'Contrast', 'Brightness', 'Sharpness', 'ShearX', 'ShearY', 'TranslateXRel', 'TranslateYRel',
]
RAND_INCREASING_TRANSFORMS = [
    'AutoContrast', 'Equalize', 'Invert', 'Rotate', 'PosterizeIncreasing', 'SolarizeIncreasing',
    'SolarizeAdd', 'ColorIncreasing', 'ContrastIncreasing', 'BrightnessIncreasing',
    'SharpnessIncreasing', 'ShearX', 'ShearY', 'TranslateXRel', 'TranslateYRel',
]


def augment_op(img, name, level, rng, fill=(128, 128, 128), resample=Image.Resampling.BICUBIC):
    """Applies RandAugment op ``name`` at ``level`` (0..10) to an RGB image; geometric ops fill
    uncovered pixels with ``fill`` and resample with ``resample``."""
    apply, level_to_arg = AUGMENT_OPS[name]
    arg = level_to_arg(level, rng) if level_to_arg is not None else None
    return apply(img, arg, fill, resample)


class RandAugment:
    """timm's RandAugment: ``num_layers`` ops drawn uniformly (with replacement) from ``op_names``;
    each is applied with probability ``prob`` at a magnitude ~ N(magnitude, magnitude_std)
    (U(0, magnitude) when magnitude_std is inf) clipped to [0, magnitude_max]."""

    def __init__(self, op_names, num_layers=2, magnitude=10, magnitude_std=0.0, magnitude_max=None,
                 prob=0.5, fill=(128, 128, 128), resample=Image.Resampling.BICUBIC):
        self.op_names = list(op_names)
        self.num_layers = num_layers
        self.magnitude = magnitude
        self.magnitude_std = magnitude_std
        self.magnitude_max = magnitude_max or LEVEL_DENOM
        self.prob = prob
        self.fill = tuple(fill)
        self.resample = resample

    def _sample_magnitude(self, rng):
        magnitude = self.magnitude
        if self.magnitude_std == math.inf:
            magnitude = rng.uniform(0, magnitude)
        elif self.magnitude_std > 0:
            magnitude = rng.normal(magnitude, self.magnitude_std)
        return max(0.0, min(magnitude, self.magnitude_max))

    def __call__(self, img, rng):
        for op in rng.integers(0, len(self.op_names), size=self.num_layers):
            if self.prob < 1.0 and rng.random() > self.prob:
                continue
            img = augment_op(img, self.op_names[op], self._sample_magnitude(rng), rng,
                             self.fill, self.resample)
        return img


def parse_rand_augment(config_str, fill, resample):
    """A ``RandAugment`` from timm's config string, e.g. 'rand-m9-mstd0.5-inc1' (its sections:
    ``config.rand_augment_options``); raises ValueError for a string that is not one."""
    options = rand_augment_options(config_str)
    ops = RAND_INCREASING_TRANSFORMS if options.pop('increasing', False) else RAND_TRANSFORMS
    return RandAugment(ops, fill=fill, resample=resample, **options)


# ---------------------------------------------------------------- colour jitter, random erasing

def color_jitter(img, strength, rng):
    """torchvision ``ColorJitter(strength, strength, strength)``: brightness, contrast and saturation
    factors ~ U(max(0, 1 - strength), 1 + strength), applied in a random order."""
    enhancers = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)
    for i in rng.permutation(len(enhancers)):
        img = enhancers[i](img).enhance(rng.uniform(max(0.0, 1.0 - strength), 1.0 + strength))
    return img


class RandomErasing:
    """timm's ``RandomErasing`` on a normalised (C, H, W) float32 array, in place.

    With probability ``prob``, erases randint(1, max_count) boxes; each box has area fraction
    ~ U(0.02, 1/3) / count and log aspect ~ U(log 0.3, log 1/0.3) (10 tries to fit, else skipped),
    filled per ``mode``: 'pixel' N(0, 1) per value, 'rand' N(0, 1) per channel, 'const' zeros.
    """
    MODES = ERASE_MODES

    def __init__(self, prob, mode='pixel', max_count=1, min_area=0.02, max_area=1 / 3, min_aspect=0.3):
        if mode not in self.MODES:
            raise ConfigError(f'TRAIN.RANDOM_ERASE_MODE must be one of {self.MODES}, got {mode!r}')
        self.prob = prob
        self.mode = mode
        self.max_count = max(1, max_count)
        self.area_range = (min_area, max_area)
        self.log_aspect_range = (math.log(min_aspect), math.log(1 / min_aspect))

    def _fill(self, channels, h, w, rng):
        if self.mode == 'pixel':
            return rng.standard_normal((channels, h, w), dtype=np.float32)
        if self.mode == 'rand':
            return rng.standard_normal((channels, 1, 1), dtype=np.float32)
        return np.float32(0)

    def __call__(self, x, rng):
        if rng.random() > self.prob:
            return x
        channels, height, width = x.shape
        count = 1 if self.max_count == 1 else int(rng.integers(1, self.max_count + 1))
        for _ in range(count):
            for _attempt in range(10):
                area = rng.uniform(*self.area_range) * height * width / count
                aspect = math.exp(rng.uniform(*self.log_aspect_range))
                h = int(round(math.sqrt(area * aspect)))
                w = int(round(math.sqrt(area / aspect)))
                if w < width and h < height:
                    top = int(rng.integers(0, height - h + 1))
                    left = int(rng.integers(0, width - w + 1))
                    x[:, top:top + h, left:left + w] = self._fill(channels, h, w, rng)
                    break
        return x


# ---------------------------------------------------------------- training

class TrainTransform:
    """(PIL image, rng) -> float32 (3, size, size): RGB, random resized crop, horizontal flip,
    RandAugment or colour jitter, normalise, random erasing."""

    def __init__(self, size, scale, ratio, resample, hflip, rand_augment, jitter, normalize, erasing):
        self.size = size
        self.scale = tuple(scale)
        self.ratio = tuple(ratio)
        self.resample = resample
        self.hflip = hflip
        self.rand_augment = rand_augment
        self.jitter = jitter
        self.normalize = normalize
        self.erasing = erasing

    def __call__(self, img, rng):
        img = to_rgb(img)
        left, top, w, h = random_resized_crop_box(*img.size, self.scale, self.ratio, rng)
        img = img.crop((left, top, left + w, top + h)).resize((self.size, self.size), self.resample)
        if self.hflip > 0 and rng.random() < self.hflip:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if self.rand_augment is not None:
            img = self.rand_augment(img, rng)
        elif self.jitter > 0:
            img = color_jitter(img, self.jitter, rng)
        x = self.normalize(img)
        if self.erasing is not None:
            self.erasing(x, rng)
        return x


def build_train_transform(config):
    """The training transform: callable(PIL.Image, np.random.Generator) -> float32 (3, S, S)."""
    train = config.TRAIN
    resample = INTERPOLATIONS[train.TRAIN_INTERPOLATION]
    scale = list(train.RANDOM_RESIZED_CROP_SCALE)
    rand_augment = None
    if train.RAND_AUGMENT:
        # geometric ops fill with the dataset mean colour, as timm's img_mean hparam
        fill = tuple(min(255, round(255 * m)) for m in config.DATA.IMAGENET_MEAN)
        rand_augment = parse_rand_augment(train.RAND_AUGMENT_CONFIG, fill, resample)
    erasing = None
    if train.RANDOM_ERASE_PROB > 0:
        erasing = RandomErasing(train.RANDOM_ERASE_PROB, train.RANDOM_ERASE_MODE, train.RANDOM_ERASE_COUNT)
    return TrainTransform(config.DATA.IMAGE_SIZE, scale, (3 / 4, 4 / 3), resample, train.HFLIP,
                          rand_augment, train.COLOR_JITTER, _normalize_from_config(config), erasing)
