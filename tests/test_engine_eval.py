"""Evaluation through the entry points: exact known-answer metrics with a golden checkpoint,
loading rules for -pretrained, and the paddle.inference fast path with its dygraph fallback."""
import json
import os
import subprocess
import sys
import time
import warnings

import numpy as np
import paddle
import pytest
from PIL import Image

from conftest import GOLDEN, ROOT
import engine
import main_single_gpu
from config import get_config
from port_weights.convert import convert_file
from transforms import build_eval_transform
from utils import CheckpointError, setup_logger
from xcit import build_xcit

NUM_IMAGES = 40
NUM_CLASSES = 10
# the golden 'mini_p8_tokens_norm' architecture, on 32 px images
GOLDEN_YAML = """\
DATA:
  DATASET: imagefolder
  IMAGE_SIZE: 32
  NUM_WORKERS: 0
MODEL:
  NAME: golden_mini_p8
  NUM_CLASSES: 10
  PATCH_SIZE: 8
  EMBED_DIM: 64
  DEPTH: 2
  NUM_HEADS: 4
  ETA: 1.0e-5
  TOKENS_NORM: True
REPORT_FREQ: 2
"""


def random_images(count, seed):
    """Smooth random RGB images, 40x48 (resized and centre-cropped to 32x32 by evaluation)."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        coarse = rng.integers(0, 256, size=(5, 6, 3), dtype=np.uint8)
        images.append(Image.fromarray(coarse).resize((48, 40), Image.Resampling.BILINEAR))
    return images


def choose_labels(logits, margin=2e-4):
    """Known answers from the model's own ranking: image i is labelled with its top-1 class
    (i % 3 == 0), its 3rd class (i % 3 == 1: in the top 5, not top 1) or one ranked 6th or lower
    (i % 3 == 2, the least used so far, so that every class folder gets images). A label's logit
    is at least ``margin`` from every other, so the answers survive rounding differences.
    Returns labels and the expected correct@1 and correct@5 counts."""
    order = np.argsort(-logits, axis=1)
    counts = np.zeros(NUM_CLASSES, dtype=int)
    labels = []
    for i, ranked in enumerate(order):
        clear = [c for c in ranked if np.sort(np.abs(logits[i] - logits[i][c]))[1] > margin]
        if i % 3 == 0:
            candidates = ranked[:1]
        elif i % 3 == 1:
            candidates = ranked[2:3]
        else:
            candidates = sorted(ranked[5:], key=lambda c: counts[c])
        label = next(c for c in candidates if c in clear)  # StopIteration: choose another image seed
        counts[label] += 1
        labels.append(int(label))
    assert counts.min() > 0, 'a class got no image; choose another image seed'
    correct1 = sum(1 for i in range(len(labels)) if i % 3 == 0)
    correct5 = sum(1 for i in range(len(labels)) if i % 3 != 2)
    return np.array(labels), correct1, correct5


@pytest.fixture(scope='module')
def golden(tmp_path_factory):
    """A converted golden checkpoint cut to 10 classes, and an image folder labelled from its
    own predictions, with the expected Acc@1, Acc@5 and mean loss."""
    root = tmp_path_factory.mktemp('golden_eval')
    cfg = root / 'golden.yaml'
    cfg.write_text(GOLDEN_YAML)
    full = root / 'golden_1000.pdparams'
    convert_file(os.path.join(GOLDEN, 'mini_p8_tokens_norm.pth'), str(full))
    state = paddle.load(str(full))
    state['head.weight'] = np.asarray(state['head.weight'])[:, :NUM_CLASSES]
    state['head.bias'] = np.asarray(state['head.bias'])[:NUM_CLASSES]
    weights = root / 'golden_10.pdparams'
    paddle.save(state, str(weights))

    config = get_config(str(cfg))
    model = build_xcit(config)
    model.set_state_dict(paddle.load(str(weights)))
    model.eval()
    images = random_images(NUM_IMAGES, seed=3)
    transform = build_eval_transform(config)
    with paddle.no_grad():
        logits = model(paddle.to_tensor(np.stack([transform(im) for im in images]))).numpy().astype(np.float64)
    labels, correct1, correct5 = choose_labels(logits)
    for i, (image, label) in enumerate(zip(images, labels)):
        folder = root / 'data' / 'val' / f'class{label}'
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f'img{i:02d}.png')
    log_norm = np.log(np.exp(logits).sum(axis=1))
    loss = float(np.mean(log_norm - logits[np.arange(NUM_IMAGES), labels]))
    return dict(cfg=str(cfg), weights=str(weights), full=str(full), data=str(root / 'data'), root=root,
                acc1=100.0 * correct1 / NUM_IMAGES, acc5=100.0 * correct5 / NUM_IMAGES, loss=loss)


def eval_args(golden, output, *extra):
    return ['-cfg', golden['cfg'], '-data_path', golden['data'], '-pretrained', golden['weights'],
            '-output', str(output), '-eval', '-batch_size_eval', '6', *extra]


def test_known_answer_accuracy_is_exact(golden, tmp_path, capsys):
    summary = main_single_gpu.main(eval_args(golden, tmp_path, '-amp'))
    assert summary['images'] == NUM_IMAGES
    assert summary['acc1'] == pytest.approx(golden['acc1'], abs=1e-9)  # 14 of 40
    assert summary['acc5'] == pytest.approx(golden['acc5'], abs=1e-9)  # 27 of 40
    assert summary['acc1'] != summary['acc5']
    assert summary['loss'] == pytest.approx(golden['loss'], abs=1e-4)
    assert summary['path'] in ('inference', 'dygraph') and summary['device'] == 'cpu'  # the faster one
    out = capsys.readouterr().out
    assert '-amp has no effect on CPU' in out
    val = os.path.join(golden['data'], 'val')  # no train/ beside it and no DATA.CLASS_NAMES: its own folders
    assert f'40 images of 10 classes, labelled in the order of the class folders of {val}' in out
    assert 'eval model: batch 2/7' in out  # progress every REPORT_FREQ batches
    assert 'paddle.inference' in out  # on the CPU the predictor is tried, and its verdict logged
    last_line = out.strip().splitlines()[-1]
    assert json.loads(last_line) == summary
    assert json.loads((tmp_path / 'eval_summary.json').read_text()) == summary


def test_training_checkpoint_as_pretrained_and_its_ema(golden, tmp_path):
    """A training checkpoint works for -pretrained; -ema evaluates its 'model_ema' weights."""
    plain = paddle.load(golden['weights'])
    negated = {k: -np.asarray(v) if k.startswith('head.') else v for k, v in plain.items()}
    checkpoint = tmp_path / 'train.pdparams'
    paddle.save({'model': negated, 'model_ema': plain, 'epoch': 3}, str(checkpoint))
    args = eval_args(golden, tmp_path)
    args[args.index('-pretrained') + 1] = str(checkpoint)
    ema = main_single_gpu.main(args + ['-ema'])
    assert ema['acc1'] == pytest.approx(golden['acc1']) and ema['ema'] is True
    model = main_single_gpu.main(args)
    assert model['acc1'] <= 25.0  # negated logits: only labels ranked last before can be top-1 now


def test_eval_of_a_resume_checkpoint_summarises_what_was_evaluated(golden, tmp_path):
    """-eval -resume CHECKPOINT -ema evaluates the checkpoint's EMA weights; the summary names that
    checkpoint, the EMA, the dataset, the model, the device and the process count."""
    plain = paddle.load(golden['weights'])
    negated = {k: -np.asarray(v) if k.startswith('head.') else v for k, v in plain.items()}
    checkpoint = tmp_path / 'last.pdparams'
    paddle.save({'model': negated, 'model_ema': plain, 'optimizer': {}, 'epoch': 3}, str(checkpoint))
    args = eval_args(golden, tmp_path / 'out', '-ema')
    args[args.index('-pretrained')] = '-resume'
    args[args.index('-resume') + 1] = str(checkpoint)
    summary = main_single_gpu.main(args)
    assert (summary['acc1'], summary['acc5'], summary['images']) == (golden['acc1'], golden['acc5'], NUM_IMAGES)
    assert {k: summary[k] for k in ('weights', 'ema', 'dataset', 'model', 'device', 'processes')} == {
        'weights': str(checkpoint), 'ema': True, 'dataset': 'imagefolder', 'model': 'golden_mini_p8',
        'device': 'cpu', 'processes': 1}
    assert json.loads((tmp_path / 'out' / 'eval_summary.json').read_text()) == summary


def test_a_failed_summary_write_keeps_the_previous_summary(tmp_path):
    """write_json writes to a temporary file and renames it: a write that fails part way leaves the
    summary that was there intact, not truncated, and no temporary file beside it."""
    from utils import write_json
    path = tmp_path / 'eval_summary.json'
    write_json(str(path), {'acc1': 71.5, 'loss': float('nan')})
    before = path.read_text()
    with pytest.raises(TypeError):
        write_json(str(path), {'acc1': 72.0, 'weights': object()})
    assert path.read_text() == before and json.loads(before) == {'acc1': 71.5, 'loss': None}
    assert [p.name for p in tmp_path.iterdir()] == ['eval_summary.json']


def test_an_output_the_system_refuses_is_one_error_line(golden, tmp_path, capsys):
    """A folder where -eval writes eval_summary.json (as a full disk or a permission would): one
    line naming the file, after the evaluation; it was a traceback."""
    (tmp_path / 'eval_summary.json').mkdir()
    with pytest.raises(SystemExit) as stop:
        engine.exit_on_user_error(main_single_gpu.main, eval_args(golden, tmp_path))
    assert stop.value.code == 1
    assert capsys.readouterr().err.endswith(f'error: cannot write {tmp_path / "eval_summary.json"} (Is a directory); '
                                            f'the file is as it was before\n')


def test_a_metrics_line_the_system_refuses_names_the_file(tmp_path, monkeypatch):
    from utils import MetricsLog, OutputWriteError
    log = MetricsLog(str(tmp_path))
    (tmp_path / 'metrics.jsonl').mkdir()
    with pytest.raises(OutputWriteError, match=f'cannot write {tmp_path / "metrics.jsonl"} \\(Is a directory\\)'):
        log.write('val', epoch=1, step=10, loss=1.0)


def test_the_summary_of_diverged_weights_is_standard_json(golden, tmp_path, capsys):
    """NaN logits: the loss is NaN, which JSON cannot hold; the summary writes it as null."""
    state = dict(paddle.load(golden['weights']))
    state['head.bias'] = np.full(np.asarray(state['head.bias']).shape, np.nan, dtype=np.float32)
    weights = tmp_path / 'nan.pdparams'
    paddle.save(state, str(weights))
    args = eval_args(golden, tmp_path)
    args[args.index('-pretrained') + 1] = str(weights)
    summary = main_single_gpu.main(args)
    assert np.isnan(summary['loss']) and summary['acc1'] == 0.0

    def refuse(constant):
        raise ValueError(f'{constant} is not JSON')
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1], parse_constant=refuse)
    written = json.loads((tmp_path / 'eval_summary.json').read_text(), parse_constant=refuse)
    assert printed['loss'] is None and written == printed


def test_amp_runs_only_on_a_gpu_with_float16(monkeypatch, caplog):
    logger = setup_logger()
    logger.propagate = True
    monkeypatch.setattr(paddle.amp, 'is_float16_supported', lambda device: device == 'gpu:1')
    assert engine.amp_runs_on('gpu:1', logger) and not caplog.text
    assert not engine.amp_runs_on('gpu:0', logger)
    assert '-amp has no effect on gpu:0, which has no float16 support: computing in float32' in caplog.text
    assert not engine.amp_runs_on('cpu', logger) and '-amp has no effect on CPU' in caplog.text


def test_repeated_opts_all_apply():
    cfg = os.path.join(ROOT, 'configs', 'xcit_nano_12_p16_224.yaml')
    config = engine.parse_config(['-cfg', cfg, '-opts', 'TRAIN.NUM_EPOCHS', '1', '-opts', 'DATA.BATCH_SIZE', '8'])
    assert (config.TRAIN.NUM_EPOCHS, config.DATA.BATCH_SIZE) == (1, 8)


def test_batch_size_sets_the_evaluation_batch_however_eval_is_asked_for(capsys):
    cfg = os.path.join(ROOT, 'configs', 'xcit_nano_12_p16_224.yaml')
    for argv in (['-cfg', cfg, '-eval', '-batch_size', '50'],
                 ['-cfg', cfg, '-batch_size', '50', '-opts', 'EVAL', 'True']):
        assert engine.parse_config(argv).DATA.BATCH_SIZE_EVAL == 50
    opts_last = ['-cfg', cfg, '-eval', '-batch_size', '50', '-opts', 'DATA.BATCH_SIZE_EVAL', '32']
    assert engine.parse_config(opts_last).DATA.BATCH_SIZE_EVAL == 32  # -opts wins, as everywhere
    with pytest.raises(engine.ConfigError, match='NGPUS 4: main_single_gpu.py runs one process'):
        engine.parse_config(['-cfg', cfg, '-eval', '-opts', 'NGPUS', '4'])
    with pytest.raises(SystemExit) as exit_info:
        engine.parse_config(['-cfg', cfg, '-eval', '-batch_size', '50', '-batch_size_eval', '60'])
    assert exit_info.value.code == 2
    assert '-batch_size and -batch_size_eval both set the evaluation batch' in capsys.readouterr().err


def test_ngpus_is_a_flag_of_the_multi_process_entry_point_only(capsys):
    """-ngpus sets NGPUS for main_multi_gpu.py; main_single_gpu.py has no such flag."""
    cfg = os.path.join(ROOT, 'configs', 'xcit_nano_12_p16_224.yaml')
    assert engine.parse_config(['-cfg', cfg, '-ngpus', '2'], multi_process=True).NGPUS == 2
    assert engine.parse_config(['-cfg', cfg], multi_process=True).NGPUS == -1
    with pytest.raises(SystemExit) as exit_info:
        engine.parse_config(['-cfg', cfg, '-ngpus', '1'])
    assert exit_info.value.code == 2 and 'unrecognized arguments: -ngpus 1' in capsys.readouterr().err


def test_ema_of_a_plain_state_dict_is_an_error(golden, tmp_path):
    with pytest.raises(CheckpointError, match=r"its EMA weights \('model_ema'\) were asked for \(-ema; use_ema in "
                                              r"Python\), but this plain state dict"):
        main_single_gpu.main(eval_args(golden, tmp_path, '-ema'))


def test_eval_without_weights_is_an_error(golden, tmp_path):
    args = eval_args(golden, tmp_path)
    del args[args.index('-pretrained'):args.index('-pretrained') + 2]
    with pytest.raises(engine.ConfigError, match='-eval needs weights'):
        main_single_gpu.main(args)


def test_fine_tuning_drops_a_head_of_another_class_count(golden, caplog):
    config = get_config(golden['cfg'])
    model = build_xcit(config)
    logger = setup_logger()
    logger.propagate = True  # let caplog see the records
    before = model.head.weight.numpy().copy()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        engine.load_pretrained(model, golden['full'], False, logger)
    assert 'dropping the classifier head (1000 classes) for a new one with 10 classes' in caplog.text
    assert not [str(w.message) for w in caught if 'head' in str(w.message)]  # Paddle's "Skip loading for head..."
    np.testing.assert_array_equal(model.head.weight.numpy(), before)
    golden_state = paddle.load(golden['full'])
    np.testing.assert_array_equal(model.blocks[1].attn.qkv.weight.numpy(), golden_state['blocks.1.attn.qkv.weight'])


def test_fine_tuning_with_ema_starts_from_the_ema_weights(golden, tmp_path, caplog):
    """-pretrained CHECKPOINT -ema for training loads its 'model_ema' weights, not its 'model'."""
    plain = paddle.load(golden['weights'])
    checkpoint = tmp_path / 'train.pdparams'
    paddle.save({'model': {k: np.asarray(v) * 0.5 for k, v in plain.items()}, 'model_ema': plain, 'epoch': 3},
                str(checkpoint))
    logger = setup_logger()
    logger.propagate = True
    for use_ema, scale in ((True, 1.0), (False, 0.5)):
        model = build_xcit(get_config(golden['cfg']))
        engine.load_pretrained(model, str(checkpoint), use_ema, logger)
        for name, value in model.state_dict().items():
            np.testing.assert_array_equal(value.numpy(), np.asarray(plain[name]) * scale, err_msg=name)
    assert f'loaded EMA weights from {checkpoint}' in caplog.text


@pytest.mark.parametrize('change', ['head of 1000 classes', 'no head', 'an extra entry'])
def test_evaluated_weights_must_fit_exactly(golden, tmp_path, change):
    """-eval does not drop or invent anything: any difference is an error with its table."""
    state = dict(paddle.load(golden['weights']))
    if change == 'head of 1000 classes':
        state = dict(paddle.load(golden['full']))
        row = r'head\.weight +\[64, 1000\] +\[64, 10\] +shape mismatch'
    elif change == 'no head':
        del state['head.weight'], state['head.bias']
        row = r'head\.weight +- +\[64, 10\] +missing from checkpoint'
    else:
        state['extra.scale'] = np.ones(3, dtype=np.float32)
        row = r'extra\.scale +\[3\] +- +unexpected in checkpoint'
    path = tmp_path / 'weights.pdparams'
    paddle.save(state, str(path))
    args = eval_args(golden, tmp_path)
    args[args.index('-pretrained') + 1] = str(path)
    with pytest.raises(CheckpointError, match=rf'(?s)does not fit the \w+ model of the config.*{row}'):
        main_single_gpu.main(args)


def test_fine_tuning_from_a_backbone_without_head(golden, tmp_path, caplog):
    """Self-supervised weights (DINO) have no head: the model's stays initialised, said once."""
    state = {k: v for k, v in paddle.load(golden['weights']).items() if not k.startswith('head.')}
    path = tmp_path / 'backbone.pdparams'
    paddle.save(state, str(path))
    model = build_xcit(get_config(golden['cfg']))
    before = model.head.weight.numpy().copy()
    logger = setup_logger()
    logger.propagate = True
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        engine.load_pretrained(model, str(path), False, logger)
    assert "a backbone without classifier head; the model's head (10 classes) starts freshly initialised" in caplog.text
    assert not [str(w.message) for w in caught if 'head' in str(w.message)]
    assert 'not in the checkpoint' not in caplog.text
    np.testing.assert_array_equal(model.head.weight.numpy(), before)
    np.testing.assert_array_equal(model.norm.weight.numpy(), state['norm.weight'])


