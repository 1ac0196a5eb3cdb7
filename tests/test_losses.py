"""Losses against hand computations in numpy."""
import numpy as np
import paddle
import pytest

from config import get_config, merge_from_list
from losses import DistillationLoss, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy, build_criterion
from mixup import mixup_active

RNG = np.random.default_rng(0)
STUDENT = RNG.normal(size=(4, 6)).astype('float32') * 2
TEACHER = RNG.normal(size=(4, 6)).astype('float32') * 2
LABELS = np.array([0, 3, 5, 1], dtype='int64')
INPUTS = RNG.normal(size=(4, 3, 8, 8)).astype('float32')


def log_softmax(x):
    x = x.astype('float64')
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def cross_entropy(logits, labels):
    return -log_softmax(logits)[np.arange(len(labels)), labels].mean()


class FixedTeacher(paddle.nn.Layer):
    """Returns TEACHER whatever the input; counts calls and records whether grads were on."""

    def __init__(self):
        super().__init__()
        self.calls, self.grad_enabled = 0, None

    def forward(self, x):
        assert x.shape == list(INPUTS.shape)
        self.calls += 1
        self.grad_enabled = paddle.is_grad_enabled()
        return paddle.to_tensor(TEACHER)


def t(a):
    return paddle.to_tensor(a)


def config_with(*opts):
    config = get_config()
    config.defrost()
    merge_from_list(config, list(opts))
    config.freeze()
    return config


def test_soft_target_cross_entropy():
    target = np.abs(RNG.normal(size=(4, 6))).astype('float32')
    target /= target.sum(axis=1, keepdims=True)
    expected = (-target * log_softmax(STUDENT)).sum(axis=1).mean()
    got = float(SoftTargetCrossEntropy()(t(STUDENT), t(target)))
    assert got == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize('smoothing', [0.0, 0.1, 0.3])
def test_label_smoothing_cross_entropy(smoothing):
    logp = log_softmax(STUDENT)
    nll = -logp[np.arange(4), LABELS]
    expected = ((1 - smoothing) * nll + smoothing * -logp.mean(axis=1)).mean()
    got = float(LabelSmoothingCrossEntropy(smoothing)(t(STUDENT), t(LABELS)))
    assert got == pytest.approx(expected, rel=1e-5)


def test_label_smoothing_equals_cross_entropy_against_smoothed_one_hot():
    smoothing, classes = 0.1, STUDENT.shape[1]
    soft = np.full((4, classes), smoothing / classes, dtype='float32')
    soft[np.arange(4), LABELS] += 1 - smoothing
    a = float(LabelSmoothingCrossEntropy(smoothing)(t(STUDENT), t(LABELS)))
    b = float(SoftTargetCrossEntropy()(t(STUDENT), t(soft)))
    assert a == pytest.approx(b, rel=1e-5)


@pytest.mark.parametrize('tau', [1.0, 3.0])
def test_soft_distillation_is_deit_kl(tau):
    teacher = FixedTeacher()
    loss = DistillationLoss(paddle.nn.CrossEntropyLoss(), teacher, 'soft', alpha=0.5, tau=tau)
    got = float(loss(t(INPUTS), t(STUDENT), t(LABELS)))
    # F.kl_div(log_softmax(s/T), log_softmax(t/T), reduction='sum', log_target=True) * T*T / numel
    ls, lt = log_softmax(STUDENT / tau), log_softmax(TEACHER / tau)
    kl = (np.exp(lt) * (lt - ls)).sum() * tau * tau / STUDENT.size
    assert kl > 0.01
    assert got == pytest.approx(0.5 * cross_entropy(STUDENT, LABELS) + 0.5 * kl, rel=1e-5)
    assert teacher.calls == 1 and teacher.grad_enabled is False


def test_soft_distillation_of_identical_logits_is_zero():
    class Echo(paddle.nn.Layer):
        def forward(self, x):
            return paddle.to_tensor(STUDENT)
    loss = DistillationLoss(paddle.nn.CrossEntropyLoss(), Echo(), 'soft', alpha=1.0, tau=2.0)
    assert float(loss(t(INPUTS), t(STUDENT), t(LABELS))) == pytest.approx(0.0, abs=1e-6)


def test_hard_distillation_uses_teacher_argmax():
    loss = DistillationLoss(paddle.nn.CrossEntropyLoss(), FixedTeacher(), 'hard', alpha=0.5, tau=1.0)
    got = float(loss(t(INPUTS), t(STUDENT), t(LABELS)))
    expected = 0.5 * cross_entropy(STUDENT, LABELS) + 0.5 * cross_entropy(STUDENT, TEACHER.argmax(axis=1))
    assert got == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize('alpha', [0.0, 0.25, 1.0])
def test_alpha_mixes_base_and_distillation(alpha):
    loss = DistillationLoss(paddle.nn.CrossEntropyLoss(), FixedTeacher(), 'hard', alpha=alpha, tau=1.0)
    got = float(loss(t(INPUTS), t(STUDENT), t(LABELS)))
    base, distill = cross_entropy(STUDENT, LABELS), cross_entropy(STUDENT, TEACHER.argmax(axis=1))
    assert got == pytest.approx((1 - alpha) * base + alpha * distill, rel=1e-5)


