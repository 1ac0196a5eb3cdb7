"""Model behaviour that needs no checkpoint: output types, shapes, initialisation."""
import numpy as np
import paddle
import paddle.nn.functional as F
import pytest

from config import get_config
import xcit
from xcit import XCiT, build_xcit


def tiny(**kw):
    args = dict(patch_size=16, num_classes=7, embed_dim=32, depth=2, num_heads=2)
    args.update(kw)
    return XCiT(**args)


@pytest.mark.parametrize('mode', ['train', 'eval'])
def test_forward_returns_logits_tensor_in_both_modes(mode):
    model = tiny()
    getattr(model, mode)()
    out = model(paddle.randn([2, 3, 48, 80]))
    assert isinstance(out, paddle.Tensor)
    assert out.shape == [2, 7]


@pytest.mark.parametrize('patch,size,grid', [(16, (33, 50), (3, 4)), (8, (17, 24), (3, 3))])
def test_stem_rounds_up_odd_sizes(patch, size, grid):
    model = tiny(patch_size=patch)
    tokens, hw = model.patch_embed(paddle.randn([1, 3, *size]))
    assert tuple(hw) == grid
    assert tokens.shape == [1, grid[0] * grid[1], 32]


def test_forward_features_is_final_norm_class_token():
    model = tiny()
    model.eval()
    feats = model.forward_features(paddle.randn([3, 3, 32, 32])).numpy()
    assert feats.shape == (3, 32)
    # LayerNorm with weight 1 and bias 0 at init: zero mean, unit variance per row
    np.testing.assert_allclose(feats.mean(1), 0, atol=1e-5)
    np.testing.assert_allclose(feats.var(1), 1, atol=1e-3)


def test_initialisation_matches_official():
    paddle.seed(0)
    model = tiny(eta=1e-5)
    params = dict(model.named_parameters())
    gammas = [name for name in params if name.rsplit('.', 1)[-1] in ('gamma1', 'gamma2', 'gamma3')]
    assert len(gammas) == 2 * 3 + 2 * 2  # XCA blocks: gamma1-3, class-attention blocks: gamma1-2
    for name in gammas:
        assert np.all(params[name].numpy() == np.float32(1e-5)), name
    cls_token = params['cls_token'].numpy()  # trunc_normal(std=0.02), as the official code
    assert 0.01 < cls_token.std() < 0.03 and abs(cls_token.mean()) < 0.01
    assert np.all(params['blocks.1.attn.temperature'].numpy() == 1.0)
    assert np.all(params['head.bias'].numpy() == 0)
    w = params['blocks.0.mlp.fc1.weight'].numpy()
    assert abs(w.std() - 0.02) < 0.002 and abs(w.mean()) < 0.002
    assert np.all(params['norm.weight'].numpy() == 1) and np.all(params['norm.bias'].numpy() == 0)


@pytest.mark.parametrize('name,fan_in', [('patch_embed.proj.0.0', 3 * 9), ('patch_embed.proj.2.0', 8 * 9),
                                         ('blocks.0.local_mp.conv1', 9), ('blocks.1.local_mp.conv2', 9),
                                         ('pos_embeder.token_projection', 64)])
def test_convolutions_are_initialised_as_torchs(name, fan_in):
    """The official code leaves its convolutions at torch's default, Uniform(-b, b) for weight and
    bias with b = 1 / sqrt(fan_in), fan_in counting the input channels of one group."""
    params = dict(tiny(embed_dim=64).named_parameters())
    bound = fan_in ** -0.5
    weight = params[f'{name}.weight'].numpy()
    assert np.abs(weight).max() <= bound and abs(weight.std() - bound / 3 ** 0.5) < 0.15 * bound
    if f'{name}.bias' in params:
        bias = params[f'{name}.bias'].numpy()
        assert np.abs(bias).max() <= bound and bias.std() > 0.3 * bound


