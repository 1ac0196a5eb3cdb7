"""Optimizer and learning-rate schedule: AdamW (or SGD with momentum) with selective weight
decay, warmup + cosine.

Weight decay follows the official XCiT run (timm 0.4's ``create_optimizer`` with
``filter_bias_and_bn``): no decay for parameters with at most one dimension (biases, norm
weights, layer-scale gammas), names ending in ``.bias``, and the names the model lists in
``no_weight_decay()`` (``cls_token`` for XCiT); frozen parameters are left out. Everything else
decays, including the (heads, 1, 1) XCA temperatures and the positional-encoding projection.
"""
import math

import paddle
from paddle.optimizer.lr import LRScheduler

from config import OPTIMIZER_SETTINGS

__all__ = ['param_groups_weight_decay', 'build_optimizer', 'WarmupCosineLR', 'peak_learning_rate',
           'build_lr_scheduler']


def _unwrap(model):
    return model._layers if isinstance(model, paddle.DataParallel) else model


def param_groups_weight_decay(model, weight_decay):
    """Splits the trainable parameters by their names in ``model.named_parameters()``.

    Returns ``[{'params': no_decay, 'weight_decay': 0.0}, {'params': decay, 'weight_decay': weight_decay}]``.
    """
    model = _unwrap(model)
    skip = set(model.no_weight_decay()) if hasattr(model, 'no_weight_decay') else set()
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.stop_gradient:
            continue
        if len(param.shape) <= 1 or name.endswith('.bias') or name in skip:
            no_decay.append(param)
        else:
            decay.append(param)
    return [{'params': no_decay, 'weight_decay': 0.0}, {'params': decay, 'weight_decay': weight_decay}]


def build_optimizer(config, model, lr_scheduler):
    """The optimizer of ``TRAIN.OPTIMIZER.NAME`` over ``model``'s trainable parameters, driven by
    ``lr_scheduler``.

    AdamW: decoupled weight decay, betas and epsilon from ``TRAIN.OPTIMIZER``. SGD: momentum
    ``TRAIN.OPTIMIZER.MOMENTUM`` with L2 weight decay added to the gradient, as
    ``torch.optim.SGD`` (DINO's linear evaluation). Either way ``TRAIN.WEIGHT_DECAY`` applies to
    the decay group of ``param_groups_weight_decay`` only, and ``TRAIN.GRAD_CLIP > 0`` clips the
    global gradient norm over all parameters. The parameters are passed as one list and the
    decay is selected per parameter, because Paddle clips per parameter group when given
    groups, which would not be a global norm.
    """
    t = config.TRAIN
    name = t.OPTIMIZER.NAME.lower()
    if name not in OPTIMIZER_SETTINGS:
        raise ValueError(f'TRAIN.OPTIMIZER.NAME: AdamW or SGD, got {t.OPTIMIZER.NAME!r}')
    no_decay, decay = (g['params'] for g in param_groups_weight_decay(model, t.WEIGHT_DECAY))
    params = no_decay + decay
    grad_clip = paddle.nn.ClipGradByGlobalNorm(t.GRAD_CLIP) if t.GRAD_CLIP > 0 else None
    if name == 'sgd':
        _exclude_from_l2_decay(no_decay, decay)
        return paddle.optimizer.Momentum(
            learning_rate=lr_scheduler, momentum=t.OPTIMIZER.MOMENTUM, parameters=params,
            weight_decay=paddle.regularizer.L2Decay(t.WEIGHT_DECAY), grad_clip=grad_clip)
    # Paddle hands apply_decay_param_fun the tensor's unique name, not the structured one.
    decay_names = {p.name for p in decay}
    if len({p.name for p in params}) != len(params):
        raise ValueError('the model has parameters sharing a tensor name; cannot select weight decay by name')
    beta1, beta2 = t.OPTIMIZER.BETAS
    return paddle.optimizer.AdamW(
        learning_rate=lr_scheduler,
        beta1=beta1,
        beta2=beta2,
        epsilon=t.OPTIMIZER.EPS,
        parameters=params,
        weight_decay=t.WEIGHT_DECAY,
        apply_decay_param_fun=lambda name: name in decay_names,
        grad_clip=grad_clip,
    )


def _exclude_from_l2_decay(no_decay, decay):
    """Gives each ``no_decay`` parameter its own L2 regularizer of 0, which Paddle's optimizers
    use instead of theirs; ``decay`` parameters get the optimizer's (their own is cleared)."""
    for param in no_decay:
        param.regularizer = paddle.regularizer.L2Decay(0.0)
    for param in decay:
        param.regularizer = None


