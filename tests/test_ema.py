"""ModelEma: a frozen copy whose parameters and BatchNorm statistics follow the EMA formula."""
import numpy as np
import paddle
import pytest

from ema import ModelEma, fixed_entries
from xcit import XCiT


def small_xcit():
    return XCiT(patch_size=16, num_classes=10, embed_dim=32, depth=2, num_heads=2)


def snapshot(layer):
    return {k: v.numpy().copy() for k, v in layer.state_dict().items()}


def perturb(model, rng):
    """Gives every state-dict entry (parameters and BN statistics) new random values."""
    with paddle.no_grad():
        for name, value in model.state_dict().items():
            new = rng.normal(size=value.shape)
            if name.endswith('_variance'):
                new = np.abs(new) + 0.5
            value.set_value(new.astype('float32'))


def test_copy_is_frozen_eval_and_independent():
    paddle.seed(0)
    model = small_xcit()
    model.train()
    ema = ModelEma(model, 0.99)
    assert not ema.module.training and all(not layer.training for layer in ema.module.sublayers())
    assert all(p.stop_gradient for p in ema.module.parameters())
    assert model.training and not model.cls_token.stop_gradient
    start = snapshot(model)
    for name, value in snapshot(ema.module).items():
        np.testing.assert_array_equal(value, start[name])
    perturb(model, np.random.default_rng(1))
    for name, value in snapshot(ema.module).items():
        np.testing.assert_array_equal(value, start[name], err_msg=f'{name} follows the model')


def test_update_averages_parameters_and_buffers():
    paddle.seed(0)
    rng = np.random.default_rng(0)
    model = small_xcit()
    decay = 0.9
    ema = ModelEma(model, decay)
    expected = snapshot(model)
    for _ in range(2):
        perturb(model, rng)
        current = snapshot(model)
        ema.update(model)
        expected = {k: decay * expected[k] + (1 - decay) * current[k] for k in expected}
    got = snapshot(ema.module)
    assert set(got) == set(expected)
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-5, atol=1e-6, err_msg=name)
    # BatchNorm running statistics are averaged too (timm's ModelEma / ModelEmaV2)
    assert 'blocks.0.local_mp.bn._mean' in got and 'patch_embed.proj.0.1._variance' in got


def test_frozen_backbone_stays_exact_and_the_head_is_averaged():
    """With ``freeze_backbone`` only the head can change: the EMA keeps the rest bit for bit
    (decay * w + (1 - decay) * w is not always w in float32) and averages the head."""
    paddle.seed(0)
    model = small_xcit()
    model.freeze_backbone()
    model.train()
    decay = 0.9
    ema = ModelEma(model, decay)
    start = snapshot(model)
    with paddle.no_grad():
        model.head.weight.set_value(model.head.weight.numpy() + 1.0)
    for _ in range(3):
        ema.update(model)
    got = snapshot(ema.module)
    for name, value in start.items():
        if name.startswith('head.weight'):
            np.testing.assert_allclose(value + (1 - decay ** 3), got[name], rtol=1e-5, err_msg=name)
        else:
            np.testing.assert_array_equal(got[name], value, err_msg=name)


def test_decay_one_keeps_and_decay_zero_copies():
    paddle.seed(0)
    model = small_xcit()
    start = snapshot(model)
    keep, copy = ModelEma(model, 1.0), ModelEma(model, 0.0)
    perturb(model, np.random.default_rng(2))
    keep.update(model)
    copy.update(model)
    now = snapshot(model)
    for name in start:
        np.testing.assert_array_equal(snapshot(keep.module)[name], start[name])
        np.testing.assert_array_equal(snapshot(copy.module)[name], now[name])


def test_state_dict_round_trip():
    paddle.seed(0)
    model = small_xcit()
    ema = ModelEma(model, 0.5)
    perturb(model, np.random.default_rng(3))
    ema.update(model)
    saved = {k: v.numpy() for k, v in ema.state_dict().items()}

    restored = ModelEma(small_xcit(), 0.5)
    restored.set_state_dict(saved)
    for name, value in snapshot(restored.module).items():
        np.testing.assert_array_equal(value, saved[name])
    x = paddle.randn([2, 3, 32, 32])
    logits = ema.module(x).numpy()
    assert np.isfinite(logits).all()
    np.testing.assert_allclose(restored.module(x).numpy(), logits, rtol=1e-6, atol=1e-6)

    bad = dict(saved)
    del bad['cls_token']
    with pytest.raises(ValueError, match='cls_token'):
        restored.set_state_dict(bad)
    with pytest.raises(ValueError, match='head.weight'):
        restored.set_state_dict({**saved, 'head.weight': np.zeros((3, 3), 'float32')})


def test_bad_decay():
    with pytest.raises(ValueError, match='decay'):
        ModelEma(small_xcit(), 1.5)


def test_fixed_entries_are_the_statistics_of_batchnorm_in_eval_mode_and_frozen_weights():
    """In training mode every entry moves; in eval mode the BatchNorm statistics do not; with a
    frozen backbone (training mode) everything but the head stays, BatchNorm weights included."""
    model = small_xcit()
    model.train()
    assert fixed_entries(model) == set()
    model.eval()
    statistics = {n for n in model.state_dict() if n.endswith(('._mean', '._variance'))}
    assert len(statistics) == 12 and fixed_entries(model) == statistics
    model.freeze_backbone()
    model.train()
    fixed = fixed_entries(model)
    assert fixed == {n for n in model.state_dict() if not n.startswith('head.')}
    assert {'blocks.0.local_mp.bn.weight', 'blocks.0.local_mp.bn._mean', 'patch_embed.proj.0.1.bias'} <= fixed