def test_batchnorm_running_variance_takes_the_unbiased_batch_variance_as_torchs():
    """torch's BatchNorm, which the official training ran, moves its running variance towards
    the batch variance over n - 1 (Paddle's kernel over n); normalising uses the biased one."""
    model = tiny()
    batchnorms = [layer for layer in model.sublayers() if isinstance(layer, paddle.nn.BatchNorm2D)]
    assert len(batchnorms) == 4 + 2 and all(isinstance(bn, xcit.BatchNorm2D) for bn in batchnorms)
    bn = batchnorms[0]
    bn.train()
    x = np.random.default_rng(0).standard_normal((2, 4, 3, 5)).astype('float32') * 3 + 1
    bn._variance.set_value(np.full([4], 2.0, 'float32'))
    bn._mean.set_value(np.full([4], 0.5, 'float32'))
    out = bn(paddle.to_tensor(x)).numpy()
    np.testing.assert_allclose(bn._variance.numpy(), 0.9 * 2.0 + 0.1 * x.var(axis=(0, 2, 3), ddof=1), rtol=1e-5)
    np.testing.assert_allclose(bn._mean.numpy(), 0.9 * 0.5 + 0.1 * x.mean(axis=(0, 2, 3)), rtol=1e-5)
    normalised = (x - x.mean(axis=(0, 2, 3), keepdims=True)) / np.sqrt(x.var(axis=(0, 2, 3), keepdims=True) + 1e-5)
    np.testing.assert_allclose(out, normalised, atol=1e-5)
    bn.eval()
    before = bn._variance.numpy().copy()
    bn(paddle.to_tensor(x))
    np.testing.assert_array_equal(bn._variance.numpy(), before)


@pytest.mark.parametrize('device, rocm, corrected', [('gpu:0', False, False), ('gpu:0', True, True),
                                                     ('cpu', False, True)])
def test_batchnorm_corrects_the_running_variance_only_where_the_kernel_takes_the_biased_one(
        monkeypatch, device, rocm, corrected):
    """On CUDA GPUs Paddle's batch_norm is cuDNN's, whose running variance takes the unbiased batch
    variance already: correcting it again would add (1 - m) * var / (n - 1) twice. Here on the
    CPU, the kernel's update (biased) shows which path ran."""
    monkeypatch.setattr(paddle, 'get_device', lambda: device)
    monkeypatch.setattr(paddle, 'is_compiled_with_rocm', lambda: rocm)
    bn = xcit.BatchNorm2D(4, momentum=0.9)
    bn.train()
    x = np.random.default_rng(0).standard_normal((2, 4, 3, 5)).astype('float32') * 3 + 1
    bn(paddle.to_tensor(x))
    np.testing.assert_allclose(bn._variance.numpy(), 0.9 + 0.1 * x.var(axis=(0, 2, 3), ddof=1 if corrected else 0),
                               rtol=1e-5)


def test_drop_path_keeps_or_drops_whole_samples_and_rescales_the_kept():
    """Stochastic depth as the official drop_path: in training each sample's branch is, as a whole,
    either zero or divided by the keep probability 1 - rate, kept with that probability, drawn per
    sample; in eval mode, and with rate 0, the branch passes unchanged."""
    paddle.seed(0)
    layer = xcit.DropPath(0.25)
    layer.train()
    x = np.random.default_rng(0).uniform(1, 2, (4000, 3, 2)).astype('float32')
    factors = layer(paddle.to_tensor(x)).numpy() / x
    kept = factors[:, 0, 0] != 0
    np.testing.assert_allclose(factors, np.broadcast_to(np.where(kept, 1 / 0.75, 0.0)[:, None, None], x.shape),
                               rtol=1e-6)
    assert abs(kept.mean() - 0.75) < 0.03
    layer.eval()
    np.testing.assert_array_equal(layer(paddle.to_tensor(x)).numpy(), x)
    off = xcit.DropPath(0.0)
    off.train()
    np.testing.assert_array_equal(off(paddle.to_tensor(x)).numpy(), x)


class Zero(paddle.nn.Layer):
    def forward(self, x):
        return x * 0


