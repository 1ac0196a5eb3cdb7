"""Training through ``main_single_gpu.main`` on the bundled digits with a tiny XCiT: learning,
exact resume, checkpoints and metrics, and the errors a user can run into."""
import contextlib
import errno
import hashlib
import io
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import paddle
import pytest
from PIL import Image

from conftest import ROOT
import engine
import main_single_gpu
import utils
from config import ConfigError, get_config
from datasets import DataError, build_dataloader, build_dataset
from mixup import build_mixup
from utils import CheckpointError
import xcit
from xcit import XCiT

TINY = ['MODEL.PATCH_SIZE', '8', 'MODEL.EMBED_DIM', '32', 'MODEL.DEPTH', '1', 'MODEL.NUM_HEADS', '2',
        'MODEL.NUM_CLASSES', '10', 'DATA.IMAGE_SIZE', '32', 'DATA.BATCH_SIZE_EVAL', '180',
        'TRAIN.WARMUP_EPOCHS', '0', 'TRAIN.LINEAR_SCALED_LR', '0', 'REPORT_FREQ', '20']
# every source of randomness on: augmentation, repeated augmentation, mixup/cutmix, drop path, EMA
FULL_RECIPE = ['TRAIN.BASE_LR', '1e-3', 'MODEL.DROPPATH', '0.1', 'TRAIN.MODEL_EMA_DECAY', '0.9',
               'DATA.NUM_WORKERS', '2', 'SAVE_FREQ', '1']
PLAIN_RECIPE = ['TRAIN.BASE_LR', '3e-3', 'TRAIN.RAND_AUGMENT', 'False', 'TRAIN.COLOR_JITTER', '0.0',
                'TRAIN.HFLIP', '0.0', 'TRAIN.RANDOM_ERASE_PROB', '0.0', 'TRAIN.MIXUP_PROB', '0.0',
                'TRAIN.REPEATED_AUG', 'False', 'TRAIN.MODEL_EMA', 'False', 'TRAIN.RANDOM_RESIZED_CROP_SCALE',
                '[0.8, 1.0]', 'DATA.NUM_WORKERS', '0', 'SAVE_FREQ', '0']


def train_args(output, *opts, epochs=2, batch=64, extra=()):
    return ['-dataset', 'digits', '-batch_size', str(batch), '-output', str(output), *extra,
            '-opts', *TINY, 'TRAIN.NUM_EPOCHS', str(epochs), *opts]


def read_metrics(output):
    return [json.loads(line) for line in (output / 'metrics.jsonl').read_text().splitlines()]


def flat_state(state):
    """{name: float64 array} of a state dict (nested dicts flattened with '/')."""
    flat = {}
    for key, value in state.items():
        if isinstance(value, dict):
            flat.update({f'{key}/{k}': v for k, v in flat_state(value).items()})
        elif hasattr(value, 'shape') and np.asarray(value).dtype.kind == 'f':
            flat[key] = np.asarray(value, dtype=np.float64)
    return flat


def max_abs_diff(a, b):
    assert a.keys() == b.keys()
    return max(float(np.abs(a[k] - b[k]).max()) if a[k].size else 0.0 for k in a)


