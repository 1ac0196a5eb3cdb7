"""Training losses: soft-target and label-smoothing cross-entropy, and DeiT's distillation loss.

Every criterion here takes logits (B, C). ``build_criterion(config, teacher)`` returns the
callable the training loop uses, ``criterion(inputs, outputs, targets)``, with ``targets``
soft (B, C) float32 when mixup/cutmix is on and int64 class indices (B,) otherwise.
"""
import math

import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from mixup import mixup_active

__all__ = ['SoftTargetCrossEntropy', 'LabelSmoothingCrossEntropy', 'DistillationLoss', 'build_criterion']

DISTILLATION_TYPES = ('none', 'soft', 'hard')


class SoftTargetCrossEntropy(nn.Layer):
    """Cross-entropy against soft targets: mean over the batch of ``sum_c -t_c * log_softmax(x)_c``."""

    def forward(self, x, target):
        """x: logits (B, C); target: probabilities (B, C). Returns a scalar."""
        return paddle.sum(-target * F.log_softmax(x, axis=-1), axis=-1).mean()


class LabelSmoothingCrossEntropy(nn.Layer):
    """Cross-entropy with label smoothing, as timm's: per sample
    ``(1 - smoothing) * nll(x, target) + smoothing * mean_c(-log_softmax(x)_c)``, averaged over the batch.
    """

    def __init__(self, smoothing=0.1):
        super().__init__()
        if not 0.0 <= smoothing < 1.0:
            raise ValueError(f'smoothing must be in [0, 1), got {smoothing}')
        self.smoothing = smoothing
        self.confidence = 1.0 - smoothing

    def forward(self, x, target):
        """x: logits (B, C); target: class indices int64 (B,). Returns a scalar."""
        logprobs = F.log_softmax(x, axis=-1)
        nll = -paddle.take_along_axis(logprobs, target.reshape([-1, 1]), axis=-1).squeeze(-1)
        smooth = -logprobs.mean(axis=-1)
        return (self.confidence * nll + self.smoothing * smooth).mean()


def _kl_div_log_targets(log_p_student, log_p_teacher):
    """``sum over all elements of p_t * (log p_t - log p_s)``: KL(teacher || student), summed."""
    return paddle.sum(paddle.exp(log_p_teacher) * (log_p_teacher - log_p_student))


class DistillationLoss:
    """DeiT's distillation loss around a base criterion.

    ``loss = (1 - alpha) * base(outputs, labels) + alpha * distill``, where the teacher sees the
    same ``inputs`` as the student (after mixup) under ``no_grad`` and, with T = ``tau``:

    - 'soft': ``KL(softmax(t / T) || softmax(s / T))`` summed over batch and classes,
      times ``T * T / s.numel()`` (DeiT's normalisation: per element, not per sample);
    - 'hard': cross-entropy of the student against the teacher's argmax;
    - 'none': the base loss alone (the teacher is not run).

    XCiT has a single head, so the distillation term uses the same logits as the base loss.
    This is a plain callable rather than a Layer, so that the frozen teacher never becomes a
    sublayer of something that is trained, saved or switched to train mode.
    """

    def __init__(self, base_criterion, teacher, distillation_type, alpha, tau):
        if distillation_type not in DISTILLATION_TYPES:
            raise ValueError(f'distillation type must be one of {DISTILLATION_TYPES}, '
                             f'got {distillation_type!r}')
        if distillation_type != 'none' and teacher is None:
            raise ValueError(f'{distillation_type!r} distillation needs a teacher model '
                             '(teacher.build_teacher(config) builds it)')
        self.base_criterion = base_criterion
        self.teacher = teacher
        self.distillation_type = distillation_type
        self.alpha = alpha
        self.tau = tau

    def __call__(self, inputs, outputs, labels):
        """inputs: images (B, 3, H, W) fed to the teacher; outputs: student logits (B, C);
        labels: what the base criterion takes. Returns a scalar."""
        base_loss = self.base_criterion(outputs, labels)
        if self.distillation_type == 'none':
            return base_loss
        with paddle.no_grad():
            teacher_outputs = self.teacher(inputs)
        if self.distillation_type == 'soft':
            T = self.tau
            distillation_loss = _kl_div_log_targets(
                F.log_softmax(outputs / T, axis=-1),
                F.log_softmax(teacher_outputs / T, axis=-1),
            ) * (T * T) / math.prod(outputs.shape)
        else:
            distillation_loss = F.cross_entropy(outputs, teacher_outputs.argmax(axis=-1))
        return base_loss * (1 - self.alpha) + distillation_loss * self.alpha


def build_criterion(config, teacher=None):
    """Returns ``criterion(inputs, outputs, targets)`` for training, as DeiT's main.py builds it.

    Base: ``SoftTargetCrossEntropy`` when ``mixup.mixup_active(config)`` (label smoothing is then
    folded into the mixed targets), else ``LabelSmoothingCrossEntropy(TRAIN.SMOOTHING)`` when smoothing
    is on, else plain cross-entropy; always wrapped in ``DistillationLoss`` with
    ``TRAIN.DISTILLATION_TYPE / _ALPHA / _TAU`` ('none' simply calls the base criterion).
    """
    t = config.TRAIN
    if mixup_active(config):
        base = SoftTargetCrossEntropy()
    elif t.SMOOTHING > 0:
        base = LabelSmoothingCrossEntropy(t.SMOOTHING)
    else:
        base = nn.CrossEntropyLoss()
    try:
        return DistillationLoss(base, teacher, t.DISTILLATION_TYPE, t.DISTILLATION_ALPHA, t.DISTILLATION_TAU)
    except ValueError as e:
        raise ValueError(f'TRAIN.DISTILLATION_TYPE: {e}') from e