def test_xca_block_drops_each_of_its_three_branches_by_drop_path():
    """The XCA, LPI and MLP branches of an XCA block all go through drop path: with each dropped,
    the block returns its input; the layers themselves still change it."""
    model = tiny(drop_path_rate=0.5)
    model.train()
    block = model.blocks[0]
    x = paddle.randn([2, 6, 32])
    assert not np.allclose(block(x, 2, 3).numpy(), x.numpy())
    block.drop_path = Zero()
    np.testing.assert_array_equal(block(x, 2, 3).numpy(), x.numpy())


def test_training_applies_every_dropout_of_the_model_at_its_rate():
    """As in the official code, drop_rate applies after the positional encoding, after each
    attention projection and twice in each MLP, attn_drop_rate to the attention weights; in a
    training forward pass every one of them runs (the MLP's twice), in XCA and class-attention
    blocks alike."""
    model = tiny(drop_rate=0.1, attn_drop_rate=0.2)
    calls = {}
    for name, layer in model.named_sublayers():
        if isinstance(layer, paddle.nn.Dropout):
            layer.register_forward_post_hook(
                lambda layer, inputs, output, name=name: calls.__setitem__(name, calls.get(name, 0) + 1))
    model.train()
    model(paddle.randn([2, 3, 32, 32]))
    expected = {'pos_drop': 1}
    for block in ('blocks.0', 'blocks.1', 'cls_attn_blocks.0', 'cls_attn_blocks.1'):
        expected.update({f'{block}.attn.attn_drop': 1, f'{block}.attn.proj_drop': 1, f'{block}.mlp.drop': 2})
    assert calls == expected
    rates = {name: layer.p for name, layer in model.named_sublayers() if isinstance(layer, paddle.nn.Dropout)}
    assert rates == {name: 0.2 if name.endswith('attn_drop') else 0.1 for name in expected}


def test_positional_dropout_takes_the_tokens_with_their_encoding():
    """pos_drop comes after the positional encoding is added, as in the official code."""
    model = tiny(drop_rate=0.1)
    model.eval()
    seen = []
    model.pos_drop.register_forward_pre_hook(lambda layer, inputs: seen.append(inputs[0].numpy()))
    images = paddle.randn([2, 3, 32, 48])
    with paddle.no_grad():
        model(images)
        tokens, (Hp, Wp) = model.patch_embed(images)
        expected = (tokens + model.pos_embeder(Hp, Wp)).numpy()
    assert len(seen) == 1
    np.testing.assert_allclose(seen[0], expected, rtol=1e-6, atol=1e-6)


def test_mlp_drops_after_the_activation_and_after_fc2():
    """Mlp in training: dropout(fc2(dropout(gelu(fc1(x))))) with the same draws, the output scaled."""
    paddle.seed(1)
    mlp = xcit.Mlp(8, 16, drop=0.5)
    mlp.train()
    x, scale = paddle.randn([2, 5, 8]), paddle.linspace(0.5, 1.5, 8)
    paddle.seed(4)
    out = mlp(x, scale=scale).numpy()
    paddle.seed(4)
    hidden = F.dropout(F.gelu(paddle.matmul(x, mlp.fc1.weight) + mlp.fc1.bias), 0.5)
    expected = F.dropout((paddle.matmul(hidden, mlp.fc2.weight) + mlp.fc2.bias) * scale, 0.5).numpy()
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    assert np.count_nonzero(out == 0) > out.size // 4


