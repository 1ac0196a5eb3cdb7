"""XCiT: Cross-Covariance Image Transformers (El-Nouby et al., 2021) in PaddlePaddle.

The layers mirror the official PyTorch release (facebookresearch/xcit) one to one,
including parameter names, so an official checkpoint converted by
``port_weights/convert.py`` loads with ``model.set_state_dict(paddle.load(path))``.

The arithmetic is the official one, rearranged for Paddle's CPU kernels (same results up
to float32 rounding): layer-scale gammas are folded into the weights of the layer before
them, XCA normalises the small d x d attention map instead of q and k, the depthwise
convolutions run as batched GEMMs on the CPU, and reshapes stay in 2-D/3-D layouts. The same
code runs eagerly and under ``paddle.jit.to_static(model, input_spec, full_graph=True)`` (as
``export_model.py`` and ``benchmark.py`` call it) with dynamic batch, height and width. Without
``full_graph=True`` Paddle 2.6 and 3.x translate by bytecode (SOT), which fails with an internal
error (``BreakGraphError`` or ``UnboundLocalError``) on the eager CPU code paths.

Shapes use B = batch, C = channels (embed dim), N = tokens, H/W = token grid.
"""
import ctypes
import ctypes.util
import functools
import math
import os
import platform

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F
from paddle.autograd import PyLayer
from paddle.distributed.fleet.utils import recompute

__all__ = ['XCiT', 'build_xcit']

LN_EPS = 1e-6
BN_MOMENTUM = 0.9  # Paddle's convention: running = m * running + (1 - m) * batch (torch 0.1)
BN_EPS = 1e-5
NORMALIZE_EPS = 1e-12  # F.normalize's: x / max(||x||, eps)


def _select_avx2_blas_on_non_intel_cpus():
    """Lets Paddle's bundled MKL use its AVX2 kernels on AMD and other non-Intel x86 CPUs.

    That MKL dispatches on the CPU vendor and runs generic SSE code elsewhere, which makes
    GEMMs and GELU 2-4x slower on e.g. AMD EPYC. It reads ``MKL_DEBUG_CPU_TYPE`` at its first
    call, so this must run before Paddle computes anything; an existing setting is kept.
    """
    try:
        with open('/proc/cpuinfo', encoding='utf-8') as f:
            info = f.read(1 << 16)
    except OSError:
        return
    if 'GenuineIntel' not in info and ' avx2' in info:
        os.environ.setdefault('MKL_DEBUG_CPU_TYPE', '5')


_select_avx2_blas_on_non_intel_cpus()


def _reuse_freed_memory_for_large_tensors():
    """Lets glibc's malloc serve Paddle's large CPU tensors from memory it already holds.

    Paddle's CPU allocator takes every tensor from ``posix_memalign`` and frees it when it dies.
    With glibc's defaults a tensor of a few MB is a fresh ``mmap`` (or heap memory that ``free``
    just gave back), so each first write page-faults: a 19 MB add took 6 ms instead of 1 ms, and
    eager elementwise ops, GELU and the GEMM outputs of a forward pass spent most of their time
    there. Raising the mmap and trim thresholds to 1 GiB (the mmap one to 32 MiB where glibc
    accepts no more) keeps such memory in the process for the next tensor. It only changes
    where memory comes from, never a result. Settings made through ``MALLOC_MMAP_THRESHOLD_``,
    ``MALLOC_TRIM_THRESHOLD_`` or ``GLIBC_TUNABLES`` are kept.
    """
    if any(k in os.environ for k in ('MALLOC_MMAP_THRESHOLD_', 'MALLOC_TRIM_THRESHOLD_', 'GLIBC_TUNABLES')):
        return
    if platform.system() != 'Linux' or platform.libc_ver()[0] != 'glibc':
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library('c'))
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    if not libc.mallopt(m_mmap_threshold, 1 << 30):
        libc.mallopt(m_mmap_threshold, 32 << 20)  # the most that older glibc accepts (HEAP_MAX_SIZE / 2)
    libc.mallopt(m_trim_threshold, 1 << 30)


_reuse_freed_memory_for_large_tensors()


def _dense(x):
    """x as a dense tensor: Paddle 3's eager transposes and slices are strided views, which its
    CPU kernels read several times slower than a dense copy costs."""
    return x.contiguous() if paddle.in_dynamic_mode() and hasattr(x, 'contiguous') else x


def _transpose(x, perm):
    """A dense transpose. A reshape right after it takes the batch as -1, not 0 or x.shape[0]:
    with a constant shape holding at most one -1 and no 0, the oneDNN inference passes fold the
    reshape into the transpose's single copy (a oneDNN reshape on its own copies once more)."""
    return _dense(paddle.transpose(x, perm))


def _as_dtype(x, dtype):
    return x if x.dtype == dtype else x.astype(dtype)


def _float32(x):
    return _as_dtype(x, paddle.float32)


def _row_sums(x):
    """Row sums of a 2-D x (M, N) -> (M,), as a product with a ones vector: Paddle's CPU sum over
    an axis is several times slower than the GEMV."""
    return paddle.matmul(x, paddle.ones([x.shape[1], 1], x.dtype)).reshape([-1])


def _eager_on_cpu(x):
    """x is an eager tensor on the CPU: where the model replaces Paddle's slow CPU kernels. In
    graph mode (exports) and on GPUs it uses Paddle's standard operators, which the inference
    passes fuse and float16 autocast casts (a custom GEMM such as ``paddle.addmm`` is not on
    autocast's list and would run in float32)."""
    return paddle.in_dynamic_mode() and x.place.is_cpu_place()


def _needs_grad(*tensors):
    """Eager autograd will want a gradient of at least one of ``tensors``."""
    return paddle.is_grad_enabled() and not all(t.stop_gradient for t in tensors)


