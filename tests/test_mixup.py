"""Mixup / CutMix: mixed images, soft-target values, lam of the CutMix box, config handling."""
import numpy as np
import paddle
import pytest

from config import ConfigError, get_config, merge_from_list
from mixup import Mixup, build_mixup, cutmix_box, mixup_active, smooth_one_hot

C = 10
LABELS = np.array([0, 1, 2, 3, 4, 5, 6, 7], np.int64)  # distinct, so lam can be read off the targets


def make_config(**opts):
    config = get_config()
    config.defrost()
    merge_from_list(config, ['MODEL.NUM_CLASSES', C] + [item for pair in opts.items() for item in pair])
    return config


def batch(seed=0, size=16):
    """Distinct random images, so every pixel of x differs from the flipped batch."""
    x = np.random.default_rng(seed).standard_normal((len(LABELS), 3, size, size)).astype(np.float32)
    return x, paddle.to_tensor(x), paddle.to_tensor(LABELS)


def lam_from_targets(soft, smoothing=0.1):
    """Row i's weight on its own label: lam * (1 - s + s / C) + (1 - lam) * s / C."""
    own = soft[np.arange(len(LABELS)), LABELS]
    return (own - smoothing / C) / (1 - smoothing)


def test_smooth_one_hot_values_are_exact():
    y = smooth_one_hot(paddle.to_tensor(LABELS), C, 0.1).numpy()
    assert y.dtype == np.float32 and y.shape == (8, C)
    off = ~np.eye(C, dtype=bool)[LABELS]
    assert np.all(y[off] == np.float32(0.1 / C))
    assert np.all(y[~off] == np.float32(1 - 0.1 + 0.1 / C))


def test_batch_mixup_blends_with_flipped_batch():
    mixup = build_mixup(make_config(**{'TRAIN.CUTMIX_ALPHA': 0.0}))
    x_np, x, y = batch()
    mixed, soft = mixup(x, y, np.random.default_rng(1))
    soft = soft.numpy()
    assert soft.dtype == np.float32 and soft.shape == (8, C)
    np.testing.assert_allclose(soft.sum(1), 1, rtol=1e-6)
    lam = lam_from_targets(soft)
    assert np.allclose(lam, lam[0], atol=1e-6) and 0 < lam[0] < 1  # one lam for the whole batch
    np.testing.assert_allclose(mixed.numpy(), lam[0] * x_np + (1 - lam[0]) * x_np[::-1], atol=1e-5)
    partner = soft[np.arange(8), LABELS[::-1]]
    np.testing.assert_allclose(partner, (1 - lam[0]) * 0.9 + 0.01, atol=1e-6)
    off = np.ones_like(soft, bool)
    off[np.arange(8), LABELS] = off[np.arange(8), LABELS[::-1]] = False
    assert np.all(soft[off] == np.float32(0.1 / C))


def box_of(changed):
    """(top, bottom, left, right) of the True region of a (H, W) mask, checking it is a full box."""
    rows, cols = np.flatnonzero(changed.any(1)), np.flatnonzero(changed.any(0))
    top, bottom, left, right = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    assert changed[top:bottom, left:right].all() and changed.sum() == (bottom - top) * (right - left)
    return top, bottom, left, right


@pytest.mark.parametrize('seed', range(6))
def test_batch_cutmix_pastes_one_box_and_lam_is_its_uncovered_fraction(seed):
    mixup = build_mixup(make_config(**{'TRAIN.MIXUP_ALPHA': 0.0}))
    x_np, x, y = batch(seed)
    mixed, soft = mixup(x, y, np.random.default_rng(seed))
    mixed, soft = mixed.numpy(), soft.numpy()
    changed = (mixed != x_np).any((0, 1))
    lam = lam_from_targets(soft)
    np.testing.assert_allclose(soft.sum(1), 1, rtol=1e-6)
    if not changed.any():
        np.testing.assert_allclose(lam, 1, atol=1e-6)
        return
    top, bottom, left, right = box_of(changed)
    np.testing.assert_array_equal(mixed[:, :, top:bottom, left:right], x_np[::-1, :, top:bottom, left:right])
    np.testing.assert_allclose(lam, 1 - (bottom - top) * (right - left) / 16 ** 2, atol=1e-6)


