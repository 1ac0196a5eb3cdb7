"""Mixup and CutMix with label smoothing folded into the soft targets (timm's ``Mixup`` semantics).

Image i of a batch of B is mixed with image B - 1 - i (the batch flipped). Mixup blends the two
images with weight lam; CutMix pastes a box of the partner into the image, and lam becomes the
fraction of the image left uncovered (after clipping the box to the image). The soft target is
``lam * smooth(y) + (1 - lam) * smooth(y flipped)``, where ``smooth`` puts ``1 - s + s / C`` on
the label and ``s / C`` elsewhere (s = TRAIN.SMOOTHING, C = MODEL.NUM_CLASSES).

Modes: 'batch' (one lam and box for the whole batch), 'pair' (per pair i, B - 1 - i), 'elem'
(per image). All random draws come from the ``np.random.Generator`` passed per call.
"""
import numpy as np
import paddle

from config import MIXUP_MODES as MODES, ConfigError


def smooth_one_hot(target, num_classes, smoothing):
    """int64 (B,) -> float32 (B, num_classes): 1 - smoothing + smoothing / C on the label, else smoothing / C."""
    off = smoothing / num_classes
    hot = paddle.nn.functional.one_hot(target, num_classes).astype('bool')
    # float32 fills, not Python floats: Paddle 2.6 makes those float64, and the loss with them
    return paddle.where(hot, paddle.full(hot.shape, 1.0 - smoothing + off, 'float32'),
                        paddle.full(hot.shape, off, 'float32'))


def mixup_target(target, num_classes, lam, smoothing):
    """Soft targets (B, num_classes) float32; ``lam`` is a float or a (B, 1) tensor."""
    y = smooth_one_hot(target, num_classes, smoothing)
    return y * lam + y.flip(0) * (1.0 - lam)