def test_build_xcit_reads_every_architecture_key():
    config = get_config()
    config.defrost()
    config.MODEL.update(dict(PATCH_SIZE=8, EMBED_DIM=48, DEPTH=3, NUM_HEADS=3, MLP_RATIO=2.0,
                             QKV_BIAS=False, ETA=0.5, TOKENS_NORM=True, CLS_ATTN_LAYERS=1,
                             USE_POS=False, NUM_CLASSES=5, DROPPATH=0.1, DROPOUT=0.2, ATTENTION_DROPOUT=0.3))
    model = build_xcit(config)
    assert len(model.patch_embed.proj) == 5  # 3 conv stages, 2 GELUs
    assert len(model.blocks) == 3 and len(model.cls_attn_blocks) == 1
    assert model.blocks[0].mlp.fc1.weight.shape == [48, 96]
    assert model.blocks[0].attn.qkv.bias is None
    assert model.cls_attn_blocks[0].tokens_norm and not model.use_pos
    assert [blk.drop_path.drop_prob for blk in model.blocks] == [0.1] * 3  # one rate for all, as officially
    assert not any(isinstance(layer, xcit.DropPath) for layer in model.cls_attn_blocks.sublayers())
    assert [blk.attn.num_heads for blk in model.blocks] + [model.cls_attn_blocks[0].attn.num_heads] == [3] * 4
    assert model.pos_drop.p == 0.2 and model.blocks[1].mlp.drop.p == 0.2 and model.blocks[1].attn.proj_drop.p == 0.2
    assert model.blocks[1].attn.attn_drop.p == 0.3 and model.cls_attn_blocks[0].attn.attn_drop.p == 0.3
    assert float(model.blocks[0].gamma2.numpy()[0]) == 0.5
    assert model.head.weight.shape == [48, 5]


def test_reset_classifier_for_other_classes():
    model = tiny()
    model.eval()
    images = paddle.randn([2, 3, 32, 32])
    features = model.forward_features(images).numpy()
    model.reset_classifier(5)
    head = model.get_classifier()
    assert model.num_classes == 5 and model(images).shape == [2, 5]
    assert list(model.state_dict()['head.weight'].shape) == [32, 5]
    assert np.all(head.bias.numpy() == 0) and 0.005 < head.weight.numpy().std() < 0.03  # trunc_normal(0.02)
    model.reset_classifier(0)
    assert 'head.weight' not in model.state_dict()
    np.testing.assert_array_equal(model(images).numpy(), features)


