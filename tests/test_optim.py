"""AdamW and SGD weight-decay groups, gradient clipping and the warmup + cosine schedule."""
import json
import math
import os
import re

import numpy as np
import paddle
import pytest

from config import ConfigError, get_config, merge_from_list
from conftest import GOLDEN, ROOT
from optim import build_lr_scheduler, build_optimizer, param_groups_weight_decay, schedule_warnings
from xcit import XCiT, build_xcit

# BASE_LR 5e-4 at batch 512: 128 images per process on 1 process -> 1.25e-4
PEAK = 5e-4 * 128 / 512
START, END = 1e-6, 1e-5


def make_config(*opts):
    config = get_config()
    config.defrost()
    merge_from_list(config, ['DATA.BATCH_SIZE', 128, 'TRAIN.WARMUP_EPOCHS', 5, 'TRAIN.NUM_EPOCHS', 10,
                             'TRAIN.WARMUP_START_LR', START, 'TRAIN.END_LR', END] + list(opts))
    config.freeze()
    return config


def lrs(scheduler, steps):
    """The lr used at each of ``steps`` consecutive optimizer steps."""
    out = []
    for _ in range(steps):
        out.append(scheduler())
        scheduler.step()
    return out


def small_xcit():
    return XCiT(patch_size=16, num_classes=10, embed_dim=32, depth=2, num_heads=2)


def test_schedule_values():
    values = lrs(build_lr_scheduler(make_config(), steps_per_epoch=10, world_size=1), 102)
    # warmup: 50 steps from START to PEAK; cosine: the remaining 50 steps down to END
    assert values[0] == pytest.approx(START)
    assert values[25] == pytest.approx(START + (PEAK - START) / 2)
    assert values[49] == pytest.approx(START + (PEAK - START) * 49 / 50)
    assert values[50] == pytest.approx(PEAK)
    assert values[75] == pytest.approx((PEAK + END) / 2)
    assert values[99] == pytest.approx(END + (PEAK - END) * (1 + math.cos(math.pi * 49 / 50)) / 2)
    assert values[100] == values[101] == pytest.approx(END)
    assert max(values) == pytest.approx(PEAK)
    assert all(a >= b for a, b in zip(values[50:], values[51:]))


def test_schedule_without_warmup_starts_at_peak():
    values = lrs(build_lr_scheduler(make_config('TRAIN.WARMUP_EPOCHS', 0), 4, 1), 41)
    assert values[0] == pytest.approx(PEAK)
    assert values[20] == pytest.approx((PEAK + END) / 2)
    assert values[40] == pytest.approx(END)


@pytest.mark.parametrize('world_size, accum, scaled, expected', [
    (1, 1, 512, PEAK),
    (4, 1, 512, 4 * PEAK),
    (2, 4, 512, 8 * PEAK),
    (8, 2, 256, 32 * PEAK),
    (8, 2, 0, 5e-4),  # no scaling
])
def test_peak_scales_with_global_batch(world_size, accum, scaled, expected):
    config = make_config('TRAIN.ACCUM_ITER', accum, 'TRAIN.LINEAR_SCALED_LR', scaled)
    values = lrs(build_lr_scheduler(config, steps_per_epoch=10, world_size=world_size), 51)
    assert values[50] == pytest.approx(expected)
    assert values[0] == pytest.approx(START)


def test_schedules_that_defeat_warmup_and_decay_are_named():
    """A warmup as long as the run never reaches the cosine; an END_LR above the scaled peak
    (1.25e-4 / 16 at batch 8 on one process) turns the decay into a rise; otherwise no message."""
    assert schedule_warnings(make_config(), 1) == []
    long_warmup, high_end = schedule_warnings(make_config('TRAIN.WARMUP_EPOCHS', 10, 'DATA.BATCH_SIZE', 8), 1)
    assert long_warmup == ('TRAIN.WARMUP_EPOCHS (10) is not below TRAIN.NUM_EPOCHS (10): the learning rate warms '
                           'up for the whole run and never decays')
    assert high_end == ('TRAIN.END_LR (1.000e-05) is above the peak learning rate (7.813e-06, TRAIN.BASE_LR scaled '
                        'by the global batch): the cosine raises the learning rate')
    assert schedule_warnings(make_config('DATA.BATCH_SIZE', 8), 2) == []  # peak 1.56e-5 on two processes


