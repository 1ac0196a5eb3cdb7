"""Exponential moving average of a model's weights, as timm's ``ModelEma`` used by the official run."""
import copy

import paddle
from paddle.nn.layer.norm import _BatchNormBase  # BatchNorm1D/2D/3D and SyncBatchNorm

__all__ = ['ModelEma', 'fixed_entries']


def fixed_entries(model):
    """State-dict names of ``model`` (or of the model a ``paddle.DataParallel`` wraps) that
    training leaves unchanged: every entry without gradient, except the running statistics of
    BatchNorm layers in training mode."""
    model = getattr(model, '_layers', model)
    fixed = set()
    for prefix, layer in model.named_sublayers(include_self=True):
        if layer.training and isinstance(layer, _BatchNormBase):
            continue  # its statistics move
        entries = list(layer.named_parameters(include_sublayers=False)) + list(
            layer.named_buffers(include_sublayers=False))
        fixed.update(f'{prefix}.{name}' if prefix else name for name, value in entries if value.stop_gradient)
    return fixed


class ModelEma:
    """Keeps ``module``, a frozen eval-mode copy of a model, as the moving average of its state.

    Every floating-point state-dict entry, parameters and buffers alike (BatchNorm running mean
    and variance included), follows ``ema = decay * ema + (1 - decay) * value`` at each
    ``update(model)``, as timm's ``ModelEma`` / ``ModelEmaV2`` do. Entries that training cannot
    change are left as they are (averaging equal values would still move them by rounding): the
    weights of a frozen backbone (``XCiT.freeze_backbone``), the statistics of BatchNorm layers in
    eval mode and every other buffer (see ``fixed_entries``). A non-floating-point entry that
    training changes (the model has none) would be copied.
    Create it from the bare model, before any ``paddle.DataParallel`` wrapping; ``update`` accepts
    either, since both have the same state-dict names.
    """

    def __init__(self, model, decay):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f'EMA decay must be in [0, 1], got {decay}')
        self.decay = decay
        self.module = copy.deepcopy(model)
        self.module.eval()
        for param in self.module.parameters():
            param.stop_gradient = True

    @paddle.no_grad()
    def update(self, model):
        """Moves every entry of ``module``'s state dict towards ``model``'s, matched by name."""
        model_state = model.state_dict()
        fixed = fixed_entries(model)
        for name, ema_value in self.module.state_dict().items():
            if name in fixed:
                continue
            value = model_state[name]
            if paddle.is_floating_point(ema_value):
                value = ema_value * self.decay + value.astype(ema_value.dtype) * (1.0 - self.decay)
            paddle.assign(value, output=ema_value)

    def state_dict(self):
        """The averaged model's state dict (the tensors themselves, as ``Layer.state_dict``)."""
        return self.module.state_dict()

    def set_state_dict(self, state_dict):
        """Loads averaged weights, e.g. from a checkpoint; names and shapes must match exactly."""
        missing, unexpected = self.module.set_state_dict(state_dict)
        if missing or unexpected:
            raise ValueError(f'EMA state dict does not fit the model: missing or mis-shaped {missing[:5]}, '
                             f'unexpected or mis-shaped {unexpected[:5]}')
