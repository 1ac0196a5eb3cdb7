"""RegNetY-16GF (Radosavovic et al., 2020), the convolutional teacher of DeiT-style distillation.

The network and its parameter names follow timm's ``regnety_160`` (the model DeiT distilled
from), so that its checkpoint converts by name with ``port_weights/convert_regnet.py``:
``stem.conv``, ``stem.bn``, ``s{1..4}.b{1..}.{conv1,conv2,conv3}.{conv,bn}``, ``.se.fc1/fc2``,
``.downsample.{conv,bn}`` and ``head.fc``. Weights are meant to be loaded from such a
checkpoint; the initialisation is Paddle's default.
"""
import numpy as np
import paddle.nn as nn

__all__ = ['RegNet', 'regnet_stages', 'regnety_160']

BN_MOMENTUM = 0.9  # Paddle's convention for torch's 0.1
BN_EPS = 1e-5

# timm's regnety_160: RegNetCfg(w0=200, wa=106.23, wm=2.48, group_size=112, depth=18, se_ratio=0.25)
REGNETY_160 = dict(w0=200, wa=106.23, wm=2.48, group_size=112, depth=18, se_ratio=0.25)


def regnet_stages(w0, wa, wm, depth, group_size, q=8):
    """Stage widths, depths and group sizes from the RegNet parameters.

    Block j gets the continuous width ``w0 + wa * j``, snapped to ``w0 * wm**k`` (k an integer)
    and rounded to a multiple of ``q``; equal widths form a stage. Each stage width is then
    rounded to a multiple of its group size (capped at the width).
    Returns three lists: widths, depths, group sizes (regnety_160: [224, 448, 1232, 3024],
    [2, 4, 11, 1], all 112).
    """
    widths_cont = np.arange(depth) * wa + w0
    exps = np.round(np.log(widths_cont / w0) / np.log(wm))
    widths = (np.round(w0 * np.power(wm, exps) / q) * q).astype(int)
    stage_widths, stage_depths = np.unique(widths, return_counts=True)
    groups = [min(group_size, int(w)) for w in stage_widths]
    stage_widths = [int(round(w / g) * g) for w, g in zip(stage_widths, groups)]
    return stage_widths, [int(d) for d in stage_depths], groups


class ConvBnAct(nn.Layer):
    """Conv (no bias, 'same' padding for odd kernels) -> BatchNorm -> optional ReLU."""

    def __init__(self, in_chs, out_chs, kernel_size, stride=1, groups=1, act=True):
        super().__init__()
        self.conv = nn.Conv2D(in_chs, out_chs, kernel_size, stride=stride, padding=kernel_size // 2,
                              groups=groups, bias_attr=False)
        self.bn = nn.BatchNorm2D(out_chs, momentum=BN_MOMENTUM, epsilon=BN_EPS)
        self.act = nn.ReLU() if act else nn.Identity()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class SqueezeExcite(nn.Layer):
    """Channel gate: global average -> 1x1 conv -> ReLU -> 1x1 conv -> sigmoid, times the input."""

    def __init__(self, channels, reduced):
        super().__init__()
        self.fc1 = nn.Conv2D(channels, reduced, 1)
        self.act = nn.ReLU()
        self.fc2 = nn.Conv2D(reduced, channels, 1)
        self.gate = nn.Sigmoid()

    def forward(self, x):
        s = x.mean(axis=[2, 3], keepdim=True)
        return x * self.gate(self.fc2(self.act(self.fc1(s))))


class Bottleneck(nn.Layer):
    """RegNetY block: 1x1 -> grouped 3x3 (stride) -> SE -> 1x1 (no ReLU), plus the shortcut, ReLU.

    The SE width is ``round(in_chs * se_ratio)`` (from the block's input width, as timm); the
    shortcut is a strided 1x1 conv + BN when the shape changes, the identity otherwise.
    """

    def __init__(self, in_chs, out_chs, stride, group_size, se_ratio):
        super().__init__()
        self.conv1 = ConvBnAct(in_chs, out_chs, 1)
        self.conv2 = ConvBnAct(out_chs, out_chs, 3, stride=stride, groups=out_chs // group_size)
        self.se = SqueezeExcite(out_chs, int(round(in_chs * se_ratio)))
        self.conv3 = ConvBnAct(out_chs, out_chs, 1, act=False)
        if in_chs != out_chs or stride != 1:
            self.downsample = ConvBnAct(in_chs, out_chs, 1, stride=stride, act=False)
        else:
            self.downsample = nn.Identity()
        self.act3 = nn.ReLU()

    def forward(self, x):
        shortcut = self.downsample(x)
        x = self.conv3(self.se(self.conv2(self.conv1(x))))
        return self.act3(x + shortcut)


class ClassifierHead(nn.Layer):
    """Global average pooling -> Linear: (B, C, H, W) -> (B, num_classes)."""

    def __init__(self, in_chs, num_classes):
        super().__init__()
        self.fc = nn.Linear(in_chs, num_classes)

    def forward(self, x):
        return self.fc(x.mean(axis=[2, 3]))


class RegNet(nn.Layer):
    """RegNet-Y with bottleneck ratio 1: stem (3x3 stride-2 conv, 32 channels), four stride-2
    stages named ``s1``..``s4`` of blocks ``b1``..``bN``, and ``head``.

    ``forward(x)``: images (B, 3, H, W) -> logits (B, num_classes).
    """

    def __init__(self, w0, wa, wm, depth, group_size, se_ratio, num_classes=1000, stem_width=32):
        super().__init__()
        self.num_classes = num_classes
        self.stem = ConvBnAct(3, stem_width, 3, stride=2)
        in_chs = stem_width
        stages = zip(*regnet_stages(w0, wa, wm, depth, group_size))
        for i, (width, stage_depth, stage_group) in enumerate(stages):
            # the first block of a stage changes width and halves the resolution
            stage = nn.Sequential(*[
                (f'b{j + 1}', Bottleneck(width if j else in_chs, width, 1 if j else 2, stage_group, se_ratio))
                for j in range(stage_depth)])
            self.add_sublayer(f's{i + 1}', stage)
            in_chs = width
        self.num_features = in_chs
        self.head = ClassifierHead(in_chs, num_classes)

    def forward(self, x):
        for layer in self.children():
            x = layer(x)
        return x


def regnety_160(num_classes=1000):
    """RegNetY-16GF as timm's ``regnety_160``: 83,590,140 parameters with 1000 classes."""
    return RegNet(num_classes=num_classes, **REGNETY_160)