def test_distillation_gradient_reaches_student_only():
    student = t(STUDENT)
    student.stop_gradient = False
    loss = DistillationLoss(paddle.nn.CrossEntropyLoss(), FixedTeacher(), 'soft', alpha=1.0, tau=1.0)
    loss(t(INPUTS), student, t(LABELS)).backward()
    # d/ds of sum KL(t||s) / numel = (softmax(s) - softmax(t)) / numel
    p = np.exp(log_softmax(STUDENT))
    q = np.exp(log_softmax(TEACHER))
    np.testing.assert_allclose(student.grad.numpy(), (p - q) / STUDENT.size, atol=1e-7)


def test_none_does_not_run_the_teacher():
    teacher = FixedTeacher()
    loss = DistillationLoss(paddle.nn.CrossEntropyLoss(), teacher, 'none', alpha=0.5, tau=1.0)
    expected = cross_entropy(STUDENT, LABELS)
    assert float(loss(t(INPUTS), t(STUDENT), t(LABELS))) == pytest.approx(expected, rel=1e-5)
    assert teacher.calls == 0


def test_distillation_argument_errors():
    with pytest.raises(ValueError, match='needs a teacher'):
        DistillationLoss(paddle.nn.CrossEntropyLoss(), None, 'soft', 0.5, 1.0)
    with pytest.raises(ValueError, match='must be one of'):
        DistillationLoss(paddle.nn.CrossEntropyLoss(), FixedTeacher(), 'medium', 0.5, 1.0)


def test_build_criterion_picks_the_base_loss():
    # defaults: mixup 0.8 / cutmix 1.0 -> soft targets
    assert mixup_active(get_config())
    assert isinstance(build_criterion(get_config()).base_criterion, SoftTargetCrossEntropy)
    no_mix = ('TRAIN.MIXUP_ALPHA', 0.0, 'TRAIN.CUTMIX_ALPHA', 0.0)
    assert isinstance(build_criterion(config_with('TRAIN.CUTMIX_ALPHA', 0.0)).base_criterion,
                      SoftTargetCrossEntropy)
    assert isinstance(build_criterion(config_with(*no_mix, 'TRAIN.CUTMIX_MINMAX', [0.2, 0.8])).base_criterion,
                      SoftTargetCrossEntropy)
    smoothing = build_criterion(config_with(*no_mix)).base_criterion
    assert isinstance(smoothing, LabelSmoothingCrossEntropy) and smoothing.smoothing == 0.1
    assert isinstance(build_criterion(config_with('TRAIN.MIXUP_PROB', 0.0)).base_criterion,
                      LabelSmoothingCrossEntropy)
    plain = build_criterion(config_with(*no_mix, 'TRAIN.SMOOTHING', 0.0))
    assert isinstance(plain.base_criterion, paddle.nn.CrossEntropyLoss)
    expected = cross_entropy(STUDENT, LABELS)
    assert float(plain(t(INPUTS), t(STUDENT), t(LABELS))) == pytest.approx(expected, rel=1e-5)


def test_build_criterion_distillation():
    config = config_with('TRAIN.DISTILLATION_TYPE', 'hard', 'TRAIN.DISTILLATION_ALPHA', 0.3,
                         'TRAIN.MIXUP_ALPHA', 0.0, 'TRAIN.CUTMIX_ALPHA', 0.0, 'TRAIN.SMOOTHING', 0.0)
    with pytest.raises(ValueError, match='TRAIN.DISTILLATION_TYPE.*teacher'):
        build_criterion(config)
    criterion = build_criterion(config, FixedTeacher())
    expected = 0.7 * cross_entropy(STUDENT, LABELS) + 0.3 * cross_entropy(STUDENT, TEACHER.argmax(axis=1))
    assert float(criterion(t(INPUTS), t(STUDENT), t(LABELS))) == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match='TRAIN.DISTILLATION_TYPE'):
        build_criterion(config_with('TRAIN.DISTILLATION_TYPE', 'soft-ish'), FixedTeacher())


def test_build_criterion_takes_smoothing_and_tau_from_the_config():
    """TRAIN.SMOOTHING sets the label smoothing of the base loss, TRAIN.DISTILLATION_TAU the
    temperature of soft distillation (values other than the defaults 0.1 and 1.0)."""
    smoothing = build_criterion(config_with('TRAIN.MIXUP_ALPHA', 0.0, 'TRAIN.CUTMIX_ALPHA', 0.0,
                                            'TRAIN.SMOOTHING', 0.3))
    logp = log_softmax(STUDENT)
    expected = (0.7 * -logp[np.arange(4), LABELS] + 0.3 * -logp.mean(axis=1)).mean()
    assert float(smoothing(t(INPUTS), t(STUDENT), t(LABELS))) == pytest.approx(expected, rel=1e-5)

    tau = 3.0
    soft = build_criterion(config_with('TRAIN.MIXUP_ALPHA', 0.0, 'TRAIN.CUTMIX_ALPHA', 0.0, 'TRAIN.SMOOTHING', 0.0,
                                       'TRAIN.DISTILLATION_TYPE', 'soft', 'TRAIN.DISTILLATION_ALPHA', 1.0,
                                       'TRAIN.DISTILLATION_TAU', tau), FixedTeacher())
    ls, lt = log_softmax(STUDENT / tau), log_softmax(TEACHER / tau)
    kl = (np.exp(lt) * (lt - ls)).sum() * tau * tau / STUDENT.size
    assert float(soft(t(INPUTS), t(STUDENT), t(LABELS))) == pytest.approx(kl, rel=1e-5)