def test_frozen_backbone_trains_the_head_alone_on_inference_features():
    model = XCiT(patch_size=16, num_classes=4, embed_dim=32, depth=2, num_heads=2, drop_path_rate=0.5,
                 drop_rate=0.3)
    images = paddle.randn([3, 3, 32, 32])
    model.eval()
    expected = model(images).numpy()
    model.freeze_backbone()
    model.train()
    assert model.training and model.head.training
    assert not any(layer.training for layer in model.sublayers() if layer is not model.head)
    trainable = [name for name, p in model.named_parameters() if not p.stop_gradient]
    assert trainable == ['head.weight', 'head.bias']
    mean = model.blocks[0].local_mp.bn._mean.numpy().copy()
    logits = model(images)  # no drop path, no dropout, BatchNorm on its running statistics
    np.testing.assert_allclose(logits.numpy(), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(model.blocks[0].local_mp.bn._mean.numpy(), mean)
    logits.sum().backward()
    assert model.head.weight.grad is not None and model.cls_token.grad is None
    model.freeze_backbone(False)
    assert all(layer.training for layer in model.sublayers())
    assert all(not p.stop_gradient for name, p in model.named_parameters() if not name.endswith(('_mean', '_variance')))
    # the BatchNorm running statistics stay without gradient, out of the optimizer's parameters
    statistics = [p for name, p in model.named_parameters() if name.endswith(('_mean', '_variance'))]
    assert len(statistics) == 2 * (4 + 2) and all(p.stop_gradient for p in statistics)


def training_step(model, images, state, checkpointing, frozen_embedding):
    """One forward/backward from ``state`` with a fixed generator seed; returns the loss, the
    gradients and the state after the step (BatchNorm running statistics included)."""
    model.set_state_dict(state)
    model.set_grad_checkpointing(checkpointing)
    for param in model.patch_embed.parameters() + model.pos_embeder.parameters():
        param.stop_gradient = frozen_embedding or not param.trainable
    model.clear_gradients()
    paddle.seed(3)  # drop path draws
    loss = model(images).square().mean()
    loss.backward()
    grads = {n: p.grad.numpy() for n, p in model.named_parameters() if p.grad is not None}
    return float(loss), grads, {k: v.numpy() for k, v in model.state_dict().items()}


@pytest.mark.parametrize('frozen_embedding', [False, True])
def test_grad_checkpointing_changes_nothing_but_memory(monkeypatch, frozen_embedding):
    """Recomputed XCA blocks give the same loss, gradients and BatchNorm statistics, with the
    same drop-path draws. A block whose input needs no gradient (frozen stem and positional
    encoding) runs normally: recomputing it would lose its own parameters' gradients."""
    import xcit
    calls, recompute = [], xcit.recompute

    def counted_recompute(fn, *args):
        calls.append(fn)
        return recompute(fn, *args)
    monkeypatch.setattr(xcit, 'recompute', counted_recompute)
    paddle.seed(0)
    model = tiny(depth=3, drop_path_rate=0.5)
    model.train()
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    images = paddle.randn([2, 3, 48, 64])
    plain = training_step(model, images, state, False, frozen_embedding)
    assert calls == []
    checkpointed = training_step(model, images, state, True, frozen_embedding)
    assert len(calls) == (2 if frozen_embedding else 3)
    assert checkpointed[0] == plain[0]
    for got, expected in zip(checkpointed[1:], plain[1:]):
        assert got.keys() == expected.keys()
        for name in expected:
            np.testing.assert_array_equal(got[name], expected[name], err_msg=name)
    assert 'blocks.0.attn.qkv.weight' in plain[1]
    assert ('patch_embed.proj.0.0.weight' in plain[1]) is not frozen_embedding
    assert not np.array_equal(plain[2]['blocks.0.local_mp.bn._mean'], state['blocks.0.local_mp.bn._mean'])
    model.eval()
    with paddle.no_grad():
        model(images)
    assert len(calls) == (2 if frozen_embedding else 3)  # evaluation never recomputes


def test_class_attention_maps_need_a_class_attention_block():
    """Without class-attention blocks there is no attention of the class token to map: a clear
    error, while the model still classifies (its class token through the final norm)."""
    model = tiny(cls_attn_layers=0)
    model.eval()
    images = paddle.randn([2, 3, 32, 32])
    with pytest.raises(ValueError, match=r'this XCiT has no class-attention blocks \(cls_attn_layers=0\)'):
        model.class_attention_maps(images)
    assert model(images).shape == [2, 7]


def test_forward_intermediates_are_block_outputs_as_maps():
    model = tiny(depth=4)
    model.eval()
    images = paddle.randn([2, 3, 48, 80])
    with paddle.no_grad():
        tokens, (Hp, Wp) = model.patch_embed(images)
        tokens = tokens + model.pos_embeder(Hp, Wp)
        outputs = []
        for blk in model.blocks:
            tokens = blk(tokens, Hp, Wp)
            outputs.append(tokens.numpy())
        maps = [m.numpy() for m in model.forward_intermediates(images, [0, -2])]
        last_two = [m.numpy() for m in model.forward_intermediates(images, 2)]
    assert [m.shape for m in maps] == [(2, 32, 3, 5)] * 2
    for got, block in zip(maps + last_two, [0, 2, 2, 3]):
        np.testing.assert_array_equal(got, outputs[block].transpose(0, 2, 1).reshape(2, 32, 3, 5))
    with pytest.raises(ValueError, match=r'block indices \[4\] do not select among the 4 XCA blocks'):
        model.forward_intermediates(images, [4])
    with pytest.raises(ValueError, match=r'block indices \[1, -5\] do not select among the 4 XCA blocks'):
        model.forward_intermediates(images, [1, -5])  # -5 is no block of 4, not block -1
    for count in (0, 5, 7):  # 5 and 7 would wrap around to blocks counted from the end
        with pytest.raises(ValueError, match=f'the last {count} blocks: there are 4 XCA blocks'):
            model.forward_intermediates(images, count)