def cutmix_box(height, width, lam, minmax, rng):
    """A CutMix box (top, bottom, left, right) and the fraction of the image it leaves uncovered.

    Without ``minmax`` (timm's ``rand_bbox``): with cut = int(side * sqrt(1 - lam)), the box spans
    [c - cut // 2, c + cut // 2) around a centre c drawn uniformly from the pixels, clipped to the
    image (so an odd cut loses a pixel, as in timm). With ``minmax`` = [lo, hi] (timm's
    ``rand_bbox_minmax``): sides ~ randint(int(side * lo), int(side * hi)), top-left corner ~
    randint(0, side - cut), upper bounds excluded as in timm, so the box never touches the bottom or
    right border (``lam`` unused).
    """
    if minmax:
        cut_h = int(rng.integers(int(height * minmax[0]), int(height * minmax[1])))
        cut_w = int(rng.integers(int(width * minmax[0]), int(width * minmax[1])))
        top = int(rng.integers(0, height - cut_h))
        left = int(rng.integers(0, width - cut_w))
        bottom, right = top + cut_h, left + cut_w
    else:
        ratio = np.sqrt(1.0 - lam)
        cut_h, cut_w = int(height * ratio), int(width * ratio)
        cy, cx = int(rng.integers(0, height)), int(rng.integers(0, width))
        top, bottom = np.clip([cy - cut_h // 2, cy + cut_h // 2], 0, height)
        left, right = np.clip([cx - cut_w // 2, cx + cut_w // 2], 0, width)
    kept = 1.0 - (bottom - top) * (right - left) / (height * width)
    return (int(top), int(bottom), int(left), int(right)), float(kept)


class Mixup:
    """``__call__(x (B, 3, H, W) float32, target (B,) int64, rng) -> (mixed x, soft target (B, C))``."""

    def __init__(self, mixup_alpha=0.8, cutmix_alpha=1.0, cutmix_minmax=None, prob=1.0, switch_prob=0.5,
                 mode='batch', smoothing=0.1, num_classes=1000):
        self.mixup_alpha = mixup_alpha
        self.cutmix_minmax = list(cutmix_minmax) if cutmix_minmax else None
        self.cutmix_alpha = 1.0 if self.cutmix_minmax else cutmix_alpha  # as timm: minmax forces CutMix on
        if self.mixup_alpha <= 0 and self.cutmix_alpha <= 0:
            raise ValueError('Mixup needs mixup_alpha > 0, cutmix_alpha > 0 or cutmix_minmax')
        if mode not in MODES:
            raise ValueError(f'mixup mode must be one of {MODES}, got {mode!r}')
        self.prob = prob
        self.switch_prob = switch_prob
        self.mode = mode
        self.smoothing = smoothing
        self.num_classes = num_classes

    def _draw(self, count, rng):
        """Per-draw (lam float64 (count,), use_cutmix bool (count,)); lam is 1 where nothing is mixed."""
        if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
            use_cutmix = rng.random(count) < self.switch_prob
        else:
            use_cutmix = np.full(count, self.cutmix_alpha > 0)
        unmixed = np.ones(count)
        lam_cutmix = rng.beta(self.cutmix_alpha, self.cutmix_alpha, count) if self.cutmix_alpha > 0 else unmixed
        lam_mixup = rng.beta(self.mixup_alpha, self.mixup_alpha, count) if self.mixup_alpha > 0 else unmixed
        lam = np.where(use_cutmix, lam_cutmix, lam_mixup)
        lam = np.where(rng.random(count) < self.prob, lam, 1.0)
        return lam, use_cutmix

    def _mix_batch(self, x, rng):
        (lam,), (use_cutmix,) = self._draw(1, rng)
        if lam == 1.0:
            return x, 1.0
        if not use_cutmix:
            return x * float(lam) + x.flip(0) * float(1.0 - lam), float(lam)
        (top, bottom, left, right), lam = cutmix_box(x.shape[2], x.shape[3], lam, self.cutmix_minmax, rng)
        if lam < 1.0:
            x = x.clone()
            x[:, :, top:bottom, left:right] = x.flip(0)[:, :, top:bottom, left:right]
        return x, lam

    def _mix_per_image(self, x, rng):
        """'elem': own lam per image; 'pair': image i and B - 1 - i share lam and box."""
        batch = x.shape[0]
        count = batch // 2 if self.mode == 'pair' else batch
        lam, use_cutmix = self._draw(count, rng)
        boxes = [None] * count
        for i in np.flatnonzero(use_cutmix & (lam < 1.0)):
            boxes[i], lam[i] = cutmix_box(x.shape[2], x.shape[3], lam[i], self.cutmix_minmax, rng)
        if self.mode == 'pair':  # the second half mirrors the first
            lam, use_cutmix = np.concatenate([lam, lam[::-1]]), np.concatenate([use_cutmix, use_cutmix[::-1]])
            boxes = boxes + boxes[::-1]
        blend = paddle.to_tensor(np.where(use_cutmix, 1.0, lam).astype('float32').reshape(batch, 1, 1, 1))
        flipped = x.flip(0)
        mixed = x * blend + flipped * (1.0 - blend)
        for i, box in enumerate(boxes):
            if box is not None and lam[i] < 1.0:
                top, bottom, left, right = box
                mixed[i, :, top:bottom, left:right] = flipped[i, :, top:bottom, left:right]
        return mixed, paddle.to_tensor(lam.astype('float32').reshape(batch, 1))

    def __call__(self, x, target, rng):
        if x.shape[0] % 2:
            raise ValueError(f'Mixup/CutMix needs an even batch size, got {x.shape[0]}')
        if self.mode == 'batch':
            x, lam = self._mix_batch(x, rng)
        else:
            x, lam = self._mix_per_image(x, rng)
        return x, mixup_target(target, self.num_classes, lam, self.smoothing)


def mixup_active(config):
    """Whether training mixes images (then targets are soft and ``build_mixup`` returns a Mixup)."""
    train = config.TRAIN
    uses_mix = train.MIXUP_ALPHA > 0 or train.CUTMIX_ALPHA > 0 or bool(train.CUTMIX_MINMAX)
    return uses_mix and train.MIXUP_PROB > 0


def _check_cutmix_minmax(minmax, size):
    """Raises ``ConfigError`` unless [lo, hi] leaves a box side to draw on a ``size``-pixel image:
    sides are drawn from int(size * lo) up to int(size * hi), excluded."""
    low, high = int(size * minmax[0]), int(size * minmax[1])
    if low >= high:
        raise ConfigError(f'TRAIN.CUTMIX_MINMAX {list(minmax)} leaves no CutMix box side on DATA.IMAGE_SIZE {size}: '
                          f'sides are drawn from int({size} * {minmax[0]}) = {low} up to int({size} * {minmax[1]}) '
                          f'= {high}, excluded; widen the range')


def build_mixup(config):
    """A ``Mixup`` from TRAIN.MIXUP_* / CUTMIX_* / SMOOTHING and MODEL.NUM_CLASSES, or None when off."""
    if not mixup_active(config):
        return None
    train = config.TRAIN
    if config.DATA.BATCH_SIZE % 2:
        raise ConfigError(f'Mixup/CutMix needs an even DATA.BATCH_SIZE, got {config.DATA.BATCH_SIZE}')
    if train.CUTMIX_MINMAX:
        _check_cutmix_minmax(train.CUTMIX_MINMAX, config.DATA.IMAGE_SIZE)
    return Mixup(train.MIXUP_ALPHA, train.CUTMIX_ALPHA, list(train.CUTMIX_MINMAX) or None, train.MIXUP_PROB,
                 train.MIXUP_SWITCH_PROB, train.MIXUP_MODE, train.SMOOTHING, config.MODEL.NUM_CLASSES)