class _AddmmFunction(PyLayer):
    """``bias + x @ weight`` for x (..., in) whose backward is three GEMMs on 2-D views.

    Paddle's own addmm gradient sums the bias gradient with a slow single-threaded kernel (for
    the MLP layers that took as long as the two GEMMs together); here it is ``ones(1, M) @ grad``.
    The reshapes to and from 2-D happen inside, so autograd records one node, not three.
    Under autocast the GEMMs run in the gradient's dtype and each gradient is returned in its
    input's dtype; inputs that need no gradient get none.
    """

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.inputs = [(t.dtype, t.stop_gradient) for t in (x, weight, bias)]
        return _addmm(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = (_as_dtype(t, grad.dtype) for t in ctx.saved_tensor())
        x_shape = x.shape
        x, grad = x.reshape([-1, x_shape[-1]]), grad.reshape([-1, weight.shape[1]])
        (x_dtype, x_frozen), (weight_dtype, weight_frozen), (bias_dtype, bias_frozen) = ctx.inputs
        grad_x = None if x_frozen else _as_dtype(
            paddle.matmul(grad, weight, transpose_y=True).reshape(x_shape), x_dtype)
        grad_weight = None if weight_frozen else _as_dtype(paddle.matmul(x, grad, transpose_x=True),
                                                           weight_dtype)
        grad_bias = None if bias_frozen else _as_dtype(
            paddle.matmul(paddle.ones([1, grad.shape[0]], grad.dtype), grad).reshape([-1]), bias_dtype)
        return grad_x, grad_weight, grad_bias


class _LayerNormFunction(PyLayer):
    """LayerNorm over the last axis whose backward is a few elementwise ops and GEMVs.

    The forward is Paddle's fused kernel. Its CPU gradient kernel is dozens of times slower
    than the forward (about 4 ms for a (16, 196, 128) input); here the backward recomputes
    the normalised input and takes row means and column sums as matrix-vector products.
    It computes in float32 and returns each gradient in its input's dtype, none for inputs
    that need none.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, epsilon):
        ctx.save_for_backward(x, weight)
        ctx.epsilon = epsilon
        ctx.inputs = [(t.dtype, t.stop_gradient) for t in (x, weight, bias)]
        return F.layer_norm(x, x.shape[-1:], weight, bias, epsilon)

    @staticmethod
    def backward(ctx, grad):
        x, weight = (_float32(t) for t in ctx.saved_tensor())
        shape, C = x.shape, x.shape[-1]
        x, grad = x.reshape([-1, C]), _float32(grad).reshape([-1, C])
        row_mean = paddle.full([C, 1], 1.0 / C, 'float32')  # (M, C) @ row_mean = per-row mean (M, 1)
        across = paddle.ones([1, C], 'float32')  # (M, 1) @ across = that column repeated over C
        # full (M, C) operands everywhere: Paddle's CPU broadcast kernels are several times slower
        # than an outer product by ones (exact) followed by a same-shape elementwise op
        centred = x - paddle.matmul(paddle.matmul(x, row_mean), across)
        rstd = paddle.matmul(paddle.rsqrt(paddle.matmul(centred * centred, row_mean) + ctx.epsilon), across)
        x_hat = centred * rstd
        (x_dtype, x_frozen), (weight_dtype, weight_frozen), (bias_dtype, bias_frozen) = ctx.inputs
        column_sum = paddle.ones([1, x.shape[0]], 'float32')  # column_sum @ (M, C) = per-column sum
        grad_x = grad_weight = grad_bias = None
        if not x_frozen:
            g = grad * paddle.matmul(column_sum.reshape([-1, 1]), weight.reshape([1, C]))
            mean_g = paddle.matmul(paddle.matmul(g, row_mean), across)
            mean_g_x_hat = paddle.matmul(paddle.matmul(g * x_hat, row_mean), across)
            grad_x = (g - mean_g - x_hat * mean_g_x_hat) * rstd
            grad_x = _as_dtype(grad_x.reshape(shape), x_dtype)
        if not weight_frozen:
            grad_weight = _as_dtype(paddle.matmul(column_sum, grad * x_hat).reshape([-1]), weight_dtype)
        if not bias_frozen:
            grad_bias = _as_dtype(paddle.matmul(column_sum, grad).reshape([-1]), bias_dtype)
        return grad_x, grad_weight, grad_bias


@functools.lru_cache(maxsize=None)
def _row_shifts(W, dtype):
    """(3, W * W) on the CPU: for each kernel column dx the 0/1 matrix (W, W) whose entry (j, i) is 1
    where pixel j of a row of W pixels meets kernel column dx for output pixel i (j = i + dx - 1)."""
    shifts = np.stack([np.eye(W, k=1), np.eye(W), np.eye(W, k=-1)]).reshape([3, W * W])
    return paddle.to_tensor(shifts, dtype=dtype, place=paddle.CPUPlace())


def _row_taps(weight, W):
    """3x3 depthwise kernels (C, 1, 3, 3) -> banded matrices (3, C, W, W), one per kernel row dy:
    ``row @ taps[dy, c]`` correlates a row of W pixels of channel c with that kernel row, zero
    padding at both ends. Each entry is one weight or zero, so the matrices are exact."""
    C = weight.shape[0]
    kernel_rows = weight.reshape([C, 3, 3]).transpose([1, 0, 2])  # (dy, c, dx)
    return paddle.matmul(kernel_rows, _row_shifts(W, weight.dtype)).reshape([3, C, W, W])


def _row_windows(x):
    """Channel planes x (C, B, H, W) -> three views (C, B * (H + 1), W) of x with a zero row above
    each image: window dy's row b * (H + 1) + y is image b's row y + dy - 1 (zero outside the image)
    for y < H; rows y = H straddle two images."""
    C, B, H, W = x.shape
    rows = B * (H + 1)
    # a zero row on top of every image, and a zero channel after the last for its last windows
    flat = F.pad(x, [0, 1, 0, 0, 1, 0, 0, 0]).reshape([-1, W])
    return [flat[dy:dy + C * rows].reshape([C, rows, W]) for dy in range(3)]


def _banded_depthwise(windows, taps, H, flipped=False):
    """Depthwise 3x3 correlation (padding 1) of channel planes (C, B, H, W), given as their
    ``_row_windows``, with the banded ``taps`` (3, C, W, W) of ``_row_taps`` -> (C, B, H, W), a
    strided view in Paddle 3: three batched GEMMs over channels. ``flipped``: with the kernel
    rotated by 180 degrees instead (the taps in reverse row order, each transposed), which is
    the correlation that gives the input gradient."""
    C, rows, W = windows[0].shape
    order = (2, 1, 0) if flipped else (0, 1, 2)
    out = paddle.matmul(windows[0], taps[order[0]], transpose_y=flipped)
    out = out + paddle.matmul(windows[1], taps[order[1]], transpose_y=flipped)
    out = out + paddle.matmul(windows[2], taps[order[2]], transpose_y=flipped)
    return out.reshape([C, rows // (H + 1), H + 1, W])[:, :, :H]


class _BandedDepthwiseFunction(PyLayer):
    """``_banded_depthwise`` of x (C, B, H, W) with ``taps``, plus ``bias``, whose backward is
    GEMMs as well.

    The input gradient is the same correlation of the output gradient with the flipped kernel
    (taps in reverse row order, each transposed); the taps' gradient is windows^T @ gradient,
    where the output gradient's middle window is that gradient in the windows' row layout, zero
    on the rows the forward drops. The forward keeps its windows (one padded copy of x) for it.
    Each gradient comes in its input's dtype, none for inputs that need none.
    """

    @staticmethod
    def forward(ctx, x, taps, bias):
        windows = _row_windows(x)
        ctx.save_for_backward(*windows, taps)
        ctx.height = x.shape[2]
        ctx.inputs = [(t.dtype, t.stop_gradient) for t in (x, taps, bias)]
        return _banded_depthwise(windows, taps, ctx.height) + bias.reshape([-1, 1, 1, 1])

    @staticmethod
    def backward(ctx, grad):
        *windows, taps = (_as_dtype(t, grad.dtype) for t in ctx.saved_tensor())
        (x_dtype, x_frozen), (taps_dtype, taps_frozen), (bias_dtype, bias_frozen) = ctx.inputs
        grad_windows = _row_windows(grad)
        grad_x = grad_taps = grad_bias = None
        if not x_frozen:
            grad_x = _as_dtype(_dense(_banded_depthwise(grad_windows, taps, ctx.height, flipped=True)), x_dtype)
        if not taps_frozen:
            grad_taps = paddle.stack([paddle.matmul(window, grad_windows[1], transpose_x=True)
                                      for window in windows])
            grad_taps = _as_dtype(grad_taps, taps_dtype)
        if not bias_frozen:
            grad_bias = _as_dtype(_row_sums(grad.reshape([grad.shape[0], -1])), bias_dtype)
        return grad_x, grad_taps, grad_bias


BANDED_MAX_WIDTH = 48  # wider rows: the banded GEMMs' 6 W multiply-adds per pixel cost more than conv2d


def _depthwise_conv3x3(x, weight, bias):
    """3x3 depthwise convolution with padding 1 of channel planes x (C, B, H, W), kernels ``weight``
    (C, 1, 3, 3) and ``bias`` (C,) -> (C, B, H, W).

    Up to ``BANDED_MAX_WIDTH`` pixels per row as batched GEMMs: Paddle's CPU depthwise kernel is
    several times slower on a batch of small planes, and its gradients more so. Wider, as one
    tall plane per channel for that kernel, whose cost per pixel does not grow with the width.
    """
    if x.shape[-1] > BANDED_MAX_WIDTH:
        return _tall_plane_depthwise(x, weight, bias)
    taps = _row_taps(weight, x.shape[-1])
    if _needs_grad(x, taps, bias):
        return _BandedDepthwiseFunction.apply(x, taps, bias)
    return _banded_depthwise(_row_windows(x), taps, x.shape[2]) + bias.reshape([-1, 1, 1, 1])


def _tall_plane_depthwise(x, weight, bias):
    """``_depthwise_conv3x3`` through ``F.conv2d`` on a batch of one: the B images of each channel
    stacked into one tall plane with a zero row above each, so that no pixel sees another image
    (Paddle's kernel runs a batch of one several times faster per plane than a batch of many)."""
    C, B, H, W = x.shape
    planes = F.pad(x, [0, 0, 0, 0, 1, 0, 0, 0]).reshape([1, C, B * (H + 1), W])
    out = F.conv2d(planes, weight, padding=1, groups=C).reshape([C, B, H + 1, W])[:, :, 1:]
    return out + bias.reshape([-1, 1, 1, 1])


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` over the last axis (same parameters, same forward) whose gradient on
    the CPU is ``_LayerNormFunction``'s."""

    def forward(self, x):
        if _eager_on_cpu(x) and _needs_grad(x, self.weight, self.bias):
            return _LayerNormFunction.apply(x, self.weight, self.bias, self._epsilon)
        return F.layer_norm(x, self._normalized_shape, self.weight, self.bias, self._epsilon)


def _linear(x, weight, bias=None):
    """(..., in) @ weight (in, out) + bias (out,) -> (..., out).

    Eagerly on the CPU, ``paddle.addmm`` adds the bias inside the GEMM call, several times
    cheaper on Paddle's CPU kernels than a separate broadcast add, with GEMM-only gradients when
    they are needed. In graph mode (exports) matmul + add, which the inference passes fuse into
    one fc op (``F.linear`` would write the ``linear_v2`` op where Paddle 3.3 is built with CUDA,
    which Paddle2ONNX cannot convert). Eagerly on GPUs ``F.linear``, the GEMM that float16
    autocast casts.
    """
    if bias is None:
        return paddle.matmul(x, weight)
    if not paddle.in_dynamic_mode():
        return paddle.matmul(x, weight) + bias
    if not _eager_on_cpu(x):
        return F.linear(x, weight, bias)
    if _needs_grad(x, weight, bias):
        return _AddmmFunction.apply(x, weight, bias)
    return _addmm(x, weight, bias)


def _addmm(x, weight, bias):
    """``bias + x @ weight`` for x (..., in) through the 2-D ``paddle.addmm`` -> (..., out)."""
    shape = list(x.shape)
    return paddle.addmm(bias, x.reshape([-1, shape[-1]]), weight).reshape(shape[:-1] + [weight.shape[1]])


class Linear(nn.Linear):
    """``nn.Linear`` (weight [in, out]) whose output can be scaled per channel for free.

    ``forward(x, scale)`` = ``(x @ W + b) * scale``, computed as ``x @ (W * scale) + b * scale``:
    a layer-scale gamma costs a multiply on the weights, not on the (B, N, out) activations.
    """

    def forward(self, x, scale=None):
        weight, bias = self.weight, self.bias
        if scale is not None:
            weight = weight * scale
            bias = None if bias is None else bias * scale
        return _linear(x, weight, bias)


def trunc_normal_init(std=0.02):
    """Normal(0, std) truncated to [-2, 2], the defaults of ``timm.trunc_normal_`` used officially.

    Paddle 2.x's TruncatedNormal has no bounds and cuts at 2 std instead; for the small std
    used here the [-2, 2] bounds never bind, so there it is a plain Normal(0, std).
    """
    try:
        return nn.initializer.TruncatedNormal(mean=0.0, std=std, a=-2.0, b=2.0)
    except TypeError:
        return nn.initializer.Normal(mean=0.0, std=std)


def torch_default_conv_init(conv):
    """Initialises ``conv`` (weight (out, in / groups, kh, kw), bias (out,) or None) as
    ``torch.nn.Conv2d`` does, which the official code keeps for every convolution: weight and
    bias Uniform(-b, b) with b = 1 / sqrt(fan_in), fan_in = in / groups * kh * kw (the weight's
    ``kaiming_uniform_(a=sqrt(5))``). Paddle's default, Normal(0, sqrt(2 / (in * kh * kw))) and
    zero bias, counts all input channels also for a depthwise convolution: the LPI kernels came
    out 3x smaller than the official ones and the stem's 2.5x larger."""
    bound = 1.0 / math.sqrt(float(np.prod(conv.weight.shape[1:])))
    nn.initializer.Uniform(-bound, bound)(conv.weight)
    if conv.bias is not None:
        nn.initializer.Uniform(-bound, bound)(conv.bias)


class DropPath(nn.Layer):
    """Stochastic depth per sample: drops the residual branch with probability ``drop_prob``."""

    def __init__(self, drop_prob=0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        shape = [x.shape[0]] + [1] * (x.ndim - 1)
        # one broadcast multiply by the per-sample factor 0 or 1 / keep
        return x * (paddle.floor(keep + paddle.rand(shape, dtype=x.dtype)) / keep)


class PositionalEncodingFourier(nn.Layer):
    """Fourier positional encoding projected to ``dim`` channels by a 1x1 conv.

    Coordinates run 1..H and 1..W, are normalised to (0, 2*pi] with eps 1e-6, and
    are encoded with interleaved sin/cos of ``hidden_dim`` frequencies; y comes before x.
    """

    def __init__(self, hidden_dim=32, dim=768, temperature=10000):
        super().__init__()
        self.token_projection = nn.Conv2D(hidden_dim * 2, dim, kernel_size=1)
        self.scale = 2 * math.pi
        self.temperature = temperature
        self.hidden_dim = hidden_dim

    def forward(self, H, W):
        """The encoding of an H x W grid as tokens in row-major order, shape (H * W, dim)."""
        eps = 1e-6
        y_embed = paddle.arange(1, H + 1, dtype='float32') / (H + eps) * self.scale
        x_embed = paddle.arange(1, W + 1, dtype='float32') / (W + eps) * self.scale
        dim_t = paddle.arange(self.hidden_dim, dtype='float32')
        dim_t = self.temperature ** (2 * paddle.floor(dim_t / 2) / self.hidden_dim)
        pos_y = self._interleave(self._angles(y_embed, dim_t, H))  # (H, hidden)
        pos_x = self._interleave(self._angles(x_embed, dim_t, W))  # (W, hidden)
        pos_y = pos_y[:, None, :].expand([H, W, self.hidden_dim])
        pos_x = pos_x[None, :, :].expand([H, W, self.hidden_dim])
        grid = paddle.concat([pos_y, pos_x], axis=-1).reshape([-1, 2 * self.hidden_dim])
        weight = self.token_projection.weight.reshape([-1, 2 * self.hidden_dim])  # 1x1 conv as a GEMM
        return paddle.matmul(grid, weight, transpose_y=True) + self.token_projection.bias

    @staticmethod
    def _angles(coords, dim_t, L):
        """coords (L,) / dim_t (hidden,) -> (L, hidden). Both sides are expanded to (L, hidden)
        first: Paddle 2.6's oneDNN divide gets this broadcast wrong in exported models. L is
        passed, not read from a static shape: that is -1 in an export with dynamic height and
        width, and Paddle2ONNX would write the -1 into the ONNX graph."""
        shape = [L, dim_t.shape[0]]
        return coords.unsqueeze(1).expand(shape) / dim_t.unsqueeze(0).expand(shape)

    @staticmethod
    def _interleave(t):
        """(L, hidden) angles -> (L, hidden): sin of even columns, cos of odd, interleaved.
        A reshape with one -1, not flatten: Paddle2ONNX turns flatten into a reshape to the
        static shape, which has two -1s when L is dynamic."""
        interleaved = paddle.stack([paddle.sin(t[:, 0::2]), paddle.cos(t[:, 1::2])], axis=2)
        return interleaved.reshape([-1, t.shape[1]])


class BatchNorm2D(nn.BatchNorm2D):
    """``nn.BatchNorm2D`` whose running variance takes the unbiased batch variance, as torch's.

    Paddle's kernel updates ``running = m * running + (1 - m) * var`` with the biased variance
    of the n = B * H * W values of each channel; torch (and so the official training) with
    ``var * n / (n - 1)``. In training the kernel updates a copy of the running variance (the
    one its gradient keeps), and the running variance becomes that update plus the difference,
    ``(1 - m) * var / (n - 1)`` = ``(new - m * old) / (n - 1)``: a few operations on (C,)
    vectors. The output is the kernel's, normalised with the biased variance as in torch.
    Where the kernel is cuDNN's (``_kernel_takes_unbiased_variance``) it is used as it is.
    """

    def forward(self, x):
        if not self.training or self._use_global_stats or _kernel_takes_unbiased_variance():
            return nn.BatchNorm2D.forward(self, x)  # not super(): Paddle 2.6's to_static cannot translate it
        updated = self._variance.clone()
        out = F.batch_norm(x, self._mean, updated, self.weight, self.bias, training=True,
                           momentum=self._momentum, epsilon=self._epsilon, data_format=self._data_format)
        with paddle.no_grad():
            n = paddle.numel(x).astype('float32') / x.shape[1]
            unbiased = updated + (updated - self._momentum * self._variance) / paddle.clip(n - 1, min=1.0)
            paddle.assign(unbiased, output=self._variance)
        return out


def _kernel_takes_unbiased_variance():
    """Whether Paddle's training ``batch_norm`` on (B, C, H, W) inputs of the current device moves
    the running variance towards the unbiased batch variance already: on CUDA GPUs it calls
    cuDNN, which does (as torch's); its own kernels (CPU, ROCm GPUs) take the biased one."""
    return paddle.get_device().startswith('gpu') and not paddle.is_compiled_with_rocm()


def conv3x3_bn(in_planes, out_planes, stride=1):
    """3x3 convolution without bias followed by BatchNorm, as the official ``conv3x3``."""
    return nn.Sequential(
        nn.Conv2D(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias_attr=False),
        BatchNorm2D(out_planes, momentum=BN_MOMENTUM, epsilon=BN_EPS),
    )


class ConvPatchEmbed(nn.Layer):
    """Convolutional stem: stride-2 conv3x3+BN stages with GELU between them.

    Patch 16 uses 4 stages (dim/8, dim/4, dim/2, dim), patch 8 uses 3 (dim/4, dim/2, dim).
    Input (B, 3, H, W) -> tokens (B, N, dim) and the grid (Hp, Wp), Hp = ceil(H / patch).
    """

    def __init__(self, patch_size=16, embed_dim=768):
        super().__init__()
        if patch_size == 16:
            widths = [embed_dim // 8, embed_dim // 4, embed_dim // 2, embed_dim]
        elif patch_size == 8:
            widths = [embed_dim // 4, embed_dim // 2, embed_dim]
        else:
            raise ValueError(f'patch_size must be 8 or 16, got {patch_size}')
        self.patch_size = patch_size
        layers, in_ch = [], 3
        for i, width in enumerate(widths):
            layers.append(conv3x3_bn(in_ch, width, stride=2))
            if i < len(widths) - 1:
                layers.append(nn.GELU())
            in_ch = width
        self.proj = nn.Sequential(*layers)

    def forward(self, x):
        x = self.proj(x)
        _, C, H, W = x.shape
        return _transpose(x, [0, 2, 3, 1]).reshape([-1, H * W, C]), (H, W)  # batch -1: see _transpose


class LPI(nn.Layer):
    """Local Patch Interaction: depthwise conv3x3 -> GELU -> BatchNorm -> depthwise conv3x3."""

    def __init__(self, in_features, kernel_size=3):
        super().__init__()
        padding = kernel_size // 2
        self.conv1 = nn.Conv2D(in_features, in_features, kernel_size, padding=padding, groups=in_features)
        self.act = nn.GELU()
        self.bn = BatchNorm2D(in_features, momentum=BN_MOMENTUM, epsilon=BN_EPS)
        self.conv2 = nn.Conv2D(in_features, in_features, kernel_size, padding=padding, groups=in_features)

    def forward(self, x, H, W, scale=None):
        """(B, N, C) -> (B, N, C), with N = H * W; the output is multiplied by ``scale`` (C,)."""
        weight, bias = self.conv2.weight, self.conv2.bias
        if scale is not None:
            weight, bias = weight * scale.reshape([-1, 1, 1, 1]), bias * scale
        if not _eager_on_cpu(x):
            return self._image_forward(x, H, W, weight, bias)
        B, N, C = x.shape
        x = _transpose(x.reshape([-1, C]), [1, 0]).reshape([C, B, H, W])  # channel planes
        x = _depthwise_conv3x3(x, self.conv1.weight, self.conv1.bias)
        x = self.bn(self.act(x).reshape([1, C, B, N])).reshape([C, B, H, W])  # statistics over B*N
        x = _depthwise_conv3x3(x, weight, bias)
        return _transpose(x.reshape([C, -1]), [1, 0]).reshape([B, N, C])

    def _image_forward(self, x, H, W, weight2, bias2):
        """Graph mode and GPUs: the tokens as a (B, C, H, W) image for the convolution kernels
        (oneDNN's in the inference predictor run the whole batch at once)."""
        _, N, C = x.shape
        x = x.transpose([0, 2, 1]).reshape([-1, C, H, W])  # batch -1: see _transpose
        x = F.conv2d(self.bn(self.act(self.conv1(x))), weight2, bias2, padding=1, groups=C)
        return x.transpose([0, 2, 3, 1]).reshape([-1, N, C])  # one reorder out of oneDNN's blocked layout


class Mlp(nn.Layer):
    """fc1 -> GELU -> dropout -> fc2 -> dropout; the output is multiplied by ``scale``."""

    def __init__(self, in_features, hidden_features, drop=0.0):
        super().__init__()
        self.fc1 = Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.fc2 = Linear(hidden_features, in_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x, scale=None):
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x))), scale))


def _squared_norms(x):
    """Sums of squares over the last axis, (B, h, d, N) -> (B, h, d). Eagerly on the CPU one
    matrix-vector product (Paddle's CPU sum over the last axis is several times slower);
    otherwise a sum: the oneDNN predictor reduces it faster than a matmul, and on a GPU a matmul
    would run in float16 under autocast, where these sums overflow."""
    if not _eager_on_cpu(x):
        return paddle.sum(x * x, axis=-1)
    return _row_sums((x * x).reshape([-1, x.shape[-1]])).reshape(x.shape[:-1])


def _qkv_parts(qkv):
    """The q, k and v projections of a ``Linear`` (in, 3 C) as [(weight (in, C), bias (C,) or None)] x 3.

    Slices, not ``paddle.split``: Paddle 3.3's inference predictor gets a split of a parameter
    right on the first run of an input shape only (later runs return wrong values)."""
    C = qkv.weight.shape[1] // 3
    bias = qkv.bias
    return [(_dense(qkv.weight[:, i * C:(i + 1) * C]), None if bias is None else bias[i * C:(i + 1) * C])
            for i in range(3)]


class XCA(nn.Layer):
    """Cross-covariance attention: attention over channels, not tokens.

    q and k are L2-normalised along the token axis, their (d x d) cross-covariance per
    head is scaled by a learnable per-head temperature and softmaxed over channels.
    Cost is linear in the number of tokens.
    """

    def __init__(self, dim, num_heads=8, qkv_bias=True, attn_drop=0.0, proj_drop=0.0):
        super().__init__()
        self.num_heads = num_heads
        self.temperature = self.create_parameter(
            [num_heads, 1, 1], default_initializer=nn.initializer.Constant(1.0))
        self.qkv = Linear(dim, dim * 3, bias_attr=None if qkv_bias else False)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x, scale=None):
        """(B, N, C) -> (B, N, C); the output is multiplied by ``scale`` (C,)."""
        N, C = x.shape[1], self.proj.weight.shape[0]
        q, k, v = self._channels_first_qkv(x)
        attn = self.attn_drop(F.softmax(self._logits(q, k), axis=-1))
        x = _transpose(paddle.matmul(attn, v).reshape([0, C, N]), [0, 2, 1])
        return self.proj_drop(self.proj(x, scale))

    def _channels_first_qkv(self, x):
        """(B, N, C) -> q, k and v, each (B, h, d, N). Eagerly one GEMM, one transpose and a
        split (a single GEMM also in the backward pass); in graph mode three GEMMs, each
        transposed on its own, which the oneDNN predictor runs 2-4% faster (nano) than copying
        the three parts out of one transposed tensor."""
        N, C = x.shape[1], self.proj.weight.shape[0]
        h, d = self.num_heads, C // self.num_heads
        if paddle.in_dynamic_mode():  # batch -1 in the reshapes: see _transpose
            return paddle.split(_transpose(self.qkv(x), [0, 2, 1]).reshape([-1, 3 * h, d, N]), 3, axis=1)
        return [_transpose(_linear(x, weight, bias), [0, 2, 1]).reshape([-1, h, d, N])
                for weight, bias in _qkv_parts(self.qkv)]

    def _logits(self, q, k):
        """q and k (B, h, d, N) -> ``F.normalize(q) @ F.normalize(k)^T * temperature`` (B, h, d, d),
        normalised along the tokens, with the norms in float32 also under float16 autocast (their
        squares overflow float16).

        On the CPU and in graph mode as diag(1/|q_i|) (q @ k^T) diag(1/|k_j|): the norms scale the
        d x d product instead of q and k. Eagerly on GPUs, q and k are normalised first, as in
        the official code: autocast runs the product in float16, in which q @ k^T over thousands of
        tokens can overflow, while every entry of the normalised product is a cosine in [-1, 1].
        """
        inv_q, inv_k = (paddle.rsqrt(paddle.clip(_squared_norms(_float32(t)), min=NORMALIZE_EPS ** 2))
                        for t in (q, k))
        if paddle.in_dynamic_mode() and not _eager_on_cpu(q):
            q, k = q * inv_q.unsqueeze(-1), k * inv_k.unsqueeze(-1)
            return paddle.matmul(q, k, transpose_y=True) * self.temperature
        inv_q = inv_q * self.temperature.squeeze(-1)
        return self._rescale(paddle.matmul(q, k, transpose_y=True), inv_q, inv_k)

    @staticmethod
    def _rescale(attn, row, col):
        """attn (B, h, d, d) * row (B, h, d) per row * col (B, h, d) per column, as one product with
        the outer products row col^T (a small matmul): Paddle's CPU kernels, eager and oneDNN,
        multiply by broadcast rows and columns several times slower than by a full tensor."""
        return attn * paddle.matmul(row.unsqueeze(-1), col.unsqueeze(-2))


class XCABlock(nn.Layer):
    """XCA, LPI and MLP residual branches, scaled by layer-scale gammas 1, 3 and 2."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=True, drop=0.0, attn_drop=0.0,
                 drop_path=0.0, eta=1.0):
        super().__init__()
        self.norm1 = LayerNorm(dim, epsilon=LN_EPS)
        self.attn = XCA(dim, num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop)
        self.drop_path = DropPath(drop_path)
        self.norm3 = LayerNorm(dim, epsilon=LN_EPS)
        self.local_mp = LPI(dim)
        self.norm2 = LayerNorm(dim, epsilon=LN_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)
        self.gamma1 = _layer_scale(self, dim, eta)
        self.gamma3 = _layer_scale(self, dim, eta)
        self.gamma2 = _layer_scale(self, dim, eta)

    def forward(self, x, H, W):
        x = x + self.drop_path(self.attn(self.norm1(x), scale=self.gamma1))
        x = x + self.drop_path(self.local_mp(self.norm3(x), H, W, scale=self.gamma3))
        x = x + self.drop_path(self.mlp(self.norm2(x), scale=self.gamma2))
        return x


class ClassAttention(nn.Layer):
    """Class attention (CaiT): the class token queries every token, itself included."""

    def __init__(self, dim, num_heads=8, qkv_bias=True, attn_drop=0.0, proj_drop=0.0):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = Linear(dim, dim * 3, bias_attr=None if qkv_bias else False)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, cls, patches):
        """Class token (B, 1, C) and patch tokens (B, N, C) -> the attended class token (B, 1, C)."""
        attn, v, head_of = self._attention(cls, patches)
        cls_token = paddle.matmul(self.attn_drop(attn), v, transpose_x=True)  # (B, h, C): each head's mix
        cls_token = paddle.sum(cls_token * head_of.transpose([1, 0]), axis=1, keepdim=True)  # (B, 1, C)
        return self.proj_drop(self.proj(cls_token))

    def attention_weights(self, cls, patches):
        """Class token (B, 1, C) and patch tokens (B, N, C) -> each head's softmax weights
        (B, 1 + N, h) over the class token (index 0) and the patch tokens."""
        return self._attention(cls, patches)[0]

    def _attention(self, cls, patches):
        """-> softmax weights (B, 1 + N, h), values (B, 1 + N, C) and head_of (C, h), where
        head_of[c, j] = 1 if channel c belongs to head j."""
        C = self.proj.weight.shape[0]
        h = self.num_heads
        q_part, k_part, v_part = _qkv_parts(self.qkv)
        q = _linear(cls, *q_part)  # (B, 1, C): only the class token queries
        tokens = paddle.concat([cls, patches], axis=1)
        k, v = _linear(tokens, *k_part), _linear(tokens, *v_part)  # (B, 1 + N, C)
        # Per-head products as whole-channel GEMMs
        head_of = F.one_hot(paddle.arange(C) // (C // h), h)  # (C, h)
        attn = paddle.matmul(k, q.transpose([0, 2, 1]) * head_of) * self.scale  # (B, 1 + N, h)
        return F.softmax(attn, axis=1), v, head_of


class ClassAttentionBlock(nn.Layer):
    """Class-attention block with the official quirks kept for parity.

    The class token and the patch tokens are kept apart (the official code concatenates
    them; the arithmetic per token is the same). Patch tokens are not attended to: they
    get ``gamma1 * norm1(patches)`` added, with ``tokens_norm`` go through ``norm2`` too,
    and are then added to themselves, exactly as the official code does. XCiT's
    class-attention blocks have no stochastic depth.
    """

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=True, drop=0.0, attn_drop=0.0,
                 eta=1.0, tokens_norm=False):
        super().__init__()
        self.norm1 = LayerNorm(dim, epsilon=LN_EPS)
        self.attn = ClassAttention(dim, num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop,
                                   proj_drop=drop)
        self.norm2 = LayerNorm(dim, epsilon=LN_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)
        self.gamma1 = _layer_scale(self, dim, eta)
        self.gamma2 = _layer_scale(self, dim, eta)
        self.tokens_norm = tokens_norm

    def forward(self, cls, patches, update_patches=True):
        """Class token (B, 1, C), patch tokens (B, N, C) -> both updated; the patch tokens are
        None if not ``update_patches`` (the last block's are never read)."""
        normed_patches = self.norm1(patches)
        cls = self.norm2(cls + self.gamma1 * self.attn(self.norm1(cls), normed_patches))
        cls = cls + self.mlp(cls, scale=self.gamma2)
        if not update_patches:
            return cls, None
        patches = patches + self.gamma1 * normed_patches
        if self.tokens_norm:
            patches = self.norm2(patches)
        return cls, patches + patches


def _layer_scale(layer, dim, eta):
    return layer.create_parameter([dim], default_initializer=nn.initializer.Constant(eta))


def _running_statistics(layer):
    """The running means and variances of ``layer``'s BatchNorms."""
    return [stat for bn in layer.sublayers(include_self=True) if isinstance(bn, (nn.BatchNorm2D, nn.SyncBatchNorm))
            for stat in (bn._mean, bn._variance)]


def _recomputed(block, x, H, W):
    """``block(x, H, W)`` without keeping its activations for the backward pass, which runs the
    block a second time to get them (with the same dropout and drop-path draws: Paddle's
    generator state is replayed). The second run starts the BatchNorm running statistics from
    where the first one started, so it leaves them as the first run did: training gives the
    same weights and statistics as without checkpointing."""
    statistics = _running_statistics(block)
    start = [stat.clone() for stat in statistics]
    runs = []

    def run(x):
        if runs:  # the recomputation during the backward pass
            for stat, value in zip(statistics, start):
                paddle.assign(value, output=stat)
        runs.append(True)
        return block(x, H, W)
    return recompute(run, x)


class XCiT(nn.Layer):
    """Cross-Covariance Image Transformer.

    ``forward(x)``: images (B, 3, H, W), any H and W -> logits (B, num_classes), in train
    and eval mode alike. ``forward_features(x)`` -> final-norm class token (B, embed_dim);
    ``forward_intermediates(x, indices)`` -> XCA block outputs as feature maps;
    ``class_attention_maps(x)`` -> where the class token looks, per head. Fine-tuning:
    ``reset_classifier(n)``, ``freeze_backbone()``, ``set_grad_checkpointing()``,
    ``no_weight_decay()``. With ``num_classes`` 0 there is no head and ``forward`` returns
    the features.
    """

    def __init__(self, patch_size=16, num_classes=1000, embed_dim=768, depth=12, num_heads=12,
                 mlp_ratio=4.0, qkv_bias=True, drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.0,
                 cls_attn_layers=2, use_pos=True, eta=1.0, tokens_norm=False):
        super().__init__()
        self.num_classes = num_classes
        self.num_features = self.embed_dim = embed_dim
        self.patch_embed = ConvPatchEmbed(patch_size=patch_size, embed_dim=embed_dim)
        self.cls_token = self.create_parameter([1, 1, embed_dim], default_initializer=trunc_normal_init())
        self.pos_drop = nn.Dropout(drop_rate)
        # Stochastic depth is the same for every block, as in the official code.
        self.blocks = nn.LayerList([
            XCABlock(embed_dim, num_heads, mlp_ratio, qkv_bias, drop_rate, attn_drop_rate,
                     drop_path=drop_path_rate, eta=eta)
            for _ in range(depth)])
        self.cls_attn_blocks = nn.LayerList([
            ClassAttentionBlock(embed_dim, num_heads, mlp_ratio, qkv_bias, drop_rate, attn_drop_rate,
                                eta=eta, tokens_norm=tokens_norm)
            for _ in range(cls_attn_layers)])
        self.norm = LayerNorm(embed_dim, epsilon=LN_EPS)
        self.head = self._new_head(num_classes)
        self.pos_embeder = PositionalEncodingFourier(dim=embed_dim)
        self.use_pos = use_pos
        self.grad_checkpointing = False
        self.backbone_frozen = False
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(layer):
        if isinstance(layer, nn.Linear):
            trunc_normal_init()(layer.weight)
            if layer.bias is not None:
                nn.initializer.Constant(0.0)(layer.bias)
        elif isinstance(layer, nn.LayerNorm):
            nn.initializer.Constant(1.0)(layer.weight)
            nn.initializer.Constant(0.0)(layer.bias)
        elif isinstance(layer, nn.Conv2D):
            torch_default_conv_init(layer)

    def _new_head(self, num_classes):
        return Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    def get_classifier(self):
        return self.head

    def reset_classifier(self, num_classes):
        """Replaces the head by a freshly initialised one with ``num_classes`` outputs (for
        fine-tuning on other classes); with 0, ``forward`` returns the features."""
        self.num_classes = num_classes
        self.head = self._new_head(num_classes)
        self.head.apply(self._init_weights)

    def set_grad_checkpointing(self, enable=True):
        """Gradient checkpointing of the XCA blocks in training: each block keeps only its input
        and recomputes its activations in the backward pass: the activation memory of one block
        instead of all, for one more forward pass of the blocks (10-20% more time per training
        step on CPU). Results are unchanged."""
        self.grad_checkpointing = enable

    def freeze_backbone(self, frozen=True):
        """Trains the classifier head alone (a linear probe, e.g. of self-supervised DINO
        features): every other parameter stops taking gradients, and under ``train()`` the rest
        of the model stays in eval mode, so its BatchNorm statistics do not move and dropout and
        drop path are off; the head learns on the features the model gives at inference.
        ``freeze_backbone(False)`` undoes both."""
        self.backbone_frozen = frozen
        # the head trains; BatchNorm running statistics never take gradients
        kept = {id(p) for p in self.head.parameters() + _running_statistics(self)}
        for p in self.parameters():
            if id(p) not in kept:
                p.stop_gradient = frozen
        if self.training:
            self.train()

    def train(self, *args, **kwargs):
        """``nn.Layer.train``; with a frozen backbone only the head is put in training mode."""
        result = super().train(*args, **kwargs)
        if self.training and self.backbone_frozen:
            for layer in self.sublayers():
                layer.training = False
            for layer in [self.head] + self.head.sublayers():
                layer.training = True
        return result

    def no_weight_decay(self):
        """Names of the parameters that, besides all 1-D ones, get no weight decay."""
        return {'cls_token'}

    def forward_features(self, x):
        """(B, 3, H, W) -> final-norm class token (B, embed_dim)."""
        cls, x, _ = self._class_token_and_patches(x)
        last = len(self.cls_attn_blocks) - 1
        for i, blk in enumerate(self.cls_attn_blocks):
            cls, x = blk(cls, x, update_patches=i < last)
        return self.norm(cls[:, 0])  # LayerNorm is per token: only the class token's is needed

    def class_attention_maps(self, x, return_outputs=False):
        """(B, 3, H, W) -> (B, num_heads, Hp, Wp): the softmax weight each head of the last
        class-attention block gives every patch, on the token grid (the weight of the class
        token on itself, the rest to 1, is left out). With ``return_outputs``, ``(maps,
        forward(x))`` from the same pass through the XCA blocks."""
        if not self.cls_attn_blocks:
            raise ValueError('this XCiT has no class-attention blocks (cls_attn_layers=0)')
        cls, x, (Hp, Wp) = self._class_token_and_patches(x)
        for blk in self.cls_attn_blocks[:-1]:
            cls, x = blk(cls, x)
        last = self.cls_attn_blocks[-1]
        weights = last.attn.attention_weights(last.norm1(cls), last.norm1(x))  # (B, 1 + N, h)
        maps = weights[:, 1:].transpose([0, 2, 1]).reshape([0, 0, Hp, Wp])
        if not return_outputs:
            return maps
        cls, _ = last(cls, x, update_patches=False)
        return maps, self.head(self.norm(cls[:, 0]))

    def forward_intermediates(self, x, indices=4):
        """(B, 3, H, W) -> the patch tokens after some XCA blocks as feature maps
        [(B, embed_dim, Hp, Wp), ...], for dense prediction (XCiT's detection and segmentation
        backbones take blocks 3, 5, 7 and 11 of the 12-block models). ``indices``: an int n for
        the last n blocks, or a list of block indices (negative ones count from the end); the
        blocks after the last one asked for are not run."""
        depth = len(self.blocks)
        if isinstance(indices, int):
            if not 0 < indices <= depth:
                raise ValueError(f'the last {indices} blocks: there are {depth} XCA blocks')
            indices = range(depth - indices, depth)
        wanted = sorted({i + depth if i < 0 else i for i in indices})
        if not wanted or wanted[0] < 0 or wanted[-1] >= depth:
            raise ValueError(f'block indices {indices} do not select among the {depth} XCA blocks')
        x, (Hp, Wp) = self._embedded_patches(x)
        maps = []
        for i, blk in enumerate(self.blocks[:wanted[-1] + 1]):
            x = self._run_block(blk, x, Hp, Wp)
            if i in wanted:
                maps.append(x.transpose([0, 2, 1]).reshape([0, 0, Hp, Wp]))
        return maps

    def _run_block(self, blk, x, Hp, Wp):
        """``blk(x, Hp, Wp)``, recomputed in the backward pass under gradient checkpointing."""
        checkpointing = self.grad_checkpointing and self.training and paddle.in_dynamic_mode() \
            and paddle.is_grad_enabled()
        # an input without gradient (frozen stem) would hide the block's own gradients
        if checkpointing and not x.stop_gradient:
            return _recomputed(blk, x, Hp, Wp)
        return blk(x, Hp, Wp)

    def _embedded_patches(self, x):
        """(B, 3, H, W) -> the patch tokens entering the XCA blocks (B, N, C) and their grid (Hp, Wp)."""
        x, (Hp, Wp) = self.patch_embed(x)
        if self.use_pos:
            x = x + self.pos_embeder(Hp, Wp)
        return self.pos_drop(x), (Hp, Wp)

    def _class_token_and_patches(self, x):
        """(B, 3, H, W) -> the class token (B, 1, C), the patch tokens after the XCA blocks
        (B, N, C) and the token grid (Hp, Wp)."""
        x, (Hp, Wp) = self._embedded_patches(x)
        for blk in self.blocks:
            x = self._run_block(blk, x, Hp, Wp)
        # In graph mode the batch comes from paddle.shape: with the size that to_static's x.shape
        # gives, Paddle 2.6's oneDNN predictor leaves the class token unexpanded.
        batch = x.shape[0] if paddle.in_dynamic_mode() else paddle.shape(x)[0]
        return self.cls_token.expand([batch, -1, -1]), x, (Hp, Wp)

    def forward(self, x):
        return self.head(self.forward_features(x))


def build_xcit(config):
    """Builds an XCiT from a config's ``MODEL`` section (see ``config.py``)."""
    m = config.MODEL
    return XCiT(
        patch_size=m.PATCH_SIZE, num_classes=m.NUM_CLASSES, embed_dim=m.EMBED_DIM, depth=m.DEPTH,
        num_heads=m.NUM_HEADS, mlp_ratio=m.MLP_RATIO, qkv_bias=m.QKV_BIAS, drop_rate=m.DROPOUT,
        attn_drop_rate=m.ATTENTION_DROPOUT, drop_path_rate=m.DROPPATH,
        cls_attn_layers=m.CLS_ATTN_LAYERS, use_pos=m.USE_POS, eta=m.ETA, tokens_norm=m.TOKENS_NORM)