def test_schedule_state_round_trip_through_the_optimizer():
    model = small_xcit()
    scheduler = build_lr_scheduler(make_config(), 10, 1)
    optimizer = build_optimizer(make_config(), model, scheduler)
    lrs(scheduler, 37)
    state = optimizer.state_dict()
    expected = lrs(scheduler, 20)

    resumed = build_lr_scheduler(make_config(), 10, 1)
    build_optimizer(make_config(), model, resumed).set_state_dict(state)
    assert resumed.last_epoch == 37
    assert lrs(resumed, 20) == expected

    fresh = build_lr_scheduler(make_config(), 10, 1)
    fresh.set_state_dict(scheduler.state_dict())
    assert fresh() == scheduler()


def test_bad_steps_per_epoch():
    with pytest.raises(ValueError, match='steps_per_epoch'):
        build_lr_scheduler(make_config(), 0, 1)


def expected_no_decay_names(depth=2, cls_attn_layers=2):
    """Every 1-D parameter of the small XCiT, plus cls_token, written out."""
    names = ['cls_token', 'norm.weight', 'norm.bias', 'head.bias', 'pos_embeder.token_projection.bias']
    names += [f'patch_embed.proj.{i}.1.{w}' for i in (0, 2, 4, 6) for w in ('weight', 'bias')]
    for b in range(depth):
        names += [f'blocks.{b}.{n}' for n in (
            'gamma1', 'gamma2', 'gamma3', 'norm1.weight', 'norm1.bias', 'norm2.weight', 'norm2.bias',
            'norm3.weight', 'norm3.bias', 'attn.qkv.bias', 'attn.proj.bias', 'local_mp.conv1.bias',
            'local_mp.conv2.bias', 'local_mp.bn.weight', 'local_mp.bn.bias', 'mlp.fc1.bias', 'mlp.fc2.bias')]
    for b in range(cls_attn_layers):
        names += [f'cls_attn_blocks.{b}.{n}' for n in (
            'gamma1', 'gamma2', 'norm1.weight', 'norm1.bias', 'norm2.weight', 'norm2.bias',
            'attn.qkv.bias', 'attn.proj.bias', 'mlp.fc1.bias', 'mlp.fc2.bias')]
    return set(names)


def group_names(model, groups):
    names = {id(p): n for n, p in model.named_parameters()}
    return [{names[id(p)] for p in g['params']} for g in groups]


def test_weight_decay_groups_by_parameter_name():
    model = small_xcit()
    groups = param_groups_weight_decay(model, 0.05)
    assert [g['weight_decay'] for g in groups] == [0.0, 0.05]
    no_decay, decay = group_names(model, groups)
    assert no_decay == expected_no_decay_names()
    trainable = {n for n, p in model.named_parameters() if not p.stop_gradient}
    assert decay == trainable - no_decay
    # the official run decays the (heads, 1, 1) temperatures and the positional projection
    assert {'blocks.0.attn.temperature', 'blocks.1.attn.temperature',
            'pos_embeder.token_projection.weight', 'head.weight'} <= decay
    assert not any(n.endswith(('._mean', '._variance')) for n in no_decay | decay)  # BN statistics


def test_weight_decay_groups_match_the_official_rule_on_official_names():
    """timm 0.4's add_weight_decay on the official xcit_nano_12_p16 state dict: no decay for
    1-D tensors, '.bias' names and the official no_weight_decay() names."""
    with open(os.path.join(GOLDEN, 'official_state_dict_manifest.json')) as f:
        official = json.load(f)['xcit_nano_12_p16']['state_dict']
    buffers = ('.running_mean', '.running_var', '.num_batches_tracked')
    skip = {'pos_embed', 'cls_token', 'dist_token'}
    official_no_decay = {n for n, shape in official.items()
                         if not n.endswith(buffers) and (len(shape) == 1 or n.endswith('.bias') or n in skip)}
    model = build_xcit(get_config(os.path.join(ROOT, 'configs', 'xcit_nano_12_p16_224.yaml')))
    no_decay, decay = group_names(model, param_groups_weight_decay(model, 0.05))
    assert no_decay == official_no_decay
    assert len(decay) + len(no_decay) == sum(1 for n in official if not n.endswith(buffers))