def test_cutmix_box_spans_half_the_cut_each_side_of_its_centre_as_timm():
    """timm's rand_bbox: [c - cut // 2, c + cut // 2) per axis, so an odd cut of 5 pixels (lam = 1 - (5/16)^2,
    exact in binary) gives a 4-pixel side wherever the box is not clipped by the border."""
    unclipped = 0
    for seed in range(40):
        (top, bottom, left, right), kept = cutmix_box(16, 16, 1 - (5 / 16) ** 2, None, np.random.default_rng(seed))
        cy, cx = (int(v) for v in np.random.default_rng(seed).integers(0, 16, 2))  # the centre cutmix_box drew
        assert (top, bottom, left, right) == (max(cy - 2, 0), min(cy + 2, 16), max(cx - 2, 0), min(cx + 2, 16))
        assert kept == 1 - (bottom - top) * (right - left) / 256
        unclipped += (bottom - top, right - left) == (4, 4)
    assert unclipped >= 10


def test_cutmix_minmax_box_sides():
    mixup = build_mixup(make_config(**{'TRAIN.MIXUP_ALPHA': 0.0, 'TRAIN.CUTMIX_MINMAX': [0.25, 0.75]}))
    for seed in range(5):
        x_np, x, y = batch(seed)
        mixed, soft = mixup(x, y, np.random.default_rng(seed))
        top, bottom, left, right = box_of((mixed.numpy() != x_np).any((0, 1)))
        assert 4 <= bottom - top < 12 and 4 <= right - left < 12
        np.testing.assert_allclose(lam_from_targets(soft.numpy()), 1 - (bottom - top) * (right - left) / 256,
                                   atol=1e-6)


def test_cutmix_minmax_box_placement_is_timms():
    """timm's rand_bbox_minmax draws the top-left corner from randint(0, side - cut), upper bound excluded:
    the box starts at the top/left border at times but never reaches the bottom/right one."""
    boxes = [cutmix_box(16, 16, None, [0.25, 0.75], np.random.default_rng(seed))[0] for seed in range(300)]
    tops, bottoms, lefts, rights = np.array(boxes).T
    assert bottoms.max() < 16 and rights.max() < 16
    assert tops.min() == 0 and lefts.min() == 0


@pytest.mark.parametrize('switch_prob,cutmix', [(0.0, False), (1.0, True)])
def test_switch_prob_chooses_between_mixup_and_cutmix(switch_prob, cutmix):
    mixup = build_mixup(make_config(**{'TRAIN.MIXUP_SWITCH_PROB': switch_prob}))
    x_np, x, y = batch()
    mixed, _ = mixup(x, y, np.random.default_rng(0))
    changed = (mixed.numpy() != x_np).any((0, 1))
    assert changed.all() != cutmix  # mixup changes every pixel, cutmix only a box


@pytest.mark.parametrize('mode', ['elem', 'pair'])
def test_per_image_mixup(mode):
    mixup = build_mixup(make_config(**{'TRAIN.MIXUP_MODE': mode, 'TRAIN.CUTMIX_ALPHA': 0.0}))
    x_np, x, y = batch()
    mixed, soft = mixup(x, y, np.random.default_rng(2))
    lam = lam_from_targets(soft.numpy())
    np.testing.assert_allclose(soft.numpy().sum(1), 1, rtol=1e-6)
    expected = lam[:, None, None, None] * x_np + (1 - lam[:, None, None, None]) * x_np[::-1]
    np.testing.assert_allclose(mixed.numpy(), expected, atol=1e-5)
    if mode == 'pair':
        np.testing.assert_allclose(lam, lam[::-1], atol=1e-6)
    else:
        assert len(np.unique(lam.round(5))) > 4


@pytest.mark.parametrize('mode', ['elem', 'pair'])
def test_per_image_cutmix(mode):
    mixup = build_mixup(make_config(**{'TRAIN.MIXUP_MODE': mode, 'TRAIN.MIXUP_ALPHA': 0.0}))
    x_np, x, y = batch()
    mixed, soft = mixup(x, y, np.random.default_rng(3))
    mixed, lam = mixed.numpy(), lam_from_targets(soft.numpy())
    boxes = []
    for i in range(8):
        changed = (mixed[i] != x_np[i]).any(0)
        box = box_of(changed) if changed.any() else None
        if box is not None:
            top, bottom, left, right = box
            np.testing.assert_array_equal(mixed[i, :, top:bottom, left:right], x_np[7 - i, :, top:bottom, left:right])
        area = 0 if box is None else (box[1] - box[0]) * (box[3] - box[2])
        np.testing.assert_allclose(lam[i], 1 - area / 256, atol=1e-6)
        boxes.append(box)
    assert sum(b is not None for b in boxes) >= 4
    if mode == 'pair':
        assert boxes == boxes[::-1]


