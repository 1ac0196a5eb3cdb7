"""The command line and the shell scripts, with 2 CPU processes (gloo) and one: evaluation and
training agree with a single process, and bad input ends the program with one clear error line."""
import json
import os
import signal
import re
import subprocess
import sys

import numpy as np
import paddle
import pytest
from PIL import Image

from conftest import ROOT, random_model_files, running, wait_for
import launch
import main_multi_gpu
import main_single_gpu
from config import ConfigError, get_config
from xcit import build_xcit

TINY_YAML = """\
DATA:
  DATASET: digits
  IMAGE_SIZE: 32
  NUM_WORKERS: 0
MODEL:
  NUM_CLASSES: 10
  PATCH_SIZE: 8
  EMBED_DIM: 32
  DEPTH: 1
  NUM_HEADS: 2
TRAIN:
  NUM_EPOCHS: 1
  WARMUP_EPOCHS: 0
  BASE_LR: 2.0e-3
  LINEAR_SCALED_LR: 64  # peak lr = BASE_LR * global batch / 64
  RAND_AUGMENT: False
  RANDOM_ERASE_PROB: 0.0
  MIXUP_PROB: 0.0
  REPEATED_AUG: False
  MODEL_EMA: False
SAVE_FREQ: 0
REPORT_FREQ: 10
"""


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    """A tiny digits config and random weights for it."""
    return random_model_files(tmp_path_factory.mktemp('multi'), TINY_YAML)