class WarmupCosineLR(LRScheduler):
    """Per-step schedule: linear warmup, then half a cosine down to ``end_lr``.

    At optimizer step t (0-based; ``last_epoch`` counts steps), with W = ``warmup_steps`` and
    N = ``total_steps``:

    - t < W:  lr = start_lr + (peak_lr - start_lr) * t / W
    - t >= W: lr = end_lr + (peak_lr - end_lr) * (1 + cos(pi * min(1, (t - W) / (N - W)))) / 2

    so step 0 runs at ``start_lr``, step W at ``peak_lr``, step W + (N - W) / 2 halfway between
    ``peak_lr`` and ``end_lr``. The official XCiT run used timm's per-epoch cosine schedule,
    whose warmup overrides the first epochs of a cosine that starts at epoch 0; this schedule
    moves every step and starts the cosine after the warmup.
    ``state_dict()`` / ``set_state_dict()`` carry the step count and the current lr.
    """

    def __init__(self, peak_lr, start_lr, end_lr, warmup_steps, total_steps, last_epoch=-1):
        if warmup_steps < 0 or total_steps <= 0:
            raise ValueError(f'need warmup_steps >= 0 and total_steps > 0, '
                             f'got {warmup_steps} and {total_steps}')
        self.peak_lr = peak_lr
        self.start_lr = start_lr
        self.end_lr = end_lr
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        super().__init__(learning_rate=peak_lr, last_epoch=last_epoch)

    def get_lr(self):
        t, W, N = self.last_epoch, self.warmup_steps, self.total_steps
        if t < W:
            return self.start_lr + (self.peak_lr - self.start_lr) * t / W
        progress = min(1.0, (t - W) / max(1, N - W))
        return self.end_lr + (self.peak_lr - self.end_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def peak_learning_rate(config, world_size):
    """``BASE_LR`` scaled linearly by the global batch ``BATCH_SIZE * world_size * ACCUM_ITER``
    over ``LINEAR_SCALED_LR`` (0: no scaling)."""
    t = config.TRAIN
    if t.LINEAR_SCALED_LR == 0:
        return t.BASE_LR
    return t.BASE_LR * config.DATA.BATCH_SIZE * world_size * t.ACCUM_ITER / t.LINEAR_SCALED_LR


def schedule_warnings(config, world_size):
    """Messages naming the schedule settings that defeat the warmup-cosine shape, for a run to
    report: a warmup as long as the run (the cosine never starts) or an END_LR above the scaled
    peak (the "decay" raises the learning rate)."""
    t = config.TRAIN
    peak = peak_learning_rate(config, world_size)
    messages = []
    if t.WARMUP_EPOCHS >= t.NUM_EPOCHS:
        messages.append(f'TRAIN.WARMUP_EPOCHS ({t.WARMUP_EPOCHS}) is not below TRAIN.NUM_EPOCHS ({t.NUM_EPOCHS}): '
                        f'the learning rate warms up for the whole run and never decays')
    if t.END_LR > peak:
        messages.append(f'TRAIN.END_LR ({t.END_LR:.3e}) is above the peak learning rate ({peak:.3e}, TRAIN.BASE_LR '
                        f'scaled by the global batch): the cosine raises the learning rate')
    return messages


def build_lr_scheduler(config, steps_per_epoch, world_size):
    """``WarmupCosineLR`` over ``TRAIN.NUM_EPOCHS``, warming up for ``TRAIN.WARMUP_EPOCHS``
    from ``TRAIN.WARMUP_START_LR`` to the scaled peak, ending at ``TRAIN.END_LR``.

    ``steps_per_epoch`` counts optimizer steps (loader batches / ``ACCUM_ITER``); call
    ``scheduler.step()`` after every optimizer step.
    """
    if steps_per_epoch <= 0:
        raise ValueError(f'steps_per_epoch must be positive, got {steps_per_epoch}')
    t = config.TRAIN
    return WarmupCosineLR(
        peak_lr=peak_learning_rate(config, world_size),
        start_lr=t.WARMUP_START_LR,
        end_lr=t.END_LR,
        warmup_steps=t.WARMUP_EPOCHS * steps_per_epoch,
        total_steps=t.NUM_EPOCHS * steps_per_epoch,
    )