def test_frozen_parameters_are_left_out():
    model = small_xcit()
    model.head.weight.stop_gradient = True
    no_decay, decay = group_names(model, param_groups_weight_decay(model, 0.05))
    assert 'head.weight' not in decay | no_decay


@pytest.mark.parametrize('after_sgd', [False, True])
def test_adamw_decays_only_the_decay_group(after_sgd):
    """One step with zero gradients: Adam's update is 0, so only the decoupled decay moves weights.
    The same after an SGD optimizer was built for the model: its per-parameter exclusions (an L2
    regularizer of 0 on the no-decay group) do not change what AdamW does."""
    paddle.seed(0)
    model = small_xcit()
    if after_sgd:
        build_optimizer(make_config('TRAIN.OPTIMIZER.NAME', 'SGD'), model, 0.1)
    config = make_config('TRAIN.WEIGHT_DECAY', 0.5, 'TRAIN.WARMUP_EPOCHS', 0)
    optimizer = build_optimizer(config, model, build_lr_scheduler(config, 10, 1))
    before = {n: p.numpy().copy() for n, p in model.named_parameters()}
    sum(p.sum() for p in model.parameters() if not p.stop_gradient).scale(0.0).backward()
    optimizer.step()
    for name, p in model.named_parameters():
        if p.stop_gradient:
            continue
        factor = 1.0 if name in expected_no_decay_names() else 1.0 - PEAK * 0.5
        np.testing.assert_allclose(p.numpy(), before[name] * factor, rtol=1e-6, atol=1e-9, err_msg=name)
    decayed = model.blocks[0].attn.temperature.numpy()
    assert np.all(decayed < before['blocks.0.attn.temperature'])


def test_optimizer_settings():
    model = small_xcit()
    config = make_config('TRAIN.OPTIMIZER.BETAS', [0.8, 0.95], 'TRAIN.OPTIMIZER.EPS', 1e-6,
                         'TRAIN.GRAD_CLIP', 2.5)
    optimizer = build_optimizer(config, model, build_lr_scheduler(config, 10, 1))
    assert (optimizer._beta1, optimizer._beta2, optimizer._epsilon) == (0.8, 0.95, 1e-6)
    assert isinstance(optimizer._grad_clip, paddle.nn.ClipGradByGlobalNorm)
    assert optimizer._grad_clip.clip_norm == 2.5
    # one flat list, so the clip norm is global rather than per group
    assert not isinstance(optimizer._parameter_list[0], dict)
    no_clip = build_optimizer(make_config(), model, build_lr_scheduler(make_config(), 10, 1))
    assert no_clip._grad_clip is None
    config = make_config()
    config.defrost()
    config.TRAIN.OPTIMIZER.NAME = 'Adam'
    with pytest.raises(ValueError, match="TRAIN.OPTIMIZER.NAME: AdamW or SGD, got 'Adam'"):
        build_optimizer(config, model, None)


def test_gradient_clipping_is_global_across_decay_groups():
    """Gradients 3 (a decayed weight) and 4 (a bias), global norm 5, clipped to 1 -> 0.6 and 0.8.

    With a huge epsilon Adam's first step is lr * g / (|g| + eps), linear enough in g to tell a
    global clip from a per-group one (which would give 1 and 1).
    """
    layer = paddle.nn.Linear(1, 1)
    config = make_config('TRAIN.GRAD_CLIP', 1.0, 'TRAIN.WEIGHT_DECAY', 0.0, 'TRAIN.WARMUP_EPOCHS', 0,
                         'TRAIN.OPTIMIZER.EPS', 1e3)
    optimizer = build_optimizer(config, layer, build_lr_scheduler(config, 10, 1))
    w, b = layer.weight.item(), layer.bias.item()
    (layer.weight.sum() * 3 + layer.bias.sum() * 4).backward()
    optimizer.step()
    assert layer.weight.item() == pytest.approx(w - PEAK * 0.6 / (0.6 + 1e3), rel=1e-6, abs=1e-9)
    assert layer.bias.item() == pytest.approx(b - PEAK * 0.8 / (0.8 + 1e3), rel=1e-6, abs=1e-9)