def run_script(script, env, cwd, args=()):
    """Runs one of the repository's shell scripts with ``sh``, extra environment settings and
    arguments."""
    env = {**os.environ, 'PYTHON': sys.executable, **env}
    done = subprocess.run(['sh', os.path.join(ROOT, script), *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_eval_script_with_two_cpu_processes_matches_one_process(tiny, tmp_path):
    cfg, weights = tiny
    done = run_script('run_eval_multi.sh', dict(NGPUS='2', DATASET='digits', CONFIG=cfg, PRETRAINED=weights,
                                                BATCH_SIZE='100', OUTPUT=str(tmp_path / 'two')), cwd=tmp_path)
    two = json.loads(done.stdout.strip().splitlines()[-1])
    one = main_single_gpu.main(['-cfg', cfg, '-pretrained', weights, '-eval', '-batch_size_eval', '64',
                                '-output', str(tmp_path / 'one')])
    assert two['processes'] == 2 and two['images'] == one['images'] == 359  # the digits validation split
    assert (two['acc1'], two['acc5']) == (one['acc1'], one['acc5'])
    assert two['loss'] == pytest.approx(one['loss'], abs=2e-6)
    assert json.loads((tmp_path / 'two' / 'eval_summary.json').read_text()) == two
    # without DATASET and BATCH_SIZE the script leaves the config's: digits, batches of 128
    done = run_script('run_eval_single.sh', dict(CONFIG=cfg, PRETRAINED=weights, OUTPUT=str(tmp_path / 'single')),
                      cwd=tmp_path)
    assert 'batch 3/3' in done.stdout
    single = json.loads(done.stdout.strip().splitlines()[-1])
    assert single['processes'] == 1 and {k: single[k] for k in ('images', 'acc1', 'acc5', 'loss')} == \
        {k: one[k] for k in ('images', 'acc1', 'acc5', 'loss')}


def train_two_processes(cfg, output, args=()):
    """run_train_multi.sh with 2 CPU processes of 32 images; returns the output folder."""
    run_script('run_train_multi.sh', dict(NGPUS='2', DATASET='digits', CONFIG=cfg, BATCH_SIZE='32',
                                          OUTPUT=str(output)), cwd=output.parent, args=args)
    log = (output / 'log.txt').read_text()
    assert 'the 2 processes hold the same weights up to 0.0e+00' in log
    return output


@pytest.fixture(scope='module')
def two_processes(tiny, tmp_path_factory):
    return train_two_processes(tiny[0], tmp_path_factory.mktemp('two') / 'out')


def test_train_script_with_two_cpu_processes_matches_one_process(tiny, two_processes, tmp_path):
    """2 processes x 32 images follow 1 process x 64 images: the same global batches, the same
    (world-size scaled) learning rate, gradients averaged. Not bit for bit: in training mode
    BatchNorm normalises over each process's 32 images instead of 64."""
    cfg, _ = tiny
    one = main_single_gpu.main(['-cfg', cfg, '-batch_size', '64', '-output', str(tmp_path / 'one')])
    run_script('run_train_single.sh', dict(DATASET='digits', CONFIG=cfg, BATCH_SIZE='64',
                                           OUTPUT=str(tmp_path / 'single')), cwd=tmp_path)
    runs = [paddle.load(str(folder / 'last.pdparams')) for folder in (tmp_path / 'one', two_processes)]
    single = paddle.load(str(tmp_path / 'single' / 'last.pdparams'))
    for name, value in runs[0]['model'].items():  # the single-process script is that same run
        np.testing.assert_array_equal(np.asarray(single['model'][name]), np.asarray(value), err_msg=name)
    assert runs[0]['step'] == runs[1]['step'] == 1438 // 64
    assert runs[0]['lr_scheduler'] == runs[1]['lr_scheduler']
    paddle.seed(0)  # SEED: the initial weights of both runs
    start = build_xcit(get_config(cfg)).state_dict()
    trainable = [k for k, v in start.items() if not v.stop_gradient]
    # per tensor: |difference between the runs| relative to how far training moved the weights
    relative = {k: np.linalg.norm(np.asarray(runs[0]['model'][k]) - np.asarray(runs[1]['model'][k])) /
                np.linalg.norm(np.asarray(runs[0]['model'][k]) - start[k].numpy()) for k in trainable}
    worst = max(relative, key=relative.get)
    print(f'1 vs 2 processes: largest relative weight difference {relative[worst]:.3f} ({worst}), '
          f'median {np.median(list(relative.values())):.3f}')
    assert relative[worst] < 0.4 and np.median(list(relative.values())) < 0.15
    val = [json.loads(line) for line in (two_processes / 'metrics.jsonl').read_text().splitlines()][-1]
    assert val['kind'] == 'val' and abs(val['acc1'] - one['last_acc1']) < 5.0
    # TRAIN.SYNC_BN (the default, as the official training) cannot sync on the CPU, and says so
    assert "TRAIN.SYNC_BN has no effect on the CPU, where Paddle's SyncBatchNorm has no kernel" in \
        (two_processes / 'log.txt').read_text()
    assert 'TRAIN.SYNC_BN' not in (tmp_path / 'one' / 'log.txt').read_text()  # one process: nothing to sync


def test_grad_checkpointing_with_two_cpu_processes_trains_the_same_weights(tiny, two_processes, tmp_path):
    """With recomputed blocks the gradients are all-reduced after the backward pass instead of
    by DataParallel during it: the same weights, bit for bit."""
    output = train_two_processes(tiny[0], tmp_path / 'out', args=['-opts', 'TRAIN.GRAD_CHECKPOINTING', 'True'])
    runs = [paddle.load(str(folder / 'last.pdparams')) for folder in (two_processes, output)]
    for name, value in runs[0]['model'].items():
        np.testing.assert_array_equal(np.asarray(runs[1]['model'][name]), np.asarray(value), err_msg=name)


@pytest.fixture(scope='module')
def probes(tiny, tmp_path_factory):
    """Linear probes of the tiny model's weights (TRAIN.FREEZE_BACKBONE): the output folders of
    1 process x 64 images and 2 processes x 32 images."""
    cfg, weights = tiny
    root = tmp_path_factory.mktemp('probes')
    probe = ['-pretrained', weights, '-opts', 'TRAIN.FREEZE_BACKBONE', 'True']
    two = train_two_processes(cfg, root / 'two', args=probe)
    main_single_gpu.main(['-cfg', cfg, '-batch_size', '64', '-output', str(root / 'one'), *probe])
    return root / 'one', two


def test_frozen_backbone_with_two_cpu_processes_matches_one_process(tiny, probes):
    """A linear probe: the backbone, in eval mode, keeps its weights and statistics in every
    process, and with no BatchNorm in training mode 2 x 32 images train the head as 1 x 64 do
    (up to the order of the gradient sums)."""
    _, weights = tiny
    runs = [paddle.load(str(folder / 'last.pdparams'))['model'] for folder in probes]
    start = paddle.load(weights)
    for name, value in start.items():
        if name.startswith('head.'):
            moved = np.abs(np.asarray(runs[0][name]) - value.numpy()).max()
            assert moved > 1e-3 and np.abs(np.asarray(runs[1][name]) - np.asarray(runs[0][name])).max() < 1e-5 * moved
        else:
            for run in runs:
                np.testing.assert_array_equal(np.asarray(run[name]), value.numpy(), err_msg=name)


def test_two_processes_log_the_training_loss_and_accuracy_of_the_global_batch(probes):
    """The training records of 2 processes x 32 images give the loss and accuracy over both
    processes' images: those of 1 process x 64 images (the linear probes train alike)."""
    one, two = ([json.loads(line) for line in (folder / 'metrics.jsonl').read_text().splitlines()]
                for folder in probes)
    one, two = ([r for r in records if r['kind'] == 'train'] for records in (one, two))
    assert [r['step'] for r in one] == [r['step'] for r in two] == [10, 20, 22]
    for a, b in zip(one, two):
        assert b['loss'] == pytest.approx(a['loss'], rel=1e-5)
        assert (b['acc1'], b['acc5']) == pytest.approx((a['acc1'], a['acc5']), abs=1e-9)
    assert len({r['acc1'] for r in one}) > 1


@pytest.mark.parametrize('args,message', [
    (['-opts', 'TRAIN.NO_SUCH_KEY', '1'], 'error: -opts: unknown config key TRAIN.NO_SUCH_KEY'),
    (['-opts', 'TRAIN.NUM_EPOCHS', 'many'], 'error: -opts: TRAIN.NUM_EPOCHS must be int'),
    (['-dataset', 'imagefolder', '-data_path', 'no/such/folder'], 'error: DATA.DATA_PATH not found: no/such/folder'),
    (['-dataset', 'imagenet2012'], 'error: DATA.DATA_PATH is not set: give -data_path'),
    (['-eval', '-pretrained', 'no_such.pdparams'], 'error: checkpoint not found: no_such.pdparams'),
    (['-eval', '-pretrained', ROOT], f'error: {ROOT} is a folder, not a checkpoint file'),
    (['-output', os.path.join(ROOT, 'README.md')], f'error: -output {os.path.join(ROOT, "README.md")} is a file, not'),
    (['-output', os.path.join(ROOT, 'README.md', 'out')],
     f'error: -output {os.path.join(ROOT, "README.md", "out")}: cannot create or write to the folder'),
])
def test_bad_command_line_is_one_error_line(tiny, tmp_path, args, message):
    cfg, _ = tiny
    done = subprocess.run([sys.executable, os.path.join(ROOT, 'main_multi_gpu.py'), '-cfg', cfg, '-ngpus', '2',
                           '-output', str(tmp_path), *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1].startswith(message)
    assert 'Traceback' not in done.stderr
    assert 'starting 2 processes' not in done.stdout  # found out before any process starts


def test_an_error_in_one_process_is_its_error_line_and_one_summary(tiny, tmp_path):
    """An unreadable image in one process's share: its message is one whole line, then the summary."""
    cfg, weights = tiny
    data = tmp_path / 'data'
    (data / 'val').mkdir(parents=True)
    for i in range(8):
        Image.fromarray(np.full((32, 32, 3), 20 * i, dtype=np.uint8)).save(data / 'val' / f'{i}.png')
    (data / 'val' / '5.png').write_bytes(b'not an image')
    (data / 'val_list.txt').write_text(''.join(f'val/{i}.png {i}\n' for i in range(8)))
    done = subprocess.run([sys.executable, os.path.join(ROOT, 'main_multi_gpu.py'), '-cfg', cfg, '-ngpus', '2',
                           '-output', str(tmp_path / 'out'), '-eval', '-pretrained', weights, '-dataset',
                           'imagenet2012', '-data_path', str(data), '-batch_size_eval', '1'],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    reports = [line for line in done.stderr.splitlines() if 'error:' in line]
    assert re.fullmatch(r'\[rank [01]\] error: cannot read image .*5\.png.*', reports[0])
    assert reports[-1].startswith('error: a worker process failed: Process ') and len(reports) == 2
    assert 'Traceback' not in done.stderr


def test_a_single_process_started_by_paddle_launch_runs_in_place(tiny, tmp_path, monkeypatch):
    """``python -m paddle.distributed.launch --gpus 3 main_multi_gpu.py`` starts one process, with
    PADDLE_TRAINERS_NUM=1 and GPU 3 selected: it runs there; it used to start one process per
    visible GPU (2 on a CPU)."""
    cfg, weights = tiny
    monkeypatch.setenv('PADDLE_TRAINERS_NUM', '1')
    monkeypatch.setattr(launch, 'spawn', lambda *args, **kwargs: pytest.fail('started processes'))
    result = main_multi_gpu.main(['-cfg', cfg, '-eval', '-pretrained', weights, '-output', str(tmp_path)])
    assert result['processes'] == 1 and result['images'] == 359


def test_a_process_count_other_than_paddle_launchs_is_an_error(tiny, monkeypatch):
    """Under paddle.distributed.launch, which runs 4 processes, -ngpus 2 would be ignored:
    an error says so (-1, the default, and 4 are fine)."""
    cfg, weights = tiny
    monkeypatch.setenv('PADDLE_TRAINERS_NUM', '4')
    with pytest.raises(ConfigError, match=re.escape('NGPUS (-ngpus) asks for 2 processes, but '
                                                    'paddle.distributed.launch runs 4: leave it at -1')):
        main_multi_gpu.main(['-cfg', cfg, '-eval', '-pretrained', weights, '-ngpus', '2'])
    for count in (-1, 4):
        launch.check_launched_processes(count, 'NGPUS')


def test_process_count_of_ngpus():
    """-ngpus -1 starts one process per visible GPU, or 2 CPU processes without one; a positive
    count is taken as given unless it exceeds the visible GPUs; 0 and below -1 are errors."""
    assert launch.num_processes(-1, 4, 'NGPUS') == 4
    assert launch.num_processes(-1, 0, 'NGPUS') == launch.CPU_PROCESSES == 2
    assert launch.num_processes(3, 0, 'NGPUS') == 3 and launch.num_processes(2, 4, 'NGPUS') == 2
    with pytest.raises(ConfigError, match='NGPUS asks for 5 processes but only 4 GPUs are visible'):
        launch.num_processes(5, 4, 'NGPUS')
    for bad in (0, -2):
        with pytest.raises(ConfigError, match=f'NGPUS must be -1 or positive, got {bad}'):
            launch.num_processes(bad, 4, 'NGPUS')


def test_one_process_asked_for_runs_in_place(tiny, tmp_path, monkeypatch):
    """-ngpus 1 starts no process: the run is this one, and main returns its summary."""
    cfg, weights = tiny
    monkeypatch.setattr(launch, 'spawn', lambda *args, **kwargs: pytest.fail('started processes'))
    result = main_multi_gpu.main(['-ngpus', '1', '-cfg', cfg, '-eval', '-pretrained', weights, '-output',
                                  str(tmp_path)])
    assert result['processes'] == 1 and result['images'] == 359


def test_the_runs_config_serves_a_single_process_evaluation(two_processes, tmp_path):
    """config.yaml of a 2-process run leaves out its process count (and its weights): it is the
    -cfg of a one-process evaluation of what it trained."""
    written = get_config(str(two_processes / 'config.yaml'))
    assert (written.NGPUS, written.MODEL.PRETRAINED, written.EVAL) == (-1, '', False)
    result = main_single_gpu.main(['-cfg', str(two_processes / 'config.yaml'), '-eval', '-pretrained',
                                   str(two_processes / 'last.pdparams'), '-output', str(tmp_path)])
    assert result['images'] == 359


SLEEPING_WORKERS = """\
import os, sys, time
sys.path.insert(0, {root!r})
import launch


def worker(folder):
    with open(os.path.join(folder, str(os.getpid())), 'w'):
        pass
    time.sleep(300)


if __name__ == '__main__':
    launch.spawn(worker, (sys.argv[1],), 2, on_gpus=False)
"""


LARGE_RESULT = """\
import sys
sys.path.insert(0, {root!r})
import launch


def job():
    return 'x' * 1_000_000


if __name__ == '__main__':
    launch.spawn(job, (), 2, on_gpus=False)
    print('done', flush=True)
"""


def test_a_large_result_of_started_processes_does_not_keep_them_waiting(tmp_path):
    """Paddle sends a started process's result back through a pipe that nothing read: one larger
    than the pipe's buffer (e.g. a summary with many figures) kept the process, and so the run,
    waiting for ever."""
    script = tmp_path / 'large.py'
    script.write_text(LARGE_RESULT.format(root=ROOT))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == 'done'


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='reads /proc')
@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGKILL, signal.SIGINT])
def test_started_processes_end_when_the_parent_is_killed(tmp_path, signum):
    """A job scheduler stopping main_multi_gpu.py (SIGTERM, or SIGKILL) stops its workers too: they
    used to go on training, writing to the output folder beside the relaunched run. SIGINT to the
    parent alone (not to its process group, as Ctrl-C) is passed on to them; the parent used to
    wait for them to finish."""
    script = tmp_path / 'sleepers.py'
    script.write_text(SLEEPING_WORKERS.format(root=ROOT))
    pids = tmp_path / 'pids'
    pids.mkdir()
    parent = subprocess.Popen([sys.executable, str(script), str(pids)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE)
    workers = []
    try:
        assert wait_for(lambda: len(os.listdir(pids)) == 2, 120), parent.stderr.read() if parent.poll() else ''
        workers = [int(name) for name in os.listdir(pids)]
        parent.send_signal(signum)
        parent.wait(timeout=30)
        assert wait_for(lambda: not any(map(running, workers)), 10)
    finally:
        for pid in workers:
            if running(pid):
                os.kill(pid, signal.SIGKILL)
        if parent.poll() is None:
            parent.kill()
        parent.stderr.close()