@pytest.mark.parametrize('mode', ['-eval', 'train'])
def test_a_model_without_head_is_not_trained_or_evaluated_on_labels(golden, tmp_path, mode):
    args = eval_args(golden, tmp_path, '-opts', 'MODEL.NUM_CLASSES', '0')
    if mode == 'train':
        args.remove('-eval')
    with pytest.raises(engine.ConfigError, match=r'MODEL.NUM_CLASSES is 0: the model is a backbone without a '
                                                 r'classifier head.*-opts MODEL.NUM_CLASSES N.*eval_knn.py'):
        main_single_gpu.main(args)


def test_pretrained_weights_that_do_not_fit_stop_the_training(golden, tmp_path):
    """Only the classifier head may be replaced: any other missing or unexpected entry is listed."""
    state = dict(paddle.load(golden['weights']))
    del state['norm.weight']
    state['extra.scale'] = np.ones(3, dtype=np.float32)
    path = tmp_path / 'partial.pdparams'
    paddle.save(state, str(path))
    model = build_xcit(get_config(golden['cfg']))
    with pytest.raises(engine.CheckpointError, match=r'partial.pdparams does not fit the model \(only a classifier '
                       r'head of another size, or none, is replaced\) \(2 problems\):\n.*\n'
                       r'  norm.weight +- +\[64\] +missing from checkpoint\n'
                       r'  extra.scale +\[3\] +- +unexpected in checkpoint'):
        engine.load_pretrained(model, str(path), False, setup_logger())


