"""Transforms: the evaluation pipeline against direct PIL + numpy computations, the training recipe's
pieces (RandAugment ops, random erasing, composition) and their determinism."""
import io

import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageOps

from config import ConfigError, get_config, merge_from_list
from transforms import (INTERPOLATIONS, RAND_INCREASING_TRANSFORMS, RAND_TRANSFORMS, RandAugment, RandomErasing,
                        augment_op, build_eval_transform, build_train_transform, color_jitter, parse_rand_augment,
                        random_resized_crop_box, to_rgb)

MEAN = np.array([0.485, 0.456, 0.406], np.float32).reshape(3, 1, 1)
STD = np.array([0.229, 0.224, 0.225], np.float32).reshape(3, 1, 1)
FILL = (124, 116, 104)


def make_config(**opts):
    config = get_config()
    config.defrost()
    merge_from_list(config, [item for pair in opts.items() for item in pair])
    return config


def photo(width, height, seed=0, jpeg=True):
    """A smooth, noisy, non-symmetric RGB test image, optionally round-tripped through JPEG."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    pixels = np.stack([120 + 90 * np.sin(xx / 9.0 + yy / 23.0), 100 + 80 * np.cos(yy / 7.0),
                       40 + (xx * 3 + yy) % 160], -1) + rng.normal(0, 12, (height, width, 3))
    img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    if jpeg:
        buffer = io.BytesIO()
        img.save(buffer, format='JPEG', quality=90)
        img = Image.open(io.BytesIO(buffer.getvalue()))
    return img


def normalised(pixels):
    """uint8 (H, W, 3) -> (3, H, W) float32 normalised with the ImageNet mean/std."""
    return (pixels.transpose(2, 0, 1).astype(np.float32) / np.float32(255) - MEAN) / STD


# (image w, h), size, crop_pct, resized (w, h) as torchvision computes it, crop box (left, top)
EVAL_CASES = [
    ((500, 375), 224, 0.875, (341, 256), (59, 16)),  # landscape; torchvision 0.8.2: int(118 / 2) (0.9+: 58)
    ((375, 500), 224, 1.0, (224, 298), (0, 37)),  # portrait
    ((224, 224), 224, 1.0, None, (0, 0)),  # already the right size: no resampling
    ((8, 8), 32, 1.0, (32, 32), (0, 0)),  # smaller than the crop: upsampled
    ((20, 50), 32, 0.875, (36, 90), (2, 29)),  # small and non-square
    ((257, 640), 96, 0.9, (106, 263), (5, 84)),  # long side truncated: int(106 * 640 / 257) = 263
]


@pytest.mark.parametrize('image_size,size,crop_pct,resized,corner', EVAL_CASES)
@pytest.mark.parametrize('interpolation', ['bicubic', 'bilinear'])
def test_eval_transform_matches_direct_pil_computation(image_size, size, crop_pct, resized, corner,
                                                       interpolation):
    img = photo(*image_size)
    config = make_config(**{'DATA.IMAGE_SIZE': size, 'DATA.CROP_PCT': crop_pct,
                            'DATA.INTERPOLATION': interpolation})
    out = build_eval_transform(config)(img)
    expected = img.convert('RGB')
    if resized is not None:
        expected = expected.resize(resized, INTERPOLATIONS[interpolation])
    left, top = corner
    expected = normalised(np.asarray(expected.crop((left, top, left + size, top + size))))
    assert out.dtype == np.float32 and out.shape == (3, size, size) and out.flags.c_contiguous
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize('dtype,name', [(np.uint16, 'gray.png'), (np.int32, 'gray.tif')])  # PIL modes I;16, I
def test_16_bit_grayscale_is_scaled_to_8_bits(tmp_path, dtype, name):
    values = np.array([[0, 257, 300, 1000], [32768, 65280, 65535, 20000]], dtype)
    path = tmp_path / name
    Image.fromarray(values).save(path)
    for img in (Image.open(path), Image.fromarray(values)):
        rgb = np.asarray(to_rgb(img))
        expected = np.array([[0, 1, 1, 4], [128, 254, 255, 78]], np.uint8)  # round(value / 257)
        assert rgb.shape == (2, 4, 3)
        np.testing.assert_array_equal(rgb, np.repeat(expected[:, :, None], 3, axis=2))


def test_floating_point_images_are_refused():
    with pytest.raises(ValueError, match='floating-point image'):
        to_rgb(Image.fromarray(np.ones((4, 4), np.float32)))


@pytest.mark.parametrize('interpolation', sorted(INTERPOLATIONS))
def test_eval_transform_uses_the_configured_filter_and_converts_to_rgb(interpolation):
    img = photo(90, 70, jpeg=False).convert('L')
    config = make_config(**{'DATA.IMAGE_SIZE': 48, 'DATA.INTERPOLATION': interpolation})
    out = build_eval_transform(config)(img)
    rgb = img.convert('RGB').resize((61, 48), INTERPOLATIONS[interpolation])  # int(48 * 90 / 70) = 61
    np.testing.assert_array_equal(out, normalised(np.asarray(rgb.crop((7, 0, 55, 48)))))  # int((13 + 1) / 2)


def test_eval_transform_pads_with_zeros_when_resized_image_is_smaller_than_crop():
    # CROP_PCT > 1: shorter side int(64 / 1.2) = 53 < 64, so the crop box reaches outside the image:
    # 5 rows above and 6 below, then crops columns int((88 - 64 + 1) / 2) = 12..76
    img = photo(100, 60)
    out = build_eval_transform(make_config(**{'DATA.IMAGE_SIZE': 64, 'DATA.CROP_PCT': 1.2}))(img)
    canvas = np.zeros((64, 88, 3), np.uint8)
    canvas[5:58] = np.asarray(img.resize((88, 53), Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(out, normalised(canvas[:, 12:76]))
    np.testing.assert_allclose(out[:, 0, 0], (-MEAN / STD).ravel(), rtol=1e-6)


def low_contrast_image():
    """Pixel values in 40..250 (AutoContrast and Solarize at level 9 have work), non-symmetric content."""
    pixels = np.asarray(photo(40, 30, jpeg=False)).astype(np.float32)
    return Image.fromarray((40 + pixels * (210 / 255)).astype(np.uint8))


@pytest.mark.parametrize('name', sorted(set(RAND_INCREASING_TRANSFORMS) | set(RAND_TRANSFORMS)))
def test_every_rand_augment_op_changes_the_image_deterministically(name):
    img = low_contrast_image()
    level = 9.0
    out = augment_op(img, name, level, np.random.default_rng(5), FILL)
    again = augment_op(img, name, level, np.random.default_rng(5), FILL)
    assert out.size == img.size and out.mode == 'RGB'
    assert np.any(np.asarray(out) != np.asarray(img))
    np.testing.assert_array_equal(np.asarray(out), np.asarray(again))


def test_rand_augment_ops_use_timm_level_arguments():
    img = low_contrast_image()
    rng = np.random.default_rng(0)
    pixels = np.asarray(img)
    # level 9 of 10: SolarizeIncreasing threshold 256 - int(0.9 * 256) = 26
    np.testing.assert_array_equal(augment_op(img, 'SolarizeIncreasing', 9, rng),
                                  np.asarray(ImageOps.solarize(img, 26)))
    # PosterizeIncreasing keeps 4 - int(0.9 * 4) = 1 bit; at level 10 it keeps none: black
    np.testing.assert_array_equal(augment_op(img, 'PosterizeIncreasing', 9, rng), pixels & 0x80)
    assert not np.asarray(augment_op(img, 'PosterizeIncreasing', 10, rng)).any()
    # SolarizeAdd adds int(0.9 * 110) = 99 below 128
    np.testing.assert_array_equal(augment_op(img, 'SolarizeAdd', 9, rng),
                                  np.where(pixels < 128, np.minimum(pixels.astype(int) + 99, 255), pixels))
    # Rotate by +-27 degrees, bicubic, uncovered corners filled with the mean colour
    rotated = np.asarray(augment_op(img, 'Rotate', 9, rng, FILL))
    candidates = [np.asarray(img.rotate(d, resample=Image.Resampling.BICUBIC, fillcolor=FILL)) for d in (27, -27)]
    assert any(np.array_equal(rotated, c) for c in candidates)
    assert tuple(rotated[0, 0]) == FILL


def test_parse_rand_augment_config_string():
    ra = parse_rand_augment('rand-m9-mstd0.5-inc1', FILL, Image.Resampling.BICUBIC)
    assert (ra.op_names, ra.num_layers, ra.magnitude, ra.magnitude_std, ra.prob) == (
        RAND_INCREASING_TRANSFORMS, 2, 9, 0.5, 0.5)
    ra = parse_rand_augment('rand-n3-m5-p0.7', FILL, Image.Resampling.BICUBIC)
    assert (ra.op_names, ra.num_layers, ra.magnitude, ra.prob) == (RAND_TRANSFORMS, 3, 5, 0.7)
    assert parse_rand_augment('rand-mstd101', FILL, Image.Resampling.BICUBIC).magnitude_std == float('inf')
    with pytest.raises(ValueError, match="a RandAugment config starts with 'rand', got 'augmix-m9'"):
        parse_rand_augment('augmix-m9', FILL, Image.Resampling.BICUBIC)
    for bad in ['rand-m9-tweights', 'rand-x3', 'rand-mstd']:
        with pytest.raises(ValueError, match=f"unsupported section '{bad.split('-')[-1]}' in '{bad}'"):
            parse_rand_augment(bad, FILL, Image.Resampling.BICUBIC)


def test_random_erasing_pixel_mode_statistics():
    erase = RandomErasing(prob=1.0, mode='pixel')
    fractions, values = [], []
    for seed in range(300):
        x = erase(np.full((3, 48, 64), 7.0, np.float32), np.random.default_rng(seed))
        changed = x != 7.0
        rows, cols = np.flatnonzero(changed.any((0, 2))), np.flatnonzero(changed.any((0, 1)))
        assert changed[:, rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].all()  # one filled box, all channels
        fractions.append(changed[0].mean())
        values.append(x[changed])
    values = np.concatenate(values)
    assert 0.015 < min(fractions) and max(fractions) < 0.36  # area in [0.02, 1/3] up to rounding
    assert abs(np.mean(fractions) - (0.02 + 1 / 3) / 2) < 0.02
    assert abs(values.mean()) < 0.01 and abs(values.std() - 1) < 0.01  # per-pixel N(0, 1)


def test_random_erasing_probability_and_count():
    erase = RandomErasing(prob=0.25, mode='pixel')
    erased = [np.any(erase(np.zeros((3, 32, 32), np.float32), np.random.default_rng(s))) for s in range(800)]
    assert abs(np.mean(erased) - 0.25) < 0.05
    erase = RandomErasing(prob=1.0, mode='const', max_count=3)
    x = erase(np.ones((3, 32, 32), np.float32), np.random.default_rng(0))
    assert set(np.unique(x)) <= {0.0, 1.0} and (x == 0).any()
    with pytest.raises(ConfigError, match='TRAIN.RANDOM_ERASE_MODE'):
        RandomErasing(0.5, mode='noise')


def plain_train_config(**opts):
    """Training transform without the random parts, except those named in ``opts``."""
    base = {'DATA.IMAGE_SIZE': 32, 'TRAIN.RAND_AUGMENT': False, 'TRAIN.COLOR_JITTER': 0.0,
            'TRAIN.RANDOM_ERASE_PROB': 0.0, 'TRAIN.HFLIP': 0.0, 'TRAIN.RANDOM_RESIZED_CROP_SCALE': [1.0, 1.0]}
    base.update(opts)
    return make_config(**base)


def test_train_transform_composition_matches_pil():
    # full-area crop of a square image is the whole image; HFLIP 1 always flips
    img = photo(40, 40)
    out = build_train_transform(plain_train_config(**{'TRAIN.HFLIP': 1.0}))(img, np.random.default_rng(3))
    flipped = img.resize((32, 32), Image.Resampling.BICUBIC).transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    np.testing.assert_array_equal(out, normalised(np.asarray(flipped)))


@pytest.mark.parametrize('opts', [
    {},  # the full default recipe: RandAugment, random erasing, flip, random resized crop
    {'TRAIN.RAND_AUGMENT': False, 'TRAIN.COLOR_JITTER': 0.4},
])
def test_train_transform_is_a_function_of_the_rng(opts):
    img = photo(64, 48)
    transform = build_train_transform(make_config(**{'DATA.IMAGE_SIZE': 32, **opts}))
    outs = [transform(img, np.random.default_rng([0, 0, i])) for i in range(6)]
    assert all(o.shape == (3, 32, 32) and o.dtype == np.float32 for o in outs)
    np.testing.assert_array_equal(outs[0], transform(img, np.random.default_rng([0, 0, 0])))
    assert all(not np.array_equal(outs[0], o) for o in outs[1:])


def test_color_jitter_only_changes_colours():
    img = photo(40, 40)
    plain = build_train_transform(plain_train_config())(img, np.random.default_rng(1))
    jittered = build_train_transform(plain_train_config(**{'TRAIN.COLOR_JITTER': 0.4}))(img, np.random.default_rng(1))
    assert not np.array_equal(plain, jittered)
    assert abs(np.corrcoef(plain.ravel(), jittered.ravel())[0, 1]) > 0.8  # same geometry


def test_rand_augment_geometric_and_enhance_ops_use_timm_level_arguments():
    """Level 9 of 10: shear +-0.27, translate +-0.405 of the side, Color 0.9 * 1.8 + 0.1 = 1.72,
    ContrastIncreasing 1 +- 0.81, each with the bicubic filter and the fill colour."""
    img = low_contrast_image()
    bicubic = Image.Resampling.BICUBIC
    cases = {
        'ShearX': [img.transform(img.size, Image.Transform.AFFINE, (1, s, 0, 0, 1, 0), resample=bicubic,
                                 fillcolor=FILL) for s in (0.27, -0.27)],
        'ShearY': [img.transform(img.size, Image.Transform.AFFINE, (1, 0, 0, s, 1, 0), resample=bicubic,
                                 fillcolor=FILL) for s in (0.27, -0.27)],
        'TranslateXRel': [img.transform(img.size, Image.Transform.AFFINE, (1, 0, t * 40, 0, 1, 0), resample=bicubic,
                                        fillcolor=FILL) for t in (0.405, -0.405)],
        'TranslateYRel': [img.transform(img.size, Image.Transform.AFFINE, (1, 0, 0, 0, 1, t * 30), resample=bicubic,
                                        fillcolor=FILL) for t in (0.405, -0.405)],
        'Color': [ImageEnhance.Color(img).enhance(1.72)],
        'ContrastIncreasing': [ImageEnhance.Contrast(img).enhance(f) for f in (1.81, 1 - 0.81)],
        'BrightnessIncreasing': [ImageEnhance.Brightness(img).enhance(f) for f in (1.81, 1 - 0.81)],
    }
    for name, candidates in cases.items():
        for seed in range(4):  # both signs are drawn
            out = np.asarray(augment_op(img, name, 9, np.random.default_rng(seed), FILL))
            assert any(np.array_equal(out, np.asarray(c)) for c in candidates), name


def test_rand_augment_applies_each_op_with_its_probability_at_a_sampled_magnitude():
    """timm's RandAugment: an op runs when a uniform draw is <= prob; its magnitude is
    N(magnitude, magnitude_std) clipped to [0, 10], drawn for every op."""
    img = low_contrast_image()
    ra = RandAugment(['Invert'], num_layers=1, magnitude=9, prob=0.3)
    inverted = [not np.array_equal(np.asarray(ra(img, np.random.default_rng(s))), np.asarray(img))
                for s in range(600)]
    assert abs(np.mean(inverted) - 0.3) < 0.05
    ra = RandAugment(['Invert'], magnitude=9, magnitude_std=0.5)
    magnitudes = np.array([ra._sample_magnitude(np.random.default_rng(s)) for s in range(2000)])
    assert abs(magnitudes.mean() - 9) < 0.05 and abs(magnitudes.std() - 0.5) < 0.05
    assert magnitudes.max() == 10 and abs((magnitudes == 10).mean() - 0.023) < 0.01  # P(N(9, 0.5) > 10)


def test_train_transform_uses_the_official_augmentation_parameters():
    """The default recipe: crop scale (0.08, 1), aspect (3/4, 4/3), bicubic; RandAugment fills with
    the dataset mean colour round(255 * mean) and resamples bicubic."""
    transform = build_train_transform(make_config())
    assert transform.scale == (0.08, 1.0) and transform.ratio == pytest.approx((3 / 4, 4 / 3))
    assert transform.resample == Image.Resampling.BICUBIC
    assert transform.rand_augment.fill == FILL == (124, 116, 104)
    assert transform.rand_augment.resample == Image.Resampling.BICUBIC
    other = build_train_transform(make_config(**{'DATA.IMAGENET_MEAN': [0.5, 0.0, 1.0]}))
    assert other.rand_augment.fill == (128, 0, 255)


def test_random_resized_crop_box_stays_in_scale_and_ratio():
    """Area fraction ~ U(scale) and aspect in the ratio range; when no draw fits, the centred
    largest crop with the aspect clamped to the range."""
    fractions, aspects = [], []
    for seed in range(400):
        left, top, w, h = random_resized_crop_box(400, 300, (0.2, 0.5), (3 / 4, 4 / 3), np.random.default_rng(seed))
        assert 0 <= left and left + w <= 400 and 0 <= top and top + h <= 300
        fractions.append(w * h / (400 * 300))
        aspects.append(w / h)
    assert 0.19 < min(fractions) < 0.21 and 0.48 < max(fractions) < 0.51
    assert abs(np.mean(fractions) - 0.35) < 0.02
    assert 0.74 < min(aspects) < 0.78 and 1.29 < max(aspects) < 1.34
    # 100 x 40 cannot hold its whole area at an aspect <= 4/3: centred 53 x 40
    assert random_resized_crop_box(100, 40, (1.0, 1.0), (3 / 4, 4 / 3), np.random.default_rng(0)) == (23, 0, 53, 40)
    assert random_resized_crop_box(40, 100, (1.0, 1.0), (3 / 4, 4 / 3), np.random.default_rng(0)) == (0, 23, 40, 53)


def test_color_jitter_draws_brightness_contrast_saturation_factors_in_random_order():
    """torchvision's ColorJitter(0.4, 0.4, 0.4): factors ~ U(0.6, 1.4) for brightness, contrast and
    saturation (PIL's Color), applied in a random permutation."""
    img = photo(24, 20, jpeg=False)
    enhancers = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)
    factors = []
    for seed in range(3):
        rng = np.random.default_rng(seed)
        expected = img
        for i in rng.permutation(3):
            factor = rng.uniform(0.6, 1.4)
            factors.append(factor)
            expected = enhancers[i](expected).enhance(factor)
        np.testing.assert_array_equal(np.asarray(color_jitter(img, 0.4, np.random.default_rng(seed))),
                                      np.asarray(expected))
    assert min(factors) < 0.8 or max(factors) > 1.2  # the range is exercised, not only near 1


