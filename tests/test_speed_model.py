"""The rearranged (fast) layers of xcit.py against straightforward references written here.

Each reference follows the official PyTorch code op by op; outputs, input gradients and
parameter gradients must agree to float32 rounding, in eval and train mode, eagerly and
under ``paddle.jit.to_static``.
"""
import copy
import os
import platform
import subprocess
import sys

import numpy as np
import paddle
import paddle.nn.functional as F
import pytest

import xcit

B, H, W, C, HEADS = 3, 5, 7, 24, 3
N = H * W
ATOL = 2e-5
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def randomize(layer, seed):
    """Non-trivial values for every parameter and BatchNorm statistic of ``layer``."""
    rng = np.random.default_rng(seed)
    for name, value in layer.state_dict().items():
        noise = rng.standard_normal(value.shape).astype('float32')
        if name.endswith('_variance') or name.endswith('temperature'):
            noise = np.abs(noise) + 0.5
        value.set_value(noise * (0.3 if value.ndim > 1 else 1.0))
    return layer


def ref_xca(m, x):
    """Official XCA: q, k, v as (B, h, d, N), F.normalize along N, softmax over channels, then
    attention dropout."""
    b, n, c = x.shape
    qkv = F.linear(x, m.qkv.weight, m.qkv.bias).reshape([b, n, 3, m.num_heads, c // m.num_heads])
    q, k, v = qkv.transpose([2, 0, 3, 4, 1]).unbind(0)
    attn = paddle.matmul(F.normalize(q, axis=-1), F.normalize(k, axis=-1), transpose_y=True) * m.temperature
    attn = F.dropout(F.softmax(attn, axis=-1), m.attn_drop.p, training=m.training)
    out = paddle.matmul(attn, v).transpose([0, 3, 1, 2]).reshape([b, n, c])
    return F.linear(out, m.proj.weight, m.proj.bias)


def ref_lpi(m, x, h, w):
    """Official LPI: one (B, C, H, W) image per sample."""
    b, n, c = x.shape
    x = x.transpose([0, 2, 1]).reshape([b, c, h, w])
    x = m.conv2(m.bn(m.act(m.conv1(x))))
    return x.reshape([b, c, n]).transpose([0, 2, 1])


def ref_class_attention(m, x):
    """Official class attention: the class token's q against every token's k, per head, then
    attention dropout (its draws taken in the (B, N, h) layout of xcit.ClassAttention's weights)."""
    b, n, c = x.shape
    qkv = F.linear(x, m.qkv.weight, m.qkv.bias).reshape([b, n, 3, m.num_heads, c // m.num_heads])
    q, k, v = qkv.transpose([2, 0, 3, 1, 4]).unbind(0)
    attn = F.softmax((q[:, :, 0:1] * k).sum(axis=-1) * m.scale, axis=-1)
    if m.training and m.attn_drop.p:
        attn = attn * F.dropout(paddle.ones([b, n, m.num_heads]), m.attn_drop.p).transpose([0, 2, 1])
    cls = paddle.matmul(attn.unsqueeze(2), v).transpose([0, 2, 1, 3]).reshape([b, 1, c])
    return paddle.concat([F.linear(cls, m.proj.weight, m.proj.bias), x[:, 1:]], axis=1)


def ref_positional_encoding(m, h, w):
    """Official Fourier encoding: the (1, 2*hidden, H, W) grid through the 1x1 conv, as tokens."""
    eps, hidden = 1e-6, m.hidden_dim
    y = paddle.arange(1, h + 1, dtype='float32').unsqueeze(1).expand([h, w]) / (h + eps) * m.scale
    x = paddle.arange(1, w + 1, dtype='float32').unsqueeze(0).expand([h, w]) / (w + eps) * m.scale
    dim_t = m.temperature ** (2 * paddle.floor(paddle.arange(hidden, dtype='float32') / 2) / hidden)
    pos_x, pos_y = x.unsqueeze(-1) / dim_t, y.unsqueeze(-1) / dim_t
    pos_x = paddle.stack([pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()], axis=-1).flatten(2)
    pos_y = paddle.stack([pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()], axis=-1).flatten(2)
    grid = paddle.concat([pos_y, pos_x], axis=-1).transpose([2, 0, 1]).unsqueeze(0)
    return m.token_projection(grid).flatten(2).transpose([0, 2, 1])[0]


def outputs_and_grads(fn, layer, x):
    """fn(x)'s value, then the gradients of sum(fn(x) * fixed weights) w.r.t. x and every parameter;
    dropout draws from a fixed generator seed."""
    x = paddle.to_tensor(x, stop_gradient=False)
    paddle.seed(11)
    out = fn(x)
    probe = paddle.to_tensor(np.random.default_rng(9).standard_normal(out.shape).astype('float32'))
    (out * probe).sum().backward()
    grads = {'input': x.grad.numpy()}
    grads.update({name: p.grad.numpy() for name, p in layer.named_parameters() if p.grad is not None})
    layer.clear_gradients()
    return out.numpy(), grads


def assert_same(fast, ref):
    np.testing.assert_allclose(fast[0], ref[0], atol=ATOL, rtol=1e-5)
    assert fast[1].keys() == ref[1].keys()
    for name in ref[1]:
        np.testing.assert_allclose(fast[1][name], ref[1][name], atol=ATOL, rtol=1e-4, err_msg=name)


def tokens(seed=0, n=N):
    return np.random.default_rng(seed).standard_normal((B, n, C)).astype('float32')


@pytest.mark.parametrize('training', [False, True])
def test_xca_with_folded_scale_matches_official(training):
    """In training with attention dropout on the softmax weights, as the official code."""
    m = randomize(xcit.XCA(C, HEADS, attn_drop=0.3), 1)
    m.train() if training else m.eval()
    scale = paddle.to_tensor(np.linspace(0.5, 1.5, C).astype('float32'))
    fast = outputs_and_grads(lambda x: m(x, scale=scale), m, tokens())
    ref = outputs_and_grads(lambda x: ref_xca(m, x) * scale, m, tokens())
    assert_same(fast, ref)


@pytest.mark.parametrize('training', [False, True])
def test_lpi_on_stacked_planes_matches_official(training):
    m = randomize(xcit.LPI(C), 2)
    r = copy.deepcopy(m)
    for layer in (m, r):
        layer.train() if training else layer.eval()
    scale = paddle.to_tensor(np.linspace(1.5, 0.5, C).astype('float32'))
    fast = outputs_and_grads(lambda x: m(x, H, W, scale=scale), m, tokens())
    ref = outputs_and_grads(lambda x: ref_lpi(r, x, H, W) * scale, r, tokens())
    assert_same(fast, ref)
    # train mode updates the running statistics from the same batch statistics
    np.testing.assert_allclose(m.bn._mean.numpy(), r.bn._mean.numpy(), atol=1e-6)
    np.testing.assert_allclose(m.bn._variance.numpy(), r.bn._variance.numpy(), atol=1e-5)


@pytest.mark.parametrize('training', [False, True])
def test_class_attention_matches_official(training):
    """In training with attention dropout on the softmax weights, as the official code."""
    m = randomize(xcit.ClassAttention(C, HEADS, attn_drop=0.3), 3)
    m.train() if training else m.eval()
    assert_same(outputs_and_grads(lambda x: m(x[:, :1], x[:, 1:]), m, tokens(n=N + 1)),
                outputs_and_grads(lambda x: ref_class_attention(m, x)[:, :1], m, tokens(n=N + 1)))


def ref_class_attention_block(m, x):
    """Official class-attention block on the whole sequence (B, 1 + N, C), class token first."""
    def norm(layer, t):
        return F.layer_norm(t, [C], layer.weight, layer.bias, xcit.LN_EPS)
    x = x + m.gamma1 * ref_class_attention(m.attn, norm(m.norm1, x))
    x = norm(m.norm2, x) if m.tokens_norm else paddle.concat([norm(m.norm2, x[:, :1]), x[:, 1:]], axis=1)
    mlp = F.linear(F.gelu(F.linear(x[:, :1], m.mlp.fc1.weight, m.mlp.fc1.bias)), m.mlp.fc2.weight, m.mlp.fc2.bias)
    return x + paddle.concat([m.gamma2 * mlp, x[:, 1:]], axis=1)


@pytest.mark.parametrize('tokens_norm', [False, True])
def test_class_attention_block_matches_official(tokens_norm):
    """Class and patch tokens kept apart give the official block's output and gradients; without
    ``update_patches`` the same class token and no patch tokens."""
    m = randomize(xcit.ClassAttentionBlock(C, HEADS, tokens_norm=tokens_norm), 5)
    m.train()
    assert_same(outputs_and_grads(lambda x: paddle.concat(m(x[:, :1], x[:, 1:]), axis=1), m, tokens(n=N + 1)),
                outputs_and_grads(lambda x: ref_class_attention_block(m, x), m, tokens(n=N + 1)))
    x = paddle.to_tensor(tokens(n=N + 1))
    cls, patches = m(x[:, :1], x[:, 1:], update_patches=False)
    assert patches is None
    np.testing.assert_allclose(cls.numpy(), ref_class_attention_block(m, x)[:, :1].numpy(), atol=ATOL, rtol=1e-5)


def test_linear_scale_is_folded_exactly():
    m = randomize(xcit.Linear(C, 2 * C), 4)
    x, scale = paddle.to_tensor(tokens()), paddle.to_tensor(np.linspace(-1, 1, 2 * C).astype('float32'))
    np.testing.assert_allclose(m(x, scale).numpy(), (F.linear(x, m.weight, m.bias) * scale).numpy(),
                               atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize('frozen', [None, 'x', 'weight', 'bias'])
def test_linear_gradients_are_those_of_matmul_plus_bias(frozen):
    """The GEMM-only backward of xcit._linear: same gradients, none for frozen inputs."""
    rng = np.random.default_rng(6)
    inputs = {name: paddle.to_tensor(rng.standard_normal(shape).astype('float32'))
              for name, shape in (('x', (B, N, C)), ('weight', (C, 2 * C)), ('bias', (2 * C,)))}
    grad = paddle.to_tensor(rng.standard_normal((B, N, 2 * C)).astype('float32'))

    def gradients(fn):
        for name, t in inputs.items():
            t.clear_gradient()
            t.stop_gradient = name == frozen
        fn(inputs['x'], inputs['weight'], inputs['bias']).backward(grad)
        return {name: None if t.grad is None else t.grad.numpy() for name, t in inputs.items()}

    ours = gradients(xcit._linear)
    reference = gradients(lambda x, w, b: paddle.matmul(x, w) + b)
    for name in inputs:
        if name == frozen:
            assert ours[name] is None
        else:
            np.testing.assert_allclose(ours[name], reference[name], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('width', [W, xcit.BANDED_MAX_WIDTH + 2], ids=['banded', 'tall-plane'])
@pytest.mark.parametrize('frozen', [None, 'x', 'weight', 'bias'])
def test_depthwise_convolution_and_gradients_are_those_of_paddles(frozen, width):
    """xcit._depthwise_conv3x3 on channel planes (C, B, H, W), as banded GEMMs and (wide rows) as
    tall planes: the output and the gradients of F.conv2d on the images (B, C, H, W), none for a
    frozen input."""
    rng = np.random.default_rng(8)
    inputs = {'x': paddle.to_tensor(rng.standard_normal((C, 3, H, width)).astype('float32')),
              'weight': paddle.to_tensor(rng.standard_normal((C, 1, 3, 3)).astype('float32')),
              'bias': paddle.to_tensor(rng.standard_normal((C,)).astype('float32'))}
    grad = paddle.to_tensor(rng.standard_normal((C, 3, H, width)).astype('float32'))

    def outputs_and_gradients(fn):
        for name, t in inputs.items():
            t.clear_gradient()
            t.stop_gradient = name == frozen
        out = fn(inputs['x'], inputs['weight'], inputs['bias'])
        out.backward(grad)
        return out.numpy(), {name: None if t.grad is None else t.grad.numpy() for name, t in inputs.items()}

    def reference_convolution(x, weight, bias):
        images = x.transpose([1, 0, 2, 3])
        return F.conv2d(images, weight, bias, padding=1, groups=C).transpose([1, 0, 2, 3])

    out, ours = outputs_and_gradients(xcit._depthwise_conv3x3)
    reference_out, reference = outputs_and_gradients(reference_convolution)
    np.testing.assert_allclose(out, reference_out, atol=1e-5, rtol=1e-5)
    for name in inputs:
        if name == frozen:
            assert ours[name] is None
        else:
            np.testing.assert_allclose(ours[name], reference[name], atol=1e-4, rtol=1e-5)


def layer_norm_gradients_float64(x, weight, grad, epsilon):
    """Gradients of LayerNorm over the last axis w.r.t. x, weight and bias, in float64."""
    x, weight, grad = (np.asarray(t, np.float64) for t in (x, weight, grad))
    centred = x - x.mean(-1, keepdims=True)
    rstd = 1 / np.sqrt((centred ** 2).mean(-1, keepdims=True) + epsilon)
    x_hat, g = centred * rstd, grad * weight
    grad_x = (g - g.mean(-1, keepdims=True) - x_hat * (g * x_hat).mean(-1, keepdims=True)) * rstd
    return {'x': grad_x, 'weight': (grad * x_hat).reshape(-1, x.shape[-1]).sum(0),
            'bias': grad.reshape(-1, x.shape[-1]).sum(0)}


@pytest.mark.parametrize('frozen', [None, 'x', 'weight', 'bias'])
def test_layer_norm_forward_is_paddles_and_gradients_are_exact(frozen):
    """xcit.LayerNorm: Paddle's forward; gradients as float64 math, none for frozen inputs.

    (Paddle's own layer_norm gradient w.r.t. x is wrong when only the weight is frozen.)
    """
    rng = np.random.default_rng(7)
    m = randomize(xcit.LayerNorm(C, epsilon=xcit.LN_EPS), 8)
    x = paddle.to_tensor(3 * rng.standard_normal((B, N, C)).astype('float32') + 1)
    grad = rng.standard_normal((B, N, C)).astype('float32')
    inputs = {'x': x, 'weight': m.weight, 'bias': m.bias}
    for name, t in inputs.items():
        t.stop_gradient = name == frozen
    out = m(x)
    out.backward(paddle.to_tensor(grad))
    np.testing.assert_array_equal(out.numpy(), F.layer_norm(x, [C], m.weight, m.bias, xcit.LN_EPS).numpy())
    expected = layer_norm_gradients_float64(x.numpy(), m.weight.numpy(), grad, xcit.LN_EPS)
    for name, t in inputs.items():
        if name == frozen:
            assert t.grad is None
        else:
            np.testing.assert_allclose(t.grad.numpy(), expected[name], atol=2e-5, rtol=1e-5)


class SavedContext:
    """A PyLayer context as a forward pass leaves it: the saved tensors and its attributes."""

    def __init__(self, saved, **attributes):
        self.saved = saved
        self.__dict__.update(attributes)

    def saved_tensor(self):
        return self.saved


def test_backward_passes_compute_in_the_gradients_dtype_and_return_each_inputs_dtype():
    """Under autocast the output gradient can come in another dtype than the tensors the forward
    saved (float16 for float32 parameters on a GPU; here float64 for float32 ones, the CPU having
    no float16 matmul): the linear and depthwise backward passes compute in the gradient's dtype.
    The LayerNorm one computes in float32 whatever the dtype. Every gradient comes back in its
    own input's dtype, with the values of a float64 computation."""
    rng = np.random.default_rng(10)
    f32, f64 = paddle.float32, paddle.float64

    def tensor(shape, dtype='float32'):
        return paddle.to_tensor(rng.standard_normal(shape).astype(dtype))

    x, weight, grad = tensor((B, N, C)), tensor((C, 2 * C)), tensor((B, N, 2 * C), 'float64')
    got = xcit._AddmmFunction.backward(SavedContext([x, weight], inputs=[(f32, False)] * 3), grad)
    g = grad.numpy().reshape(-1, 2 * C)
    expected = [(g @ weight.numpy().T.astype('float64')).reshape(B, N, C),
                x.numpy().reshape(-1, C).T.astype('float64') @ g, g.sum(0)]
    for name, value, reference in zip(('x', 'weight', 'bias'), got, expected):
        assert value.dtype == f32, name
        np.testing.assert_allclose(value.numpy(), reference, rtol=1e-5, atol=1e-6, err_msg=name)

    # LayerNorm: inputs and parameters all in one other dtype (a model cast to it)
    x, weight, grad = tensor((B, N, C), 'float64'), tensor((C,), 'float64'), tensor((B, N, C), 'float64')
    ctx = SavedContext([x, weight], epsilon=xcit.LN_EPS, inputs=[(f64, False)] * 3)
    got = xcit._LayerNormFunction.backward(ctx, grad)
    expected = layer_norm_gradients_float64(x.numpy(), weight.numpy(), grad.numpy(), xcit.LN_EPS)
    for name, value in zip(('x', 'weight', 'bias'), got):
        assert value.dtype == f64, name
        np.testing.assert_allclose(value.numpy(), expected[name], atol=2e-5, rtol=1e-5, err_msg=name)

    x, taps, grad = tensor((C, B, H, W)), xcit._row_taps(tensor((C, 1, 3, 3)), W), tensor((C, B, H, W), 'float64')
    ctx = SavedContext([*xcit._row_windows(x), taps], height=H, inputs=[(f32, False)] * 3)
    got = xcit._BandedDepthwiseFunction.backward(ctx, grad)
    inputs = [paddle.to_tensor(t.numpy().astype('float64'), stop_gradient=False) for t in (x, taps, tensor((C,)))]
    xcit._BandedDepthwiseFunction.apply(*inputs).backward(grad)
    for name, value, reference in zip(('x', 'taps', 'bias'), got, inputs):
        assert value.dtype == f32, name
        np.testing.assert_allclose(value.numpy(), reference.grad.numpy(), rtol=1e-5, atol=1e-5, err_msg=name)


@pytest.mark.parametrize('h,w', [(14, 14), (3, 11)])
def test_positional_encoding_matches_official(h, w):
    m = randomize(xcit.PositionalEncodingFourier(dim=C), 5)
    np.testing.assert_allclose(m(h, w).numpy(), ref_positional_encoding(m, h, w).numpy(), atol=1e-5)


@pytest.mark.parametrize('side', [40, None])
def test_to_static_program_equals_eager_model(side):
    """The graph-mode code paths (F.linear, the (B, C, H, W) LPI) against the eager ones."""
    model = randomize(xcit.XCiT(embed_dim=C, depth=2, num_heads=HEADS, num_classes=4, tokens_norm=True), 6)
    model.eval()
    static = paddle.jit.to_static(model, input_spec=[paddle.static.InputSpec([None, 3, side, side], 'float32')],
                                  full_graph=True)
    shapes = [(2, 3, 40, 40)] if side else [(2, 3, 40, 40), (1, 3, 35, 61)]
    for shape in shapes:
        x = paddle.to_tensor(np.random.default_rng(7).standard_normal(shape).astype('float32'))
        with paddle.no_grad():
            np.testing.assert_allclose(static(x).numpy(), model(x).numpy(), atol=1e-5, rtol=1e-5)


def training_twins_and_batch():
    """A one-block XCiT with random weights and its copy, both in train mode, and a batch of two
    32 x 48 images with their labels."""
    paddle.seed(0)
    model = randomize(xcit.XCiT(embed_dim=C, depth=1, num_heads=HEADS, num_classes=4), 8)
    twin = copy.deepcopy(model)
    model.train()
    twin.train()
    x = paddle.to_tensor(np.random.default_rng(8).standard_normal((2, 3, 32, 48)).astype('float32'))
    return model, twin, x, paddle.to_tensor([1, 3])


def test_training_step_gradients_are_finite_and_match_between_modes():
    """One training step of the whole model: eager gradients equal to_static gradients."""
    model, twin, x, labels = training_twins_and_batch()
    static = paddle.jit.to_static(twin, input_spec=[paddle.static.InputSpec([None, 3, None, None], 'float32')],
                                  full_graph=True)
    for net in (model, static):
        F.cross_entropy(net(x), labels).backward()
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        if p.stop_gradient:  # BatchNorm statistics
            continue
        assert np.all(np.isfinite(p.grad.numpy())), name
        np.testing.assert_allclose(p.grad.numpy(), q.grad.numpy(), atol=1e-5, rtol=1e-4, err_msg=name)
    np.testing.assert_allclose(model.blocks[0].local_mp.bn._variance.numpy(),
                               twin.blocks[0].local_mp.bn._variance.numpy(), atol=1e-5)


def test_off_the_cpu_the_model_uses_paddles_standard_operators(monkeypatch):
    """On a GPU the model runs Paddle's own linear, LayerNorm and convolution operators, which
    float16 autocast casts, and none of the CPU replacements (PyLayers and ``paddle.addmm``, which
    autocast leaves in float32): the same training step as the CPU model, loss and gradients."""
    model, twin, x, labels = training_twins_and_batch()
    cpu_loss = F.cross_entropy(model(x), labels)
    cpu_loss.backward()
    replacements = []
    monkeypatch.setattr(xcit, '_eager_on_cpu', lambda tensor: False)
    addmm = paddle.addmm
    monkeypatch.setattr(paddle, 'addmm', lambda *args: replacements.append('addmm') or addmm(*args))
    for function in (xcit._AddmmFunction, xcit._LayerNormFunction, xcit._BandedDepthwiseFunction):
        monkeypatch.setattr(function, 'apply', lambda *args, name=function.__name__, apply=function.apply:
                            replacements.append(name) or apply(*args))
    gpu_loss = F.cross_entropy(twin(x), labels)
    gpu_loss.backward()
    assert replacements == []
    np.testing.assert_allclose(gpu_loss.numpy(), cpu_loss.numpy(), rtol=1e-6)
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        if not p.stop_gradient:
            np.testing.assert_allclose(q.grad.numpy(), p.grad.numpy(), atol=1e-5, rtol=1e-4, err_msg=name)


def test_off_the_cpu_xca_multiplies_normalised_q_and_k(monkeypatch):
    """On a GPU, float16 autocast runs XCA's q @ k^T in float16: it gets q and k normalised along
    the tokens (every entry of the product a cosine), not the raw ones, whose products over many
    tokens can exceed float16's 65504; the logits are those of the CPU arithmetic."""
    xca = randomize(xcit.XCA(C, num_heads=HEADS), 3)
    rng = np.random.default_rng(4)
    q, k = (paddle.to_tensor(300 * rng.standard_normal((2, HEADS, C // HEADS, 4096)).astype('float32'))
            for _ in range(2))
    cpu_logits = xca._logits(q, k).numpy()
    factors = []
    matmul = paddle.matmul
    monkeypatch.setattr(xcit, '_eager_on_cpu', lambda tensor: False)
    monkeypatch.setattr(paddle, 'matmul', lambda a, b, **kw: factors.append((a, b)) or matmul(a, b, **kw))
    gpu_logits = xca._logits(q, k).numpy()
    assert len(factors) == 1 and all(np.abs(t.numpy()).max() <= 1 + 1e-6 for t in factors[0])
    assert np.abs(np.matmul(q.numpy(), k.numpy().swapaxes(-1, -2))).max() > 65504
    np.testing.assert_allclose(gpu_logits, cpu_logits, atol=1e-5, rtol=1e-5)

FAULTS_PER_ADD = """
import resource, sys
import numpy as np, paddle
import xcit
x = paddle.to_tensor(np.ones((3136, 1536), 'float32'))  # 19 MB, an MLP activation of xcit_small
with paddle.no_grad():
    for _ in range(5):
        x + x
    faults = []
    for _ in range(11):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        x + x
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(sorted(faults)[5])
"""


def faults_per_large_add(env=None):
    """Minor page faults of an eager ``x + x`` of a 19 MB tensor in a fresh process, the median of
    11 additions after 5: now and then a few of them (seen 1 to 4 in 10) still get fresh memory
    and fault every page, which says nothing about where the memory of the others comes from."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith(('MALLOC_', 'GLIBC_TUNABLES'))}
    done = subprocess.run([sys.executable, '-c', FAULTS_PER_ADD], capture_output=True, text=True,
                          env={**environ, **(env or {})}, cwd=ROOT, check=True)
    return float(done.stdout.split()[-1])


@pytest.mark.skipif(platform.system() != 'Linux' or platform.libc_ver()[0] != 'glibc', reason='glibc malloc only')
def test_large_tensors_reuse_freed_memory_unless_malloc_is_configured():
    pages = 3136 * 1536 * 4 // 4096
    assert faults_per_large_add() < pages / 4  # importing xcit: the output reuses freed memory
    # a user's own malloc setting is kept: glibc's 128 kB defaults fault in every page again
    assert faults_per_large_add({'MALLOC_MMAP_THRESHOLD_': '131072'}) > pages / 2