class TestInferencePath:
    """``EvalForward`` keeps the exported predictor only when it reproduces dygraph faster."""

    @pytest.fixture
    def forward(self, tmp_path):
        path = tmp_path / 'tiny.yaml'
        path.write_text('MODEL:\n  PATCH_SIZE: 8\n  EMBED_DIM: 32\n  DEPTH: 1\n  NUM_HEADS: 2\n  NUM_CLASSES: 5\n')
        paddle.seed(0)
        model = build_xcit(get_config(str(path)))
        model.eval()
        return engine.EvalForward(model, 32, try_inference=True)

    @staticmethod
    def choose(forward, images):
        logger = setup_logger()
        logger.propagate = True
        with paddle.no_grad():
            forward.choose(images, True, logger)

    def test_predictor_is_used_when_it_matches_and_is_faster(self, forward, caplog, monkeypatch):
        images = paddle.randn([3, 3, 32, 32])
        with paddle.no_grad():
            expected = forward.model(images).numpy()
            forward.compiled = engine.inference_forward(forward.model, 32)  # before dygraph is slowed down
        assert 'forward' not in vars(forward.model)  # exporting left the model in dygraph
        dygraph = forward.model.forward
        monkeypatch.setattr(forward.model, 'forward', lambda x: (time.sleep(0.2), dygraph(x))[1])
        self.choose(forward, images)
        assert forward.path == 'inference'
        assert 'paddle.inference matches dygraph (max abs output diff' in caplog.text and 'and is faster' in caplog.text
        monkeypatch.undo()
        with paddle.no_grad():
            np.testing.assert_allclose(forward(images).numpy(), expected, atol=1e-5)
            for name, param in forward.model.named_parameters():  # a snapshot of the weights
                if name == 'head.bias':
                    param.set_value(param + 1.0)
            np.testing.assert_allclose(forward(images).numpy(), expected, atol=1e-5)

    def test_slower_predictor_is_not_used(self, forward, caplog):
        calls = []

        def slow_after_the_check(x):
            calls.append(x)
            if len(calls) > 1:
                time.sleep(1.0)
            return forward.model(x)
        forward.compiled = slow_after_the_check
        self.choose(forward, paddle.randn([2, 3, 32, 32]))
        assert forward.path == 'dygraph' and len(calls) == 2
        assert 'but is not faster' in caplog.text

    def test_different_logits_fall_back(self, forward, caplog):
        forward.compiled = lambda x: forward.model(x) + 1e-3
        self.choose(forward, paddle.randn([2, 3, 32, 32]))
        assert forward.path == 'dygraph'
        assert 'paddle.inference outputs differ from dygraph by 1.00e-03 (> 0.0001)' in caplog.text

    def test_nan_outputs_fall_back(self, forward, caplog):
        """A predictor whose outputs are NaN where dygraph's are finite is not within the
        tolerance (a NaN difference compares false both ways)."""
        forward.compiled = lambda x: forward.model(x) * float('nan')
        self.choose(forward, paddle.randn([2, 3, 32, 32]))
        assert forward.path == 'dygraph'
        assert 'paddle.inference outputs differ from dygraph by nan (> 0.0001)' in caplog.text

    def test_failure_falls_back_with_the_reason(self, forward, caplog):
        def broken(images):
            raise RuntimeError('unsupported op in\nconversion')
        forward.compiled = broken
        self.choose(forward, paddle.randn([2, 3, 32, 32]))
        assert forward.path == 'dygraph'
        assert 'paddle.inference unavailable (RuntimeError: unsupported op in conversion)' in caplog.text

    def test_one_batch_stays_in_dygraph_without_exporting(self, forward, caplog):
        logger = setup_logger()
        logger.propagate = True
        forward.choose(paddle.randn([2, 3, 32, 32]), False, logger)
        assert forward.path == 'dygraph' and forward.compiled is None
        assert 'a process has a single batch' in caplog.text