def test_mixup_is_a_function_of_the_rng():
    mixup = build_mixup(make_config())
    _, x, y = batch()
    first = [t.numpy() for t in mixup(x, y, np.random.default_rng(7))]
    again = [t.numpy() for t in mixup(x, y, np.random.default_rng(7))]
    other = [t.numpy() for t in mixup(x, y, np.random.default_rng(8))]
    np.testing.assert_array_equal(first[0], again[0])
    np.testing.assert_array_equal(first[1], again[1])
    assert not np.array_equal(first[1], other[1])


@pytest.mark.parametrize('minmax,size', [([0.5, 0.5], 224), ([0.3, 0.301], 224), ([0.2, 0.24], 16)])
def test_cutmix_minmax_without_a_box_side_is_a_config_error(minmax, size):
    """Sides are drawn from int(size * lo) up to int(size * hi), excluded: an empty range is refused when the
    mixup is built, naming the key, rather than failing at the first batch inside numpy."""
    with pytest.raises(ConfigError, match=r'TRAIN\.CUTMIX_MINMAX .* DATA\.IMAGE_SIZE'):
        build_mixup(make_config(**{'TRAIN.CUTMIX_MINMAX': minmax, 'DATA.IMAGE_SIZE': size}))
    assert isinstance(build_mixup(make_config(**{'TRAIN.CUTMIX_MINMAX': [0.2, 0.32], 'DATA.IMAGE_SIZE': 16})), Mixup)


def test_build_mixup_off_and_errors():
    assert build_mixup(make_config(**{'TRAIN.MIXUP_ALPHA': 0.0, 'TRAIN.CUTMIX_ALPHA': 0.0})) is None
    assert build_mixup(make_config(**{'TRAIN.MIXUP_PROB': 0.0})) is None
    assert not mixup_active(make_config(**{'TRAIN.MIXUP_PROB': 0.0}))
    assert isinstance(build_mixup(make_config(**{'TRAIN.MIXUP_ALPHA': 0.0, 'TRAIN.CUTMIX_ALPHA': 0.0,
                                                 'TRAIN.CUTMIX_MINMAX': [0.2, 0.8]})), Mixup)
    with pytest.raises(ConfigError, match='DATA.BATCH_SIZE'):
        build_mixup(make_config(**{'DATA.BATCH_SIZE': 7}))
    with pytest.raises(ValueError, match='even batch size'):
        build_mixup(make_config())(paddle.zeros([3, 3, 4, 4]), paddle.to_tensor([0, 1, 2]), np.random.default_rng(0))


def test_mixup_prob_leaves_batches_or_images_unmixed():
    """TRAIN.MIXUP_PROB is the chance that a batch ('batch' mode) or an image ('elem') is mixed:
    an unmixed one keeps its pixels and its smoothed one-hot target."""
    x_np, x, y = batch()
    one_hot = smooth_one_hot(y, C, 0.1).numpy()
    never = build_mixup(make_config(**{'TRAIN.MIXUP_PROB': 1e-9}))
    for seed in range(5):
        mixed, soft = never(x, y, np.random.default_rng(seed))
        np.testing.assert_array_equal(mixed.numpy(), x_np)
        np.testing.assert_array_equal(soft.numpy(), one_hot)
    half = build_mixup(make_config(**{'TRAIN.MIXUP_PROB': 0.5, 'TRAIN.MIXUP_MODE': 'elem', 'TRAIN.CUTMIX_ALPHA': 0.0}))
    unmixed = []
    for seed in range(10):
        mixed, soft = half(x, y, np.random.default_rng(seed))
        kept = (mixed.numpy() == x_np).all((1, 2, 3))
        np.testing.assert_array_equal(soft.numpy()[kept], one_hot[kept])
        assert np.all(lam_from_targets(soft.numpy())[~kept] < 1 - 1e-6)
        unmixed.append(kept.mean())
    assert 0.3 < np.mean(unmixed) < 0.7


def test_build_mixup_smooths_the_targets_by_train_smoothing():
    """TRAIN.SMOOTHING 0.2 with 10 classes: 0.02 off the labels of the image and its partner."""
    mixup = build_mixup(make_config(**{'TRAIN.SMOOTHING': 0.2, 'TRAIN.CUTMIX_ALPHA': 0.0}))
    _, x, y = batch()
    soft = mixup(x, y, np.random.default_rng(1))[1].numpy()
    off = np.ones_like(soft, bool)
    off[np.arange(8), LABELS] = off[np.arange(8), LABELS[::-1]] = False
    assert np.all(soft[off] == np.float32(0.2 / C))
    np.testing.assert_allclose(soft.sum(1), 1, rtol=1e-6)