def test_random_erasing_box_aspect_fill_modes_and_split_area():
    """Boxes have log aspect ~ U(log 0.3, log 1/0.3); 'rand' fills one N(0, 1) value per channel;
    with several boxes their areas share the [0.02, 1/3] fraction, so all together stay within it."""
    erase = RandomErasing(prob=1.0, mode='const')
    aspects = []
    for seed in range(300):
        x = erase(np.ones((1, 200, 200), np.float32), np.random.default_rng(seed))
        rows, cols = np.flatnonzero((x[0] == 0).any(1)), np.flatnonzero((x[0] == 0).any(0))
        aspects.append(len(rows) / len(cols))
    assert min(aspects) < 0.4 and max(aspects) > 2.5 and 0.28 < min(aspects) and max(aspects) < 3.6
    x = RandomErasing(prob=1.0, mode='rand')(np.full((3, 40, 40), 7.0, np.float32), np.random.default_rng(1))
    box = x[:, (x[0] != 7).any(1)][:, :, (x[0] != 7).any(0)]
    assert box.size > 0 and all(len(np.unique(channel)) == 1 for channel in box)
    assert len(np.unique(box[:, 0, 0])) == 3
    erase = RandomErasing(prob=1.0, mode='const', max_count=3)
    erased = [(erase(np.ones((1, 64, 64), np.float32), np.random.default_rng(s)) == 0).mean() for s in range(300)]
    assert max(erased) < 0.34