def test_sgd_steps_as_torch_sgd_with_l2_decay_on_the_decay_group():
    """Two steps of SGD with momentum m and weight decay wd (torch.optim.SGD's rule): v = m v + g + wd p,
    then p -= lr v, where the no-decay group (the bias) gets no wd term."""
    layer = paddle.nn.Linear(2, 1)
    config = make_config('TRAIN.OPTIMIZER.NAME', 'SGD', 'TRAIN.OPTIMIZER.MOMENTUM', 0.5,
                         'TRAIN.WEIGHT_DECAY', 0.1, 'TRAIN.WARMUP_EPOCHS', 0, 'TRAIN.NUM_EPOCHS', 1000)
    optimizer = build_optimizer(config, layer, build_lr_scheduler(config, 10, 1))
    assert isinstance(optimizer, paddle.optimizer.Momentum)
    w, b = layer.weight.numpy().astype(np.float64), layer.bias.numpy().astype(np.float64)
    velocity_w, velocity_b = np.zeros_like(w), np.zeros_like(b)
    x = np.array([[1.0, -2.0]], np.float32)
    for _ in range(2):
        lr = optimizer.get_lr()
        layer(paddle.to_tensor(x)).sum().backward()  # gradients: x for the weight, 1 for the bias
        optimizer.step()
        optimizer.clear_grad()
        velocity_w = 0.5 * velocity_w + x.T + 0.1 * w
        velocity_b = 0.5 * velocity_b + 1.0
        w, b = w - lr * velocity_w, b - lr * velocity_b
        np.testing.assert_allclose(layer.weight.numpy(), w, rtol=1e-6)
        np.testing.assert_allclose(layer.bias.numpy(), b, rtol=1e-6)


def test_sgd_clips_the_global_gradient_norm():
    """Gradients 3 (a decayed weight) and 4 (a bias), global norm 5, clipped to 1 -> 0.6 and 0.8
    (a per-group clip would give 1 and 1); the clip comes before the weight decay, as in torch."""
    layer = paddle.nn.Linear(1, 1)
    config = make_config('TRAIN.OPTIMIZER.NAME', 'SGD', 'TRAIN.OPTIMIZER.MOMENTUM', 0.0, 'TRAIN.GRAD_CLIP', 1.0,
                         'TRAIN.WEIGHT_DECAY', 0.5, 'TRAIN.WARMUP_EPOCHS', 0)
    optimizer = build_optimizer(config, layer, build_lr_scheduler(config, 10, 1))
    w, b = layer.weight.item(), layer.bias.item()
    (layer.weight.sum() * 3 + layer.bias.sum() * 4).backward()
    optimizer.step()
    assert layer.weight.item() == pytest.approx(w - PEAK * (0.6 + 0.5 * w), rel=1e-6)
    assert layer.bias.item() == pytest.approx(b - PEAK * 0.8, rel=1e-6)


@pytest.mark.parametrize('opts, message', [
    (['TRAIN.OPTIMIZER.MOMENTUM', 0.8], "TRAIN.OPTIMIZER.MOMENTUM is set (0.8) but only SGD reads it, and "
                                        "TRAIN.OPTIMIZER.NAME is 'AdamW'"),
    (['TRAIN.OPTIMIZER.NAME', 'SGD', 'TRAIN.OPTIMIZER.BETAS', [0.8, 0.9]],
     "TRAIN.OPTIMIZER.BETAS is set ([0.8, 0.9]) but only AdamW reads it, and TRAIN.OPTIMIZER.NAME is 'SGD'"),
    (['TRAIN.OPTIMIZER.NAME', 'Adam'], "TRAIN.OPTIMIZER.NAME must be 'AdamW' or 'SGD', got 'Adam'"),
    (['TRAIN.OPTIMIZER.NAME', 'SGD', 'TRAIN.OPTIMIZER.MOMENTUM', 1.0], 'TRAIN.OPTIMIZER.MOMENTUM must be in [0, 1)'),
])
def test_optimizer_settings_of_the_other_optimizer_are_refused(tmp_path, opts, message):
    cfg = tmp_path / 'sgd.yaml'
    cfg.write_text('TRAIN:\n  OPTIMIZER:\n' + ''.join(f'    {k.split(".")[-1]}: {v}\n'
                                                        for k, v in zip(opts[::2], opts[1::2])))
    with pytest.raises(ConfigError, match=re.escape(f'{cfg}: {message}')):
        get_config(str(cfg))