@contextlib.contextmanager
def capture_stdout():
    """Collects what is printed (the engine's log lines) in a StringIO."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        yield buffer


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope='module')
def full_run(tmp_path_factory):
    """Two epochs with the full recipe, keeping the epoch-1 checkpoint."""
    output = tmp_path_factory.mktemp('full')
    result = main_single_gpu.main(train_args(output, *FULL_RECIPE))
    return output, result


def test_resume_continues_exactly(full_run, tmp_path):
    """2 epochs straight == 1 epoch (the run's own epoch_1 checkpoint) + resume for 1 more.

    The resumed run is relaunched as a preemptible job would be: ``-resume auto`` finds the
    output folder's last.pdparams and continues it; -pretrained only applies to a fresh start."""
    output, _ = full_run
    shutil.copy(output / 'epoch_1.pdparams', tmp_path / 'last.pdparams')
    # the log of a run killed while writing epoch 2's last record
    (tmp_path / 'metrics.jsonl').write_text((output / 'metrics.jsonl').read_text()[:-20])
    args = train_args(tmp_path, *FULL_RECIPE, extra=['-resume', 'auto', '-pretrained', str(output / 'last.pdparams')])
    with capture_stdout() as out:
        result = main_single_gpu.main(args)
    assert f'resumed from {tmp_path / "last.pdparams"}: 1 epochs' in out.getvalue()
    assert f'-pretrained {output / "last.pdparams"} not loaded' in out.getvalue()
    straight = paddle.load(str(output / 'last.pdparams'))
    resumed = paddle.load(str(tmp_path / 'last.pdparams'))
    assert resumed['epoch'] == straight['epoch'] == 2 and resumed['step'] == straight['step']
    for part in ('model', 'model_ema', 'optimizer'):
        diff = max_abs_diff(flat_state(straight[part]), flat_state(resumed[part]))
        assert diff == 0.0, f'{part}: max abs difference {diff}'
    # the resumed run's log is the straight run's (timings aside): epoch 2's records of the run
    # it continues are dropped, not left beside the new ones
    same = ('kind', 'model', 'epoch', 'step', 'lr', 'loss', 'acc1', 'acc5')
    logs = [[{k: r.get(k) for k in same} for r in read_metrics(out)] for out in (output, tmp_path)]
    assert logs[0] == logs[1] and len(logs[0]) == 8
    assert result['last_acc1'] == full_run[1]['last_acc1'] and result['best_acc1'] == full_run[1]['best_acc1']
    # the run's config.yaml, unlike its checkpoints, does not name the weights it started from or
    # continued: as -cfg it evaluates the weights given, not those
    assert "RESUME: auto" in resumed['config'] and 'PRETRAINED: ' + str(output) in resumed['config']
    written = get_config(str(tmp_path / 'config.yaml'))
    assert (written.MODEL.PRETRAINED, written.MODEL.RESUME) == ('', '')
    evaluated = main_single_gpu.main(['-cfg', str(tmp_path / 'config.yaml'), '-eval', '-pretrained',
                                      str(tmp_path / 'last.pdparams'), '-output', str(tmp_path / 'eval')])
    assert evaluated['acc1'] == pytest.approx(result['last_acc1'], abs=1e-4)  # the result is rounded


def test_a_failed_validation_keeps_the_epoch_and_is_run_again_on_resume(full_run, tmp_path, monkeypatch):
    """Validation of epoch 1 fails (e.g. an unreadable image, or out of memory): last.pdparams
    already holds epoch 1's training, and the resumed run validates epoch 1 before epoch 2,
    ending where the uninterrupted run did."""
    output, straight_result = full_run
    validate = engine.Trainer.validate

    def fail_once(self, epoch):
        monkeypatch.setattr(engine.Trainer, 'validate', validate)
        raise DataError('cannot read image val/broken.jpg')
    monkeypatch.setattr(engine.Trainer, 'validate', fail_once)
    args = train_args(tmp_path, *FULL_RECIPE, extra=['-resume', 'auto'])
    with pytest.raises(DataError):
        main_single_gpu.main(args)
    kept = paddle.load(str(tmp_path / 'last.pdparams'))
    assert kept['epoch'] == 1 and kept['unvalidated'] and kept['best_acc'] is None
    with capture_stdout() as out:
        result = main_single_gpu.main(args)
    assert 'resumed from' in out.getvalue() and 'epoch 1 not validated yet' in out.getvalue()
    straight, resumed = (paddle.load(str(folder / 'last.pdparams')) for folder in (output, tmp_path))
    assert max_abs_diff(flat_state(straight['model']), flat_state(resumed['model'])) == 0.0
    assert (resumed['best_epoch'], resumed['unvalidated']) == (straight['best_epoch'], False)
    same = ('kind', 'model', 'epoch', 'step', 'lr', 'loss', 'acc1', 'acc5')
    logs = [[{k: r.get(k) for k in same} for r in read_metrics(folder)] for folder in (output, tmp_path)]
    assert logs[0] == logs[1]
    assert result['best_acc1'] == straight_result['best_acc1']


@pytest.mark.parametrize('validate_freq', ['1', '0'])
def test_a_run_stopped_while_writing_a_snapshot_writes_it_when_resumed(full_run, tmp_path, monkeypatch,
                                                                        validate_freq):
    """Killed while writing epoch_1.pdparams (SAVE_FREQ 1), after epoch 1's validation or
    without one: the resumed run writes it, and ends as the uninterrupted run did (last.pdparams
    used to say that epoch 1 was complete, so the snapshot was never written)."""
    output, _ = full_run
    save = engine.Trainer.save

    def killed_at_snapshot(self, filename):
        if filename == 'epoch_1.pdparams':
            raise KeyboardInterrupt
        save(self, filename)
    monkeypatch.setattr(engine.Trainer, 'save', killed_at_snapshot)
    args = train_args(tmp_path, *FULL_RECIPE, 'VALIDATE_FREQ', validate_freq, extra=['-resume', 'auto'])
    with pytest.raises(KeyboardInterrupt):
        main_single_gpu.main(args)
    monkeypatch.setattr(engine.Trainer, 'save', save)
    main_single_gpu.main(args)
    for name in ('epoch_1.pdparams', 'epoch_2.pdparams', 'last.pdparams'):
        straight, resumed = (paddle.load(str(folder / name)) for folder in (output, tmp_path))
        assert max_abs_diff(flat_state(straight['model']), flat_state(resumed['model'])) == 0.0, name
        assert resumed['epoch'] == straight['epoch'] and resumed['step'] == straight['step']
    if validate_freq == '1':
        same = ('kind', 'model', 'epoch', 'step', 'lr', 'loss', 'acc1', 'acc5')
        logs = [[{k: r.get(k) for k in same} for r in read_metrics(folder)] for folder in (output, tmp_path)]
        assert logs[0] == logs[1]


def test_resume_with_other_steps_per_epoch_continues_the_schedule_where_the_epochs_end(full_run, tmp_path):
    """Epoch 1 of batch 64 (22 steps) resumed with batch 32 (44 steps an epoch): epoch 2 runs
    steps 45..88 of the 88-step schedule, not 23..66."""
    output, _ = full_run
    shutil.copy(output / 'epoch_1.pdparams', tmp_path / 'last.pdparams')
    with capture_stdout() as out:
        main_single_gpu.main(train_args(tmp_path, *FULL_RECIPE, 'VALIDATE_FREQ', '0', 'TRAIN.MODEL_EMA', 'False',
                                        batch=32, extra=['-resume', 'auto']))
    assert "this run's settings differ from the checkpoint's: " in out.getvalue()
    for change in ('DATA.BATCH_SIZE 64 -> 32', 'VALIDATE_FREQ 1 -> 0', 'TRAIN.MODEL_EMA True -> False'):
        assert change in out.getvalue()
    assert 'last.pdparams: its EMA weights are not continued, TRAIN.MODEL_EMA is off' in out.getvalue()
    assert 'last.pdparams: 1 epochs took 22 optimizer steps, 44 per epoch now' in out.getvalue()
    assert 'schedule continues at step 44 of 88' in out.getvalue()
    resumed = paddle.load(str(tmp_path / 'last.pdparams'))
    assert resumed['step'] == 88 and resumed['lr_scheduler']['last_epoch'] == 88
    first = next(r for r in read_metrics(tmp_path) if r['kind'] == 'train' and r['epoch'] == 2)
    half_way = (1e-3 + get_config().TRAIN.END_LR) / 2  # the cosine's middle, where epoch 2 starts
    assert first['lr'] < half_way


def test_a_resumed_run_keeps_the_best_accuracy_of_the_epochs_before(full_run, tmp_path):
    """Epoch 1's checkpoint records a best Acc@1 of 99% at epoch 1: epoch 2, resumed, is worse,
    so the run's best stays epoch 1's and no best.pdparams is written over it."""
    output, _ = full_run
    checkpoint = paddle.load(str(output / 'epoch_1.pdparams'))
    checkpoint['best_acc'], checkpoint['best_epoch'] = 99.0, 1
    paddle.save(checkpoint, str(tmp_path / 'last.pdparams'))
    result = main_single_gpu.main(train_args(tmp_path, *FULL_RECIPE, extra=['-resume', 'auto']))
    assert (result['best_acc1'], result['best_epoch']) == (99.0, 1) and result['last_acc1'] < 99.0
    last = paddle.load(str(tmp_path / 'last.pdparams'))
    assert (last['epoch'], last['best_acc'], last['best_epoch']) == (2, 99.0, 1)
    assert not (tmp_path / 'best.pdparams').exists()


def test_a_run_continued_in_another_folder_names_where_its_best_checkpoint_is(full_run, tmp_path):
    """A run of folder 'first' whose best epoch (1, 99%) is not beaten after it is continued in
    folder 'second': the result says that epoch was saved in 'first', and so do the results of
    'second' relaunched (its checkpoints name first/best.pdparams relative to their folder, so
    that both runs can move together)."""
    output, _ = full_run
    (tmp_path / 'first').mkdir()
    checkpoint = paddle.load(str(output / 'epoch_1.pdparams'))
    checkpoint['best_acc'], checkpoint['best_epoch'] = 99.0, 1
    paddle.save(checkpoint, str(tmp_path / 'first' / 'epoch_1.pdparams'))
    second = tmp_path / 'second'
    with capture_stdout() as out:
        main_single_gpu.main(train_args(second, *FULL_RECIPE, extra=['-resume', str(tmp_path / 'first' / 'epoch_1.pdparams')]))
    first = tmp_path / 'first'
    assert f'the best epoch so far, 1 (Acc@1 99.00%), was saved in {first}' in out.getvalue()
    assert f'result: best Acc@1 99.00% (epoch 1, saved in {first}), last Acc@1' in out.getvalue()
    assert not (second / 'best.pdparams').exists()
    assert paddle.load(str(second / 'last.pdparams'))['best_file'] == os.path.join('..', 'first', 'best.pdparams')
    with capture_stdout() as out:  # relaunched in 'second' for one more epoch
        result = main_single_gpu.main(train_args(second, *FULL_RECIPE, epochs=3, extra=['-resume', 'auto']))
    assert result['best_epoch'] == 1 and f'(epoch 1, saved in {first})' in out.getvalue()


def test_a_finished_run_relaunched_has_nothing_to_train(full_run, tmp_path):
    output, _ = full_run
    shutil.copy(output / 'last.pdparams', tmp_path / 'last.pdparams')
    with capture_stdout() as out:
        result = main_single_gpu.main(train_args(tmp_path, *FULL_RECIPE, extra=['-resume', 'auto']))
    assert 'nothing to train: the checkpoint is at epoch 2 of 2' in out.getvalue()
    assert 'training epochs' not in out.getvalue() and result['epochs'] == 2


def test_resume_with_more_epochs_steps_at_the_learning_rate_of_the_longer_schedule(full_run, tmp_path):
    """Epoch 1 of 2 (22 steps) continued in a run of 4 epochs: its first step runs at step 22 of
    the 88-step cosine, not at the learning rate the checkpoint was saved with (step 22 of 44)."""
    output, _ = full_run
    shutil.copy(output / 'epoch_1.pdparams', tmp_path / 'last.pdparams')
    config = engine.parse_config(train_args(tmp_path, *FULL_RECIPE, epochs=4, extra=['-resume', 'auto']))
    trainer = engine.Trainer(config, 'cpu', False, logging.getLogger('test_engine_train'))
    peak, end = 1e-3, config.TRAIN.END_LR
    assert trainer.step == 22 and trainer.lr_scheduler.last_epoch == 22
    assert trainer.optimizer.get_lr() == pytest.approx(end + (peak - end) * (1 + math.cos(math.pi * 22 / 88)) / 2)


@pytest.mark.parametrize('change, before, now', [
    (['TRAIN.OPTIMIZER.NAME', 'SGD'], "'AdamW'", "'SGD'"),
    (['TRAIN.FREEZE_BACKBONE', 'True'], 'False', 'True'),
])
def test_resume_with_another_optimizer_state_is_refused(full_run, tmp_path, change, before, now):
    """The optimizer keeps other state (SGD's velocity, AdamW's moments; only the head's when the
    backbone is frozen): refused by name, where Paddle's optimizer failed at its first step."""
    output, _ = full_run
    shutil.copy(output / 'last.pdparams', tmp_path / 'last.pdparams')
    key = change[0]
    with pytest.raises(CheckpointError, match=re.escape(f'-resume {tmp_path / "last.pdparams"}: its optimizer '
                                                        f'state was made with {key} {before}, this run has {now}')):
        main_single_gpu.main(train_args(tmp_path, *FULL_RECIPE, *change, epochs=3, extra=['-resume', 'auto']))


def test_resume_with_the_optimizer_name_in_another_case_is_the_same_optimizer(full_run, tmp_path, caplog):
    """TRAIN.OPTIMIZER.NAME is read in any case: 'adamw' continues an 'AdamW' run, unremarked."""
    output, _ = full_run
    shutil.copy(output / 'last.pdparams', tmp_path / 'last.pdparams')
    config = engine.parse_config(train_args(tmp_path, *FULL_RECIPE, 'TRAIN.OPTIMIZER.NAME', 'adamw', epochs=3,
                                            extra=['-resume', 'auto']))
    with caplog.at_level(logging.WARNING):
        trainer = engine.Trainer(config, 'cpu', False, logging.getLogger('test_engine_train'))
    assert trainer.epoch == 2 and 'OPTIMIZER' not in caplog.text


def test_optimizer_state_names_take_the_longest_parameter_name_they_start_with():
    """Optimizer state keys are a parameter's name, '_' and the state's: a key is renamed by the
    longest parameter name it starts with (one name can begin another), other keys are kept."""
    names = {'param_1': 'head.weight', 'param_1_2': 'blocks.0.gamma1'}
    state = {'param_1_moment1_0': 1, 'param_1_2_moment1_0': 2, 'LR_Scheduler': 3}
    assert engine.rename_prefixes(state, names) == {'head.weight_moment1_0': 1, 'blocks.0.gamma1_moment1_0': 2,
                                                     'LR_Scheduler': 3}


def test_checkpoint_and_metrics_contents(full_run):
    output, result = full_run
    last = paddle.load(str(output / 'last.pdparams'))
    assert {'model', 'model_ema', 'optimizer', 'lr_scheduler', 'epoch', 'step', 'config', 'best_acc',
            'best_epoch'} <= set(last)
    assert 'DATASET: digits' in last['config'] and last['step'] == 2 * (1438 // 64)
    # the run's config.yaml is a config file of its own (-cfg for evaluation, export, prediction)
    assert get_config(str(output / 'config.yaml')).dump() == last['config']
    assert any(k.startswith('blocks.0.mlp.fc1.weight_moment1') for k in last['optimizer'])  # structured names
    assert sorted(p.name for p in output.glob('*.pdparams')) == ['best.pdparams', 'epoch_1.pdparams',
                                                                 'epoch_2.pdparams', 'last.pdparams']
    records = read_metrics(output)
    keys = {'kind', 'epoch', 'step', 'lr', 'loss', 'acc1', 'acc5', 'images_per_sec', 'time'}
    assert all(keys <= set(r) for r in records)
    train = [r for r in records if r['kind'] == 'train']
    val = [r for r in records if r['kind'] == 'val']
    assert [r['step'] for r in train] == [20, 22, 42, 44]  # every REPORT_FREQ steps and at epoch end
    assert all(r['acc1'] is None for r in train)  # mixup: no train accuracy
    assert [(r['epoch'], r['model']) for r in val] == [(1, 'model'), (1, 'ema'), (2, 'model'), (2, 'ema')]
    assert result['best_acc1'] == max(r['acc1'] for r in val if r['model'] == 'model')


@pytest.fixture(scope='module')
def plain_run(tmp_path_factory):
    """Three epochs without mixup, EMA or strong augmentation; returns the output folder, the
    result and what was printed."""
    output = tmp_path_factory.mktemp('plain')
    with capture_stdout() as out:
        result = main_single_gpu.main(train_args(output, *PLAIN_RECIPE, epochs=3, batch=32))
    return output, result, out.getvalue()


def test_short_training_learns(plain_run):
    output, result, out = plain_run
    records = read_metrics(output)
    train = [r for r in records if r['kind'] == 'train']
    val = [r for r in records if r['kind'] == 'val']
    assert train[-1]['loss'] < train[0]['loss'] - 0.5
    assert train[-1]['acc1'] > train[0]['acc1'] + 30
    assert val[-1]['loss'] < val[0]['loss'] - 0.3
    assert result['last_acc1'] > 60.0  # chance: 10%
    assert out.strip().splitlines()[-1].split(' ', 1)[1].startswith('result: best Acc@1')
    assert 'epoch 3/3 step 40/44 lr' in out and 'images/s ETA' in out


def test_validation_every_validate_freq_epochs_and_after_the_last(tmp_path):
    """VALIDATE_FREQ 2 over 3 epochs validates epochs 2 and 3 (the last, whatever the frequency);
    the result reports the last epoch's accuracy and the best of the two."""
    result = main_single_gpu.main(train_args(tmp_path, *PLAIN_RECIPE, 'VALIDATE_FREQ', '2', epochs=3))
    val = [r for r in read_metrics(tmp_path) if r['kind'] == 'val']
    assert [(r['epoch'], r['model']) for r in val] == [(2, 'model'), (3, 'model')]
    assert result['last_acc1'] == val[-1]['acc1'] and result['best_acc1'] == max(r['acc1'] for r in val)
    assert paddle.load(str(tmp_path / 'best.pdparams'))['epoch'] == result['best_epoch']


def test_nan_loss_stops_and_keeps_the_last_checkpoint(full_run, tmp_path):
    output, _ = full_run
    last = tmp_path / 'last.pdparams'
    shutil.copy(output / 'epoch_1.pdparams', last)
    before = digest(last)
    with pytest.raises(engine.TrainingDiverged, match=r'loss is nan at epoch 2, step \d+/22'):
        main_single_gpu.main(train_args(tmp_path, *FULL_RECIPE, 'TRAIN.BASE_LR', '1e30', extra=['-resume', str(last)]))
    assert digest(last) == before
    assert not (tmp_path / 'best.pdparams').exists()


def test_weights_that_became_nan_at_the_end_of_an_epoch_stop_the_run_unsaved(tmp_path, monkeypatch):
    """A weight NaN after the epoch's last step (whose loss was finite) stops the run before the
    epoch is validated or saved, naming the weight."""
    train_one_epoch = engine.Trainer.train_one_epoch

    def poisoned(self, epoch):
        stats = train_one_epoch(self, epoch)
        with paddle.no_grad():
            self.model.head.bias.set_value(np.full(self.model.head.bias.shape, np.nan, np.float32))
        return stats
    monkeypatch.setattr(engine.Trainer, 'train_one_epoch', poisoned)
    with pytest.raises(engine.TrainingDiverged, match='weight head.bias became NaN or infinite during epoch 1'):
        main_single_gpu.main(train_args(tmp_path, *PLAIN_RECIPE, epochs=1))
    assert not list(tmp_path.glob('*.pdparams'))
    assert not any(r['kind'] == 'val' for r in read_metrics(tmp_path))


def test_resume_of_another_architecture_lists_the_differences(full_run, tmp_path):
    output, _ = full_run
    args = train_args(tmp_path, *FULL_RECIPE, 'MODEL.EMBED_DIM', '48', extra=['-resume', str(output / 'last.pdparams')])
    with pytest.raises(CheckpointError) as info:
        main_single_gpu.main(args)
    message = str(info.value)
    assert 'another architecture' in message
    assert 'cls_token' in message and '[1, 1, 32]' in message and '[1, 1, 48]' in message
    assert 'shape mismatch' in message


def test_a_checkpoint_saved_before_the_first_step_after_resume_keeps_the_optimizer_state(tmp_path, monkeypatch):
    """Resumed at an epoch not validated yet, the run validates it and saves before any optimizer
    step. Paddle 2.6's optimizer holds loaded moments aside until its first step, so that
    checkpoint had an empty optimizer state, and a run continued from it restarted AdamW."""
    validate = engine.Trainer.validate

    def fail_once(self, epoch):
        monkeypatch.setattr(engine.Trainer, 'validate', validate)
        raise DataError('cannot read image val/broken.jpg')
    monkeypatch.setattr(engine.Trainer, 'validate', fail_once)
    args = train_args(tmp_path, *PLAIN_RECIPE, epochs=2, extra=['-resume', 'auto'])
    with pytest.raises(DataError):
        main_single_gpu.main(args)
    kept = utils.load_checkpoint(str(tmp_path / 'last.pdparams'))
    monkeypatch.setattr(engine.Trainer, 'train_one_epoch', lambda self, epoch: pytest.fail('stop here'))
    with pytest.raises(pytest.fail.Exception):
        main_single_gpu.main(args)
    saved = utils.load_checkpoint(str(tmp_path / 'last.pdparams'))
    assert (saved['epoch'], saved['unvalidated'], kept['unvalidated']) == (1, False, True)
    moments = sorted(k for k in kept['optimizer'] if k != 'LR_Scheduler')
    assert len(moments) > 100 and sorted(k for k in saved['optimizer'] if k != 'LR_Scheduler') == moments
    for key in moments:
        np.testing.assert_array_equal(np.asarray(saved['optimizer'][key]), np.asarray(kept['optimizer'][key]))


def test_resume_with_ema_weights_that_do_not_fit_lists_the_differences(full_run, tmp_path):
    """It was a ValueError traceback from the EMA's set_state_dict."""
    output, _ = full_run
    checkpoint = utils.load_checkpoint(str(output / 'last.pdparams'))
    del checkpoint['model_ema']['norm.weight']
    utils.save_checkpoint(checkpoint, str(tmp_path / 'edited.pdparams'))
    args = train_args(tmp_path / 'run', *FULL_RECIPE, extra=['-resume', str(tmp_path / 'edited.pdparams')])
    with pytest.raises(CheckpointError, match=r'(?s)edited.pdparams: its EMA weights do not fit the model \(1 problems\):\n'
                                              r'.*norm.weight .* missing from checkpoint'):
        main_single_gpu.main(args)


def test_resume_of_weights_only_file_is_an_error(full_run, tmp_path):
    output, _ = full_run
    weights = tmp_path / 'weights.pdparams'
    paddle.save(paddle.load(str(output / 'last.pdparams'))['model'], str(weights))
    with pytest.raises(CheckpointError, match='not a training checkpoint.*use -pretrained'):
        main_single_gpu.main(train_args(tmp_path, *FULL_RECIPE, extra=['-resume', str(weights)]))


def test_training_checkpoint_as_pretrained_for_fine_tuning(full_run, tmp_path, capsys):
    """-pretrained -ema takes the checkpoint's EMA weights; a new class count drops the head;
    with -resume auto and no checkpoint in the output folder yet the run starts from them."""
    output, _ = full_run
    args = train_args(tmp_path, *PLAIN_RECIPE, 'MODEL.NUM_CLASSES', '12', epochs=1,
                      extra=['-pretrained', str(output / 'last.pdparams'), '-ema', '-resume', 'auto'])
    main_single_gpu.main(args)
    out = capsys.readouterr().out
    assert f'-resume auto: no checkpoint in {tmp_path} yet, starting afresh' in out
    assert 'dropping the classifier head (10 classes) for a new one with 12 classes' in out
    assert f'loaded EMA weights from {output / "last.pdparams"}' in out


@pytest.mark.parametrize('name', ['last.pdparams', 'best.pdparams'])
def test_fresh_run_does_not_overwrite_another_runs_checkpoints(tmp_path, name):
    checkpoint = tmp_path / name
    checkpoint.write_bytes(b'another run')
    with pytest.raises(ConfigError, match=f'{checkpoint} exists: .* Continue it with -resume auto'):
        main_single_gpu.main(train_args(tmp_path))
    assert checkpoint.read_bytes() == b'another run'


def test_resume_auto_without_last_checkpoint_does_not_start_over_the_runs_best(tmp_path):
    """A folder whose last.pdparams is gone but whose best.pdparams is there: -resume auto, which
    would start afresh, refuses to overwrite it."""
    best = tmp_path / 'best.pdparams'
    best.write_bytes(b'the best epoch')
    with pytest.raises(ConfigError, match=re.escape(f'-resume auto: {tmp_path} holds {best} but no last.pdparams '
                                                    f'to continue from; starting afresh there would overwrite it')):
        main_single_gpu.main(train_args(tmp_path, extra=['-resume', 'auto']))
    assert best.read_bytes() == b'the best epoch'


def test_run_continued_from_elsewhere_does_not_overwrite_another_runs_checkpoints(full_run, tmp_path):
    """-resume of a checkpoint in another folder into an -output holding a run is refused; a
    checkpoint of the output folder itself continues that run."""
    output, _ = full_run
    (tmp_path / 'last.pdparams').write_bytes(b'another run')
    with pytest.raises(ConfigError, match=f'{tmp_path / "last.pdparams"} exists: the output folder holds another'):
        main_single_gpu.main(train_args(tmp_path, *FULL_RECIPE, extra=['-resume', str(output / 'epoch_1.pdparams')]))
    assert (tmp_path / 'last.pdparams').read_bytes() == b'another run'
    same_folder = train_args(output, *FULL_RECIPE, extra=['-resume', str(output / 'last.pdparams')])
    engine.check_inputs(engine.parse_config(same_folder))  # no error


def test_a_run_continued_in_a_new_folder_starts_its_own_metrics(full_run, tmp_path):
    """Records a stopped run left in the new -output (it died before its first checkpoint) are not
    kept among those of the run continued there: the earlier epochs' are in the checkpoint's folder."""
    output, _ = full_run
    (tmp_path / 'metrics.jsonl').write_text('{"kind": "val", "epoch": 1, "step": 5, "loss": 999.0}\n')
    main_single_gpu.main(train_args(tmp_path, *FULL_RECIPE, extra=['-resume', str(output / 'epoch_1.pdparams')]))
    records = read_metrics(tmp_path)
    assert records and all(r['epoch'] == 2 for r in records) and all(r['loss'] != 999.0 for r in records)


def test_the_runs_config_yaml_reads_the_same_files_from_any_folder(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    config = get_config()
    config.defrost()
    config.DATA.DATA_PATH, config.TRAIN.TEACHER_PRETRAINED = 'data/imagenet', '../teacher.pdparams'
    written = engine.reusable_config(config)
    assert written.DATA.DATA_PATH == str(tmp_path / 'data' / 'imagenet')
    assert written.TRAIN.TEACHER_PRETRAINED == str(tmp_path.parent / 'teacher.pdparams')
    assert written.TRAIN.TEACHER_MODEL == 'regnety_160'
    config.TRAIN.TEACHER_MODEL = 'configs/xcit_nano_12_p16_224.yaml'
    assert engine.reusable_config(config).TRAIN.TEACHER_MODEL == str(tmp_path / 'configs' / 'xcit_nano_12_p16_224.yaml')


def test_the_runs_config_yaml_leaves_out_what_only_the_run_did():
    """The weights a run started from or continued, -eval, -ema and its process count are not
    written to config.yaml: as -cfg, it would otherwise evaluate another checkpoint's EMA weights."""
    config = get_config()
    config.defrost()
    config.MODEL.PRETRAINED, config.MODEL.RESUME = 'start.pdparams', 'auto'
    config.EVAL, config.EMA_EVAL, config.NGPUS = True, True, 2
    written = engine.reusable_config(config)
    assert (written.MODEL.PRETRAINED, written.MODEL.RESUME, written.EVAL, written.EMA_EVAL, written.NGPUS) == (
        '', '', False, False, -1)
    assert config.EMA_EVAL and config.MODEL.PRETRAINED == 'start.pdparams'  # the run's own config is unchanged


def test_a_checkpoint_of_the_output_folder_continues_however_its_path_is_spelled(full_run, monkeypatch):
    """-resume last.pdparams from within the output folder, given with another spelling of that
    folder, continues the run there rather than being refused as another run's checkpoint."""
    output, _ = full_run
    monkeypatch.chdir(output)
    engine.check_inputs(engine.parse_config(train_args(f'{output}/./', *FULL_RECIPE, extra=['-resume', 'last.pdparams'])))
    with pytest.raises(ConfigError, match=r"-resume epoch_1\.pdparams: .* holds the run's latest checkpoint"):
        engine.check_inputs(engine.parse_config(train_args(output, *FULL_RECIPE, extra=['-resume', 'epoch_1.pdparams'])))


def test_resume_warns_only_of_settings_that_changed(full_run, tmp_path, caplog):
    """A run continued in another folder with the settings it was started with (other -output and
    -resume) warns of nothing; one with TRAIN.MODEL_EMA on from a checkpoint without EMA weights
    is refused by name, not failed with a KeyError."""
    output, _ = full_run
    shutil.copy(output / 'epoch_1.pdparams', tmp_path / 'last.pdparams')
    logger = logging.getLogger('test_engine_train')
    with caplog.at_level(logging.INFO, logger='test_engine_train'):
        trainer = engine.Trainer(engine.parse_config(train_args(tmp_path, *FULL_RECIPE, extra=['-resume', 'auto'])),
                                 'cpu', False, logger)
    assert trainer.epoch == 1 and 'resumed from' in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    checkpoint = paddle.load(str(output / 'epoch_1.pdparams'))
    del checkpoint['model_ema']
    paddle.save(checkpoint, str(tmp_path / 'last.pdparams'))
    with pytest.raises(CheckpointError, match=re.escape(f'{tmp_path / "last.pdparams"} has no EMA weights but '
                                                        f'TRAIN.MODEL_EMA is on')):
        engine.Trainer(engine.parse_config(train_args(tmp_path, *FULL_RECIPE, extra=['-resume', 'auto'])),
                       'cpu', False, logger)


def test_a_fresh_run_starts_a_fresh_metrics_file(tmp_path):
    """A folder with the records of a run stopped before its first checkpoint: a fresh run there
    replaces them with its own (one train and one val record of its one epoch)."""
    (tmp_path / 'metrics.jsonl').write_text('{"kind": "train", "epoch": 1, "step": 7, "loss": 9.0}\n')
    main_single_gpu.main(train_args(tmp_path, *PLAIN_RECIPE, 'REPORT_FREQ', '100', epochs=1))
    records = read_metrics(tmp_path)
    assert [(r['kind'], r['epoch'], r['step']) for r in records] == [('train', 1, 22), ('val', 1, 22)]


def test_metrics_of_a_resumed_epoch_are_dropped_with_its_validation_unless_validated(tmp_path):
    """keep_epochs_up_to(1): records of epoch 2 and a line cut short go; epoch 1's validation stays
    if it is complete, and goes if the checkpoint says it is to be run again."""
    lines = ['{"kind": "train", "epoch": 1, "step": 5}', '{"kind": "val", "epoch": 1, "step": 5}',
             '{"kind": "train", "epoch": 2, "step": 10}', '{"kind": "val", "epo']
    for validated, kept in ((True, lines[:2]), (False, lines[:1])):
        (tmp_path / 'metrics.jsonl').write_text('\n'.join(lines))
        utils.MetricsLog(str(tmp_path)).keep_epochs_up_to(1, validated=validated)
        assert (tmp_path / 'metrics.jsonl').read_text().splitlines() == kept


def test_user_errors_end_with_one_line_and_status_1(capsys):
    """A diverged run, like bad input, is one 'error:' line and exit status 1; any other
    exception is a bug and keeps its traceback."""
    def diverge():
        raise engine.TrainingDiverged('loss is nan at epoch 2, step 3/22')
    with pytest.raises(SystemExit) as stop:
        engine.exit_on_user_error(diverge)
    assert stop.value.code == 1
    assert capsys.readouterr().err == 'error: loss is nan at epoch 2, step 3/22\n'
    with pytest.raises(KeyError):
        engine.exit_on_user_error(lambda: {}['model'])


def test_batchnorm_statistics_are_averaged_over_the_processes(monkeypatch):
    """With 2 processes, each BatchNorm's running mean and variance become the mean of the two
    processes' (here the other one holds this one's plus 1); weights are left alone."""
    paddle.seed(0)
    model = XCiT(patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=10)
    before = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    stats = [k for k in before if k.endswith(('._mean', '._variance'))]
    assert stats
    monkeypatch.setattr(utils, 'get_world_size', lambda: 2)
    monkeypatch.setattr(utils.dist, 'all_reduce', lambda t: paddle.assign(t + (t + 1.0), output=t))
    utils.average_batchnorm_statistics(model)
    for name, value in model.state_dict().items():
        expected = before[name] + 0.5 if name in stats else before[name]
        np.testing.assert_allclose(value.numpy(), expected, rtol=1e-6, err_msg=name)


def test_only_the_first_process_writes_the_log_metrics_and_checkpoints(tmp_path, capsys):
    """Rank 0 prints and appends to log.txt; another rank prints warnings only and writes no log,
    no metrics record and no checkpoint."""
    logger = utils.setup_logger(str(tmp_path / 'first'), rank=0, name='test_ranks')
    logger.info('epoch 1 done')
    assert (tmp_path / 'first' / 'log.txt').read_text().endswith(' epoch 1 done\n')
    assert capsys.readouterr().out.endswith(' epoch 1 done\n')
    (tmp_path / 'other').mkdir()
    logger = utils.setup_logger(str(tmp_path / 'other'), rank=1, name='test_ranks')
    logger.info('epoch 1 done')
    logger.warning('a warning')
    out = capsys.readouterr().out
    assert out.endswith(' a warning\n') and 'epoch 1 done' not in out
    assert not (tmp_path / 'other' / 'log.txt').exists()
    utils.MetricsLog(str(tmp_path / 'other'), enabled=False).write('train', epoch=1)
    trainer = type('Rank1', (), {'rank': 1, 'config': get_config(), 'logger': logger,
                                 'state_dict': lambda self: {'epoch': 1}})()
    trainer.config.defrost()
    trainer.config.SAVE = str(tmp_path / 'other')
    engine.Trainer.save(trainer, 'last.pdparams')
    assert os.listdir(tmp_path / 'other') == []


def test_an_equal_accuracy_later_keeps_the_earlier_best(tmp_path):
    """best.pdparams is written when an epoch's Acc@1 beats the best so far: 50%, 60%, 60%, 55%
    keep epoch 2 as the best; last.pdparams is written after every epoch."""
    saved = []
    trainer = type('Stub', (), {
        'config': get_config(), 'unvalidated': True, 'best_acc': None, 'best_epoch': None, 'epoch': 0,
        'save': lambda self, name: saved.append((self.epoch, name)),
        'validate': lambda self, epoch: {'model': {'acc1': [50.0, 60.0, 60.0, 55.0][epoch]}}})()
    for epoch in range(1, 5):
        trainer.epoch, trainer.unvalidated = epoch, True
        engine.Trainer.finish_epoch(trainer)
    assert (trainer.best_acc, trainer.best_epoch) == (60.0, 2)
    assert [e for e, name in saved if name == 'best.pdparams'] == [1, 2]
    assert [e for e, name in saved if name == 'last.pdparams'] == [1, 2, 3, 4]


def test_durations_read_as_hours_minutes_and_seconds():
    assert [utils.format_seconds(s) for s in (0, 59.6, 3725.4, 90061, -5)] == [
        '0:00:00', '0:01:00', '1:02:05', '25:01:01', '0:00:00']


def test_an_earlier_checkpoint_is_not_continued_over_the_later_ones(full_run):
    """Continuing from epoch_1.pdparams in its own folder would overwrite last.pdparams,
    best.pdparams and metrics.jsonl of the later epochs: refused before anything is written."""
    output, _ = full_run
    before = {path.name: path.read_bytes() for path in output.iterdir() if path.is_file()}
    earlier = train_args(output, *FULL_RECIPE, extra=['-resume', str(output / 'epoch_1.pdparams')])
    with pytest.raises(ConfigError, match=re.escape(f'-resume {output / "epoch_1.pdparams"}: {output} holds the '
                                                    f'run\'s latest checkpoint {output / "last.pdparams"}')):
        main_single_gpu.main(earlier)
    assert {path.name: path.read_bytes() for path in output.iterdir() if path.is_file()} == before


def test_a_run_in_the_folder_of_a_running_one_is_refused(tmp_path):
    """Two runs writing to one folder (a job relaunched while it still runs) would mix their records
    in metrics.jsonl and overwrite each other's checkpoints: the second stops before writing; once
    the first has ended, -resume auto continues it."""
    (tmp_path / 'metrics.jsonl').write_text('{"kind": "train"}\n')
    args = train_args(tmp_path, *PLAIN_RECIPE, 'VALIDATE_FREQ', '0', epochs=1, extra=['-resume', 'auto'])
    running = utils.lock_folder(str(tmp_path))
    refused = f'{tmp_path} is the output folder of a run that is still going on'
    with pytest.raises(ConfigError, match=refused):
        main_single_gpu.main(args)
    with pytest.raises(ConfigError, match=refused):  # an evaluation would write its log and summary there
        (tmp_path / 'w.pdparams').write_bytes(b'weights')
        main_single_gpu.main(['-eval', '-dataset', 'digits', '-pretrained', str(tmp_path / 'w.pdparams'),
                              '-output', str(tmp_path)])
    assert (tmp_path / 'metrics.jsonl').read_text() == '{"kind": "train"}\n'
    assert not (tmp_path / 'log.txt').exists()  # the refused run wrote nothing, not even its log
    running.close()
    assert main_single_gpu.main(args)['epochs'] == 1
    assert main_single_gpu.main(args)['epochs'] == 1  # the lock went with the run that held it


def test_checkpoints_left_half_written_by_a_killed_run_are_removed(tmp_path):
    """A run killed while writing a checkpoint leaves its temporary file (as large as a
    checkpoint); the next run in the folder removes such files, and only those."""
    for name in ('last.pdparams.tmp4242', 'best.pdparams.tmp7', 'epoch_3.pdparams.tmp99'):
        (tmp_path / name).write_bytes(b'part of a checkpoint')
    (tmp_path / 'notes.pdparams.tmp').write_text('not a checkpoint of ours')
    with capture_stdout() as out:
        main_single_gpu.main(train_args(tmp_path, *PLAIN_RECIPE, epochs=1, extra=['-resume', 'auto']))
    assert ('removed what a stopped run left of checkpoints it was writing: best.pdparams.tmp7, '
            'epoch_3.pdparams.tmp99, last.pdparams.tmp4242') in out.getvalue()
    assert not list(tmp_path.glob('*.pdparams.tmp[0-9]*')) and (tmp_path / 'notes.pdparams.tmp').exists()


def test_corrupt_image_is_named(tmp_path):
    for split in ('train', 'val'):
        for label in ('a', 'b'):
            folder = tmp_path / 'data' / split / label
            folder.mkdir(parents=True)
            for i in range(4):
                Image.new('RGB', (32, 32), (60 * i, 100, 30)).save(folder / f'{i}.png')
    bad = tmp_path / 'data' / 'train' / 'b' / '2.png'
    bad.write_bytes(b'not a png at all')
    args = ['-dataset', 'imagefolder', '-data_path', str(tmp_path / 'data'), '-batch_size', '8',
            '-output', str(tmp_path / 'out'), '-opts', *TINY, *PLAIN_RECIPE, 'TRAIN.NUM_EPOCHS', '1',
            'DATA.NUM_WORKERS', '1']  # the failure surfaces from a worker process
    with pytest.raises(DataError, match=f'cannot read image {bad}'):
        main_single_gpu.main(args)
    # as a command: one error line, and no traceback from Paddle's loader thread, which gets it first
    done = subprocess.run([sys.executable, os.path.join(ROOT, 'main_single_gpu.py'), *args],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and 'Traceback' not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(f'error: cannot read image {bad}')


def test_a_run_on_an_image_folder_names_its_classes_for_predict(tmp_path, capsys):
    """config.yaml of a run on an image folder holds its class folders' names (label order), which
    predict.py shows for the model without -class_names."""
    import predict
    names = ['Zebra', 'ant', 'cat']  # code-point order, as the labels
    for split in ('train', 'val'):
        for i, name in enumerate(names):
            folder = tmp_path / 'data' / split / name
            folder.mkdir(parents=True)
            for j in range(2):
                Image.new('RGB', (32, 32), (80 * i, 40 * j, 30)).save(folder / f'{j}.png')
    output = tmp_path / 'out'
    main_single_gpu.main(['-dataset', 'imagefolder', '-data_path', str(tmp_path / 'data'), '-batch_size', '6',
                          '-output', str(output), '-opts', *TINY, *PLAIN_RECIPE, 'TRAIN.NUM_EPOCHS', '1',
                          'MODEL.NUM_CLASSES', '3'])
    written = get_config(str(output / 'config.yaml'))
    assert written.DATA.CLASS_NAMES == names
    capsys.readouterr()
    predict.main(['-cfg', str(output / 'config.yaml'), '-pretrained', str(output / 'last.pdparams'),
                  str(tmp_path / 'data' / 'val' / 'ant' / '0.png')])
    ranked = capsys.readouterr().out.splitlines()[1:4]
    assert sorted(line.split()[1] for line in ranked) == sorted(names)
    assert all(line.split()[2] == f'({names.index(line.split()[1])}):' for line in ranked)


def test_class_folders_that_are_not_the_models_classes_are_not_named(tmp_path):
    """3 class folders for a model of 4 classes: config.yaml names no classes (3 names for 4
    outputs would make it unusable as -cfg), and the run says that the counts differ."""
    for split in ('train', 'val'):
        for i, name in enumerate(['ant', 'bee', 'cat']):
            folder = tmp_path / 'data' / split / name
            folder.mkdir(parents=True)
            for j in range(2):
                Image.new('RGB', (32, 32), (80 * i, 40 * j, 30)).save(folder / f'{j}.png')
    output = tmp_path / 'out'
    with capture_stdout() as out:
        main_single_gpu.main(['-dataset', 'imagefolder', '-data_path', str(tmp_path / 'data'), '-batch_size', '6',
                              '-output', str(output), '-opts', *TINY, *PLAIN_RECIPE, 'TRAIN.NUM_EPOCHS', '1',
                              'MODEL.NUM_CLASSES', '4'])
    assert 'the training set has 3 classes, the model MODEL.NUM_CLASSES=4 outputs' in out.getvalue()
    written = get_config(str(output / 'config.yaml'))
    assert (written.DATA.CLASS_NAMES, written.MODEL.NUM_CLASSES) == ([], 4)


def test_unknown_opts_key_is_rejected_by_name(tmp_path):
    with pytest.raises(ConfigError, match='unknown config key TRAIN.NO_SUCH_KEY'):
        main_single_gpu.main(train_args(tmp_path, 'TRAIN.NO_SUCH_KEY', '1'))


def test_gradient_accumulation_counts_optimizer_steps(tmp_path):
    """ACCUM_ITER 2 with batch 32: one optimizer step per 2 batches, the same count as batch 64."""
    result = main_single_gpu.main(train_args(tmp_path, *PLAIN_RECIPE, 'TRAIN.ACCUM_ITER', '2', 'VALIDATE_FREQ',
                                             '0', epochs=1, batch=32))
    assert result['steps'] == 1438 // 32 // 2


def test_gradient_accumulation_takes_the_steps_of_the_larger_batch(tmp_path):
    """Batches of 16 accumulated 4 times train as batches of 64: the same 22 steps an epoch on
    the same images (the 89th batch of 16, less than a step, is skipped), each averaging the
    gradient over 64 images, with the EMA updated once a step. With a frozen backbone BatchNorm
    does not depend on the batch, so the heads agree up to rounding after two epochs of SGD."""
    opts = (*PLAIN_RECIPE, 'TRAIN.FREEZE_BACKBONE', 'True', 'TRAIN.OPTIMIZER.NAME', 'SGD', 'TRAIN.BASE_LR', '0.05',
            'TRAIN.MODEL_EMA', 'True', 'TRAIN.MODEL_EMA_DECAY', '0.5', 'VALIDATE_FREQ', '0')
    main_single_gpu.main(train_args(tmp_path / 'large', *opts, batch=64))
    main_single_gpu.main(train_args(tmp_path / 'accumulated', *opts, 'TRAIN.ACCUM_ITER', '4', batch=16))
    large, accumulated = (paddle.load(str(tmp_path / run / 'last.pdparams')) for run in ('large', 'accumulated'))
    assert large['step'] == accumulated['step'] == 2 * 22
    assert np.abs(large['model']['head.weight'].numpy() - large['model_ema']['head.weight'].numpy()).max() > 1e-4
    for part in ('model', 'model_ema'):
        for name in ('head.weight', 'head.bias'):
            np.testing.assert_allclose(accumulated[part][name].numpy(), large[part][name].numpy(), rtol=1e-5,
                                       atol=1e-6, err_msg=f'{part} {name}')


def test_each_epoch_trains_on_its_own_shuffle_augmentation_and_mixup(tmp_path, monkeypatch):
    """What the loss sees at the first and last step of each epoch is the loader's batch of the
    epoch (its shuffle from SEED and the epoch, its augmentation draws) mixed with the draws of
    default_rng([SEED, rank, epoch, step]): the two epochs see other images, mixed otherwise."""
    seen = []
    build_criterion = engine.build_criterion

    def recording_criterion(config, teacher):
        criterion = build_criterion(config, teacher)

        def loss(images, outputs, targets):
            seen.append((images.numpy(), targets.numpy()))
            return criterion(images, outputs, targets)
        return loss
    monkeypatch.setattr(engine, 'build_criterion', recording_criterion)
    args = train_args(tmp_path, *PLAIN_RECIPE, 'TRAIN.MIXUP_PROB', '1.0', 'VALIDATE_FREQ', '0')
    main_single_gpu.main(args)
    steps = 1438 // 64
    assert len(seen) == 2 * steps
    config = engine.parse_config(args)
    loader, mixup = build_dataloader(config, build_dataset(config, 'train'), 'train'), build_mixup(config)
    for epoch in (0, 1):
        loader.dataset.set_epoch(epoch)
        loader.batch_sampler.set_epoch(epoch)
        batches = list(loader)
        for step in (0, steps - 1):
            images, targets = mixup(*batches[step], np.random.default_rng([config.SEED, 0, epoch, step]))
            np.testing.assert_array_equal(seen[epoch * steps + step][0], images.numpy())
            np.testing.assert_array_equal(seen[epoch * steps + step][1], targets.numpy())
    assert not np.array_equal(seen[0][1], seen[steps][1])


def test_ema_follows_train_model_ema_decay(tmp_path):
    """TRAIN.MODEL_EMA_DECAY 0 makes the EMA a copy of the model after every step: at the end of
    the run it holds the model's weights and BatchNorm statistics exactly."""
    main_single_gpu.main(train_args(tmp_path, *PLAIN_RECIPE, 'TRAIN.MODEL_EMA', 'True', 'TRAIN.MODEL_EMA_DECAY', '0.0',
                                    'VALIDATE_FREQ', '0', epochs=1))
    last = paddle.load(str(tmp_path / 'last.pdparams'))
    assert last['model'].keys() == last['model_ema'].keys()
    for name, value in last['model'].items():
        np.testing.assert_array_equal(last['model_ema'][name].numpy(), value.numpy(), err_msg=name)


def test_grad_checkpointing_trains_the_same_weights(tmp_path):
    """TRAIN.GRAD_CHECKPOINTING recomputes the blocks in the backward pass: same checkpoint."""
    plain_opts = (*PLAIN_RECIPE, 'MODEL.DROPPATH', '0.1', 'VALIDATE_FREQ', '0')
    main_single_gpu.main(train_args(tmp_path / 'plain', *plain_opts, epochs=1))
    with capture_stdout() as out:
        main_single_gpu.main(train_args(tmp_path / 'recomputed', *plain_opts, 'TRAIN.GRAD_CHECKPOINTING', 'True',
                                        epochs=1))
    assert 'gradient checkpointing: the XCA blocks recompute their activations' in out.getvalue()
    runs = [paddle.load(str(tmp_path / run / 'last.pdparams')) for run in ('plain', 'recomputed')]
    for part in ('model', 'optimizer'):
        assert max_abs_diff(flat_state(runs[0][part]), flat_state(runs[1][part])) == 0.0, part


@pytest.mark.parametrize('optimizer', ['AdamW', 'SGD'])
def test_frozen_backbone_trains_the_head_alone(full_run, tmp_path, optimizer):
    """A linear probe from a checkpoint: with the full recipe's drop path and EMA, every weight and
    BatchNorm statistic but the new 12-class head's stays exactly as loaded, in the model and its
    EMA; the head learns; the run resumes exactly (with SGD: its momentum too)."""
    output, _ = full_run
    source = paddle.load(str(output / 'last.pdparams'))['model']
    opts = (*FULL_RECIPE, 'MODEL.NUM_CLASSES', '12', 'TRAIN.FREEZE_BACKBONE', 'True', 'DATA.NUM_WORKERS', '0',
            'TRAIN.OPTIMIZER.NAME', optimizer)
    with capture_stdout() as out:
        main_single_gpu.main(train_args(tmp_path / 'probe', *opts, epochs=2,
                                        extra=['-pretrained', str(output / 'last.pdparams')]))
    assert 'frozen backbone: the head alone trains (396 parameters)' in out.getvalue()
    probe = paddle.load(str(tmp_path / 'probe' / 'last.pdparams'))
    for part in ('model', 'model_ema'):
        for name, value in probe[part].items():
            if name.startswith('head.'):
                assert value.shape[-1] == 12
            else:
                np.testing.assert_array_equal(value.numpy(), source[name].numpy(), err_msg=f'{part} {name}')
    assert np.abs(probe['model']['head.weight'].numpy() - probe['model_ema']['head.weight'].numpy()).max() > 0
    shutil.copytree(tmp_path / 'probe', tmp_path / 'resumed')
    shutil.copy(tmp_path / 'probe' / 'epoch_1.pdparams', tmp_path / 'resumed' / 'last.pdparams')
    main_single_gpu.main(train_args(tmp_path / 'resumed', *opts, epochs=2, extra=['-resume', 'auto']))
    resumed = paddle.load(str(tmp_path / 'resumed' / 'last.pdparams'))
    for part in ('model', 'model_ema', 'optimizer'):
        assert max_abs_diff(flat_state(probe[part]), flat_state(resumed[part])) == 0.0, part


@pytest.mark.parametrize('flags,message', [
    (['-pretrained', 'a.pdparams', '-resume', 'b.pdparams'], '-pretrained and -resume exclude each other'),
    (['-ema'], '-ema selects the EMA weights of the -pretrained checkpoint'),
    (['-ema', '-resume', 'b.pdparams'], 'when training, -resume restores both the model and its EMA'),
    (['-eval'], '-eval needs weights to evaluate'),
    (['-eval', '-resume', 'auto'], '-resume auto continues a training run'),
])
def test_weight_options_that_would_have_no_effect_are_errors(tmp_path, flags, message):
    with pytest.raises(ConfigError, match=message):
        main_single_gpu.main(train_args(tmp_path, extra=flags))


def test_settings_without_effect_are_reported(tmp_path):
    with capture_stdout() as out:
        main_single_gpu.main(train_args(tmp_path, *PLAIN_RECIPE, 'TRAIN.MODEL_EMA_DECAY', '0.5', epochs=1,
                                        extra=['-data_path', str(tmp_path / 'images')]))
    assert 'TRAIN.MODEL_EMA_DECAY is 0.5, which has no effect: TRAIN.MODEL_EMA is off' in out.getvalue()
    assert f'-data_path {tmp_path / "images"} has no effect: the digits dataset is bundled' in out.getvalue()


def test_distillation_from_a_frozen_xcit_teacher(plain_run, tmp_path):
    """Hard distillation with alpha 1 trains on the teacher's answers only: a teacher whose head
    is rolled by one class (it answers c + 1 for c) pulls a student that starts as the unrolled
    model away from the true labels."""
    output, start, _ = plain_run
    teacher_cfg = tmp_path / 'teacher.yaml'
    teacher_cfg.write_text('MODEL:\n  PATCH_SIZE: 8\n  EMBED_DIM: 32\n  DEPTH: 1\n  NUM_HEADS: 2\n')
    weights = paddle.load(str(output / 'last.pdparams'))['model']
    weights['head.weight'] = np.roll(np.asarray(weights['head.weight']), 1, axis=1)
    weights['head.bias'] = np.roll(np.asarray(weights['head.bias']), 1)
    teacher_weights = tmp_path / 'teacher.pdparams'
    paddle.save(weights, str(teacher_weights))
    distill = ['TRAIN.DISTILLATION_TYPE', 'hard', 'TRAIN.DISTILLATION_ALPHA', '1.0', 'TRAIN.SMOOTHING', '0.0',
               'TRAIN.TEACHER_MODEL', str(teacher_cfg), 'TRAIN.TEACHER_PRETRAINED', str(teacher_weights)]
    result = main_single_gpu.main(train_args(tmp_path / 'out', *PLAIN_RECIPE, *distill, epochs=1,
                                             extra=['-pretrained', str(output / 'last.pdparams')]))
    assert start['last_acc1'] > 60.0 and result['last_acc1'] < start['last_acc1'] / 2


def test_a_checkpoint_that_cannot_be_written_is_one_error_naming_it(tmp_path, monkeypatch, capsys):
    """A full disk while saving: one error line naming the file (was an OSError traceback from
    inside paddle.save), and the previous checkpoint is intact."""
    main_single_gpu.main(train_args(tmp_path, *PLAIN_RECIPE, epochs=1))
    args = train_args(tmp_path, *PLAIN_RECIPE, epochs=2, extra=['-resume', 'auto'])
    before = digest(tmp_path / 'last.pdparams')

    def full_disk(state, path):
        with open(path, 'wb') as f:
            f.write(b'part of a checkpoint')
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(utils.paddle, 'save', full_disk)
    with pytest.raises(SystemExit) as stop:
        engine.exit_on_user_error(main_single_gpu.main, args)
    assert stop.value.code == 1
    path = tmp_path / 'last.pdparams'
    assert capsys.readouterr().err == (f'error: cannot write {path} (No space left on device); the file is as it '
                                       f'was before, and -resume auto continues from last.pdparams\n')
    assert digest(path) == before


def test_checkpoint_writes_are_atomic(tmp_path, monkeypatch):
    path = tmp_path / 'last.pdparams'
    utils.save_checkpoint({'epoch': 1}, str(path))

    def crash(state, target):
        with open(target, 'wb') as f:
            f.write(b'half a checkpoint')
        raise OSError('disk full')
    monkeypatch.setattr(utils.paddle, 'save', crash)
    with pytest.raises(OSError, match='disk full'):
        utils.save_checkpoint({'epoch': 2}, str(path))
    assert utils.load_checkpoint(str(path)) == {'epoch': 1}
    assert [p.name for p in tmp_path.iterdir()] == ['last.pdparams']


def test_a_checkpoint_is_on_disk_before_it_replaces_the_last(tmp_path, monkeypatch):
    """The new file's data are synced before the rename: after a power failure the name holds the
    previous checkpoint or the new one whole, not an empty file the rename got to first."""
    path, events = tmp_path / 'last.pdparams', []
    fsync, replace = os.fsync, os.replace
    written = tmp_path / f'last.pdparams.tmp{os.getpid()}'
    monkeypatch.setattr(os, 'fsync', lambda fd: events.append(('fsync', os.path.getsize(written))) or fsync(fd))
    monkeypatch.setattr(os, 'replace', lambda a, b: events.append(('replace', os.path.basename(b))) or replace(a, b))
    utils.save_checkpoint({'epoch': 1}, str(path))
    assert [e[0] for e in events] == ['fsync', 'replace'] and events[0][1] == os.path.getsize(path) > 0
    assert events[1] == ('replace', 'last.pdparams')


def operator_names(run):
    """The names of the operators ``run()`` calls, as Paddle's autocast knows them (those of its
    operator statistics, ``paddle.amp.debugging``)."""
    paddle.base.core.clear_low_precision_op_list()
    paddle.set_flags({'FLAGS_low_precision_op_list': 1})
    try:
        run()
    finally:
        paddle.set_flags({'FLAGS_low_precision_op_list': 0})
    return set(paddle.base.core.get_low_precision_op_list())


def test_amp_runs_a_gpu_training_steps_gemms_in_float16_and_its_reductions_in_float32(monkeypatch):
    """The operators of a training step on the model's GPU path, as -amp's autocast sorts them:
    the GEMMs (every linear layer is a 'matmul_v2') and convolutions in float16, softmax,
    LayerNorm, sums and rsqrt in float32. (A custom float32 list with 'matmul_v2', once meant for
    XCA's q @ k^T, ran every linear layer in float32.)"""
    monkeypatch.setattr(xcit, '_eager_on_cpu', lambda tensor: False)
    model = XCiT(patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=10)
    names = operator_names(lambda: model(paddle.randn([2, 3, 32, 32])).sum().backward())
    with engine.autocast(True):
        float16, float32 = paddle.base.framework._dygraph_tracer()._get_amp_op_list()
    assert {'matmul_v2', 'conv2d'} <= names & float16 - float32
    assert {'softmax', 'layer_norm', 'reduce_sum', 'rsqrt'} <= names & float32 - float16


class _GpuPlace:
    def __init__(self, place):
        self.place = place

    def is_gpu_place(self):
        return True

    def __getattr__(self, name):
        return getattr(self.place, name)


@pytest.fixture
def gpu_amp(monkeypatch):
    """A training run takes its -amp path on the CPU: the engine sees a GPU and Paddle's GradScaler
    is enabled (it checks the device only when built); autocast stays off, as on the CPU."""
    tracer = paddle.amp.grad_scaler._dygraph_tracer
    monkeypatch.setattr(engine, 'setup_device', lambda: 'gpu:0')
    monkeypatch.setattr(paddle.amp, 'is_float16_supported', lambda device: True)
    monkeypatch.setattr(paddle.amp.grad_scaler, '_dygraph_tracer',
                        lambda: type('GpuTracer', (), {'_expected_place': _GpuPlace(tracer()._expected_place)})())


def test_amp_training_skips_steps_with_an_infinite_gradient_and_lowers_the_loss_scale(gpu_amp, tmp_path,
                                                                                      monkeypatch):
    """The loss of the first two steps is large enough for its scaled gradient to overflow: the
    scaler skips both steps and halves the scale twice (Paddle 3.x's message on that used to end
    in a TypeError with NumPy 2.4), and the checkpoint keeps the scale for -resume."""
    build_criterion = engine.build_criterion

    def overflowing_criterion(config, teacher):
        criterion, calls = build_criterion(config, teacher), []

        def loss(images, outputs, targets):
            calls.append(1)
            return criterion(images, outputs, targets) * (2.0 ** 120 if len(calls) <= 2 else 1.0)
        return loss
    monkeypatch.setattr(engine, 'build_criterion', overflowing_criterion)
    main_single_gpu.main(train_args(tmp_path, *PLAIN_RECIPE, epochs=1, extra=['-amp']))
    state = utils.load_checkpoint(str(tmp_path / 'last.pdparams'))['scaler']
    assert float(np.asarray(state['scale'])[0]) == 2.0 ** 14 and state['decr_count'] == 0


def test_amp_resume_continues_the_loss_scale(gpu_amp, tmp_path, monkeypatch):
    """Epoch 1 lowers the loss scale to 2 ** 14 (two overflowing steps); epoch 2, resumed,
    starts from that scale, which 22 finite steps leave as it is, rather than from 2 ** 16."""
    build_criterion = engine.build_criterion
    calls = []

    def overflowing_criterion(config, teacher):
        criterion = build_criterion(config, teacher)

        def loss(images, outputs, targets):
            calls.append(1)
            return criterion(images, outputs, targets) * (2.0 ** 120 if len(calls) <= 2 else 1.0)
        return loss
    monkeypatch.setattr(engine, 'build_criterion', overflowing_criterion)
    main_single_gpu.main(train_args(tmp_path, *PLAIN_RECIPE, 'VALIDATE_FREQ', '0', epochs=1, extra=['-amp']))
    assert float(np.asarray(utils.load_checkpoint(str(tmp_path / 'last.pdparams'))['scaler']['scale'])[0]) == 2.0 ** 14
    main_single_gpu.main(train_args(tmp_path, *PLAIN_RECIPE, 'VALIDATE_FREQ', '0', epochs=2,
                                    extra=['-amp', '-resume', 'auto']))
    state = utils.load_checkpoint(str(tmp_path / 'last.pdparams'))
    assert state['epoch'] == 2 and float(np.asarray(state['scaler']['scale'])[0]) == 2.0 ** 14