def test_predictor_threads_follow_omp_num_threads_or_share_the_cpus(monkeypatch):
    monkeypatch.setenv('OMP_NUM_THREADS', '3')
    assert engine.cpu_threads() == 3
    monkeypatch.delenv('OMP_NUM_THREADS')
    monkeypatch.setattr(engine.os, 'cpu_count', lambda: 8)
    monkeypatch.setattr(engine, 'get_world_size', lambda: 2)
    assert engine.cpu_threads() == 4
    monkeypatch.setattr(engine, 'get_world_size', lambda: 16)
    assert engine.cpu_threads() == 1


def test_classification_sums_break_ties_by_class_index_and_use_float64():
    """A model giving every class the same logit is right only for class 0 (argmax's choice),
    not for every label; NaN logits are never right."""
    logits = np.array([[3.0, 1.0, 2.0, 0.0, -1.0, -2.0],
                       [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
                       [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
                       [1.0, 1.0, 5.0, 1.0, 1.0, 0.0],
                       [np.nan, 0.0, 0.0, 0.0, 0.0, 0.0]], dtype=np.float32)
    labels = np.array([2, 5, 0, 3, 1])
    sums = engine.classification_sums(logits, labels)
    # ranks: 1 (second), 5 (five classes tie ahead), 0, 3 (2, then 0 and 1 tie ahead), never
    assert sums[:2].tolist() == [1.0, 3.0] and sums[3] == 5 and np.isnan(sums[2])
    finite = logits[:4].astype(np.float64)
    expected = np.log(np.exp(finite).sum(1)) - finite[np.arange(4), labels[:4]]
    assert engine.classification_sums(logits[:4], labels[:4])[2] == pytest.approx(expected.sum(), abs=1e-12)


def test_top5_counts_a_label_ranked_fifth_and_not_one_ranked_sixth():
    """Labels behind 0, 3, 4 and 5 classes: Acc@1 counts the first, Acc@5 the first three;
    summarise gives percentages and the mean loss."""
    logits = np.array([[9.0, 8.0, 7.0, 6.0, 5.0, 4.0, 3.0]] * 4, dtype=np.float32)
    labels = np.array([0, 3, 4, 5])
    sums = engine.classification_sums(logits, labels)
    assert sums[:2].tolist() == [1.0, 3.0] and sums[3] == 4
    stats = engine.summarise(sums)
    assert (stats['acc1'], stats['acc5'], stats['images']) == (25.0, 75.0, 4)
    assert stats['loss'] == pytest.approx(sums[2] / 4, abs=1e-12)


def test_two_processes_report_the_same_metrics_as_one(golden, tmp_path):
    """Shards of 20 images in batches of 6 (the last ones partial): every image counted once."""
    one = main_single_gpu.main(eval_args(golden, tmp_path / 'one'))
    done = subprocess.run([sys.executable, os.path.join(ROOT, 'main_multi_gpu.py'), '-ngpus', '2',
                           *eval_args(golden, tmp_path / 'two')],
                          capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    two = json.loads(done.stdout.strip().splitlines()[-1])
    assert two['processes'] == 2 and one['processes'] == 1
    assert two['images'] == one['images'] == NUM_IMAGES
    assert (two['acc1'], two['acc5']) == (one['acc1'], one['acc5']) == (golden['acc1'], golden['acc5'])
    assert two['loss'] == pytest.approx(one['loss'], abs=2e-6)


TWO_PROCESS_CHOICE = '''\
"""Each of 2 gloo processes runs engine.evaluate on its own batches; writes its path per case
to result_<rank>.json."""
import json
import sys
import time

import numpy  # noqa: F401  before paddle, as in main_multi_gpu.py
import paddle
import paddle.distributed as dist

sys.path.insert(0, sys.argv[1])
import engine
from config import get_config
from utils import setup_logger
from xcit import build_xcit


def evaluate(batches, works):
    """``evaluate`` with a predictor that is the model itself (or fails, unless ``works``) and a
    slower dygraph model."""
    paddle.seed(0)
    model = build_xcit(get_config(sys.argv[2]))
    plain = model.forward
    calls = []

    def predictor(x):
        calls.append(len(x))
        if not works:
            raise RuntimeError('no predictor here')
        return plain(x)
    forward = engine.EvalForward(model, 32, try_inference=True)
    forward.compiled = predictor
    model.forward = lambda x: (time.sleep(0.3), plain(x))[1]
    loader = [(paddle.randn([2, 3, 32, 32]), paddle.to_tensor([0, 1])) for _ in range(batches)]
    stats = engine.evaluate(forward, loader, setup_logger(rank=dist.get_rank()))
    return {'path': forward.path, 'predictor_calls': len(calls), 'reported': stats['path'],
            'images_per_sec': stats['images_per_sec']}


def work():
    dist.init_parallel_env()
    rank = dist.get_rank()
    cases = {
        'both_pass': evaluate(2, works=True),
        'rank_1_fails': evaluate(2, works=rank == 0),
        'rank_0_has_one_batch': evaluate(1 if rank == 0 else 3, works=True),
        'rank_1_has_no_batch': evaluate(2 if rank == 0 else 0, works=True),
    }
    with open(f'result_{rank}.json', 'w') as f:
        json.dump(cases, f)


if __name__ == '__main__':
    dist.spawn(work, nprocs=2, backend='gloo')
'''


def test_processes_agree_on_the_evaluation_path(tmp_path):
    """With 2 processes, the predictor is used by both or by neither, and a process with fewer
    than two batches keeps every process in dygraph without exporting (and without hanging)."""
    cfg = tmp_path / 'tiny.yaml'
    cfg.write_text('MODEL:\n  PATCH_SIZE: 8\n  EMBED_DIM: 32\n  DEPTH: 1\n  NUM_HEADS: 2\n  NUM_CLASSES: 5\n')
    script = tmp_path / 'two_processes.py'
    script.write_text(TWO_PROCESS_CHOICE)
    done = subprocess.run([sys.executable, str(script), ROOT, str(cfg)], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    results = {rank: json.loads((tmp_path / f'result_{rank}.json').read_text()) for rank in (0, 1)}
    reported = {rank: {name: case.pop('reported') for name, case in cases.items()}
                for rank, cases in results.items()}
    rates = {rank: {name: case.pop('images_per_sec') for name, case in cases.items()}
             for rank, cases in results.items()}
    assert rates[0] == rates[1]
    # rank 1's last two dygraph batches, 2 images each at 0.3 s or more: the rate is that of the
    # slowest process's steady part, not all images over rank 0's one-batch (near-zero) span
    assert 0 < rates[0]['rank_0_has_one_batch'] <= 2 / 0.3
    # the path in the summary is the one the processes took, also in one without images (was 'none')
    assert reported[0] == reported[1] == {'both_pass': 'inference', 'rank_1_fails': 'dygraph',
                                          'rank_0_has_one_batch': 'dygraph', 'rank_1_has_no_batch': 'dygraph'}
    for rank, cases in results.items():
        assert cases['both_pass'] == {'path': 'inference', 'predictor_calls': 4}  # check, timing, 2 batches
        assert cases['rank_1_fails'] == {'path': 'dygraph', 'predictor_calls': 2 if rank == 0 else 1}
        assert cases['rank_0_has_one_batch'] == {'path': 'dygraph', 'predictor_calls': 0}
    assert results[0]['rank_1_has_no_batch'] == {'path': 'dygraph', 'predictor_calls': 0}
    assert results[1]['rank_1_has_no_batch'] == {'path': None, 'predictor_calls': 0}  # nothing to evaluate
    assert 'did not pass in 1 of 2 processes (unavailable: 1); evaluating in dygraph in all of them' in done.stdout