def test_sgd_momentum_survives_a_resume():
    """The velocity is in the optimizer's state dict: a resumed optimizer takes the next step as the
    original does (each run in a fresh name scope, as in a new process)."""
    config = make_config('TRAIN.OPTIMIZER.NAME', 'SGD', 'TRAIN.WEIGHT_DECAY', 0.1, 'TRAIN.WARMUP_EPOCHS', 0)
    x = paddle.to_tensor([[1.0, -2.0]])

    def run(steps, start=None):
        """-> (the layer's weight after ``steps`` steps, the weights and optimizer state after all
        but the last); ``start`` = such a pair to continue from."""
        with paddle.utils.unique_name.guard():
            layer = paddle.nn.Linear(2, 1)
            optimizer = build_optimizer(config, layer, build_lr_scheduler(config, 10, 1))
            if start:
                layer.set_state_dict(start[0])
                optimizer.set_state_dict(start[1])
            for step in range(steps):
                if step == steps - 1:
                    saved = ({k: v.clone() for k, v in layer.state_dict().items()},
                             {k: v.clone() if isinstance(v, paddle.Tensor) else v
                              for k, v in optimizer.state_dict().items()})
                layer(x).sum().backward()
                optimizer.step()
                optimizer.clear_grad()
            return layer.weight.numpy(), saved

    weight, saved = run(4)
    np.testing.assert_array_equal(run(1, start=saved)[0], weight)
    schedule_only = {'LR_Scheduler': saved[1]['LR_Scheduler']}
    assert not np.allclose(run(1, start=(saved[0], schedule_only))[0], weight)  # without the velocity


def test_bias_names_are_not_decayed_whatever_their_shape():
    """A parameter named '.bias' goes to the no-decay group even when it has two dimensions."""
    class TwoDimBias(paddle.nn.Layer):
        def __init__(self):
            super().__init__()
            self.proj = paddle.nn.Linear(3, 4)
            self.proj.bias = self.proj.create_parameter([2, 4], is_bias=True)

    model = TwoDimBias()
    no_decay, decay = group_names(model, param_groups_weight_decay(model, 0.05))
    assert (no_decay, decay) == ({'proj.bias'}, {'proj.weight'})


def test_sgd_decays_with_the_configured_weight_decay_over_a_parameters_own_regularizer():
    """A decayed weight whose ParamAttr carries its own L2 regularizer (0.9) decays with
    TRAIN.WEIGHT_DECAY (0.1): one step with a zero gradient multiplies it by 1 - lr * 0.1."""
    layer = paddle.nn.Linear(2, 1, weight_attr=paddle.ParamAttr(regularizer=paddle.regularizer.L2Decay(0.9)))
    config = make_config('TRAIN.OPTIMIZER.NAME', 'SGD', 'TRAIN.OPTIMIZER.MOMENTUM', 0.0, 'TRAIN.WEIGHT_DECAY', 0.1,
                         'TRAIN.WARMUP_EPOCHS', 0)
    optimizer = build_optimizer(config, layer, build_lr_scheduler(config, 10, 1))
    w, b = layer.weight.numpy().copy(), layer.bias.numpy().copy()
    layer(paddle.to_tensor([[1.0, -2.0]])).sum().scale(0.0).backward()
    optimizer.step()
    np.testing.assert_allclose(layer.weight.numpy(), w * (1 - PEAK * 0.1), rtol=1e-6)
    np.testing.assert_array_equal(layer.bias.numpy(), b)
