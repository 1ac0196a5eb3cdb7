"""Training and evaluation engine shared by ``main_single_gpu.py`` and ``main_multi_gpu.py``.

Every process (rank) runs ``run(config)``: with ``config.EVAL`` it evaluates the weights of
``-pretrained`` (or ``-resume``) on the validation split, otherwise it trains with the official
XCiT/DeiT recipe (AdamW, warmup + cosine per step, label smoothing, mixup/cutmix, repeated
augmentation, EMA, optional distillation, gradient accumulation, gradient checkpointing, AMP on
GPU).

Exactness guarantees:

* evaluation counts every image once: each rank sums correct@1, correct@5, loss and image count
  over its disjoint shard and the sums are all-reduced, so 1 and N processes agree;
* training resumes exactly: the data stream is a function of (SEED, epoch, index), mixup draws
  from ``default_rng([SEED, rank, epoch, batch index])`` and Paddle's generator (drop path, dropout) is
  reseeded with ``SEED + rank + 1000 * epoch`` at every epoch, so a checkpoint taken at the end
  of an epoch (weights, EMA, optimizer, schedule, loss scaler) is all the state there is.

Outputs in ``config.SAVE``: ``log.txt``, ``metrics.jsonl`` (one JSON record per report/eval),
``config.yaml``, ``last.pdparams``, ``best.pdparams``, ``epoch_N.pdparams`` every SAVE_FREQ
epochs, ``run.lock`` (locked by a run's first process, training or evaluating, while it runs), and
``eval_summary.json`` for ``-eval``.
"""
import argparse
import contextlib
import math
import os
import sys
import time

import numpy as np
import paddle
import paddle.nn as nn
from paddle.distributed.fleet.utils.hybrid_parallel_util import fused_allreduce_gradients

from config import ConfigError, changed_settings, get_config, settings_without_effect, update_config
from datasets import DataError, build_dataloader, build_dataset, check_data_path, ignored_data_path
from ema import ModelEma
from export_model import TOLERANCE, in_memory_predictor
from losses import build_criterion
from mixup import build_mixup
from optim import build_lr_scheduler, build_optimizer, schedule_warnings
from port_weights.convert import check_fits, state_shapes
from teacher import build_teacher
from utils import (AverageMeter, CheckpointError, MetricsLog, OutputWriteError, all_reduce_max, all_reduce_sum,
                   average_batchnorm_statistics, check_checkpoint_file, check_output_folder, format_seconds, get_rank,
                   get_world_size, in_model_dtypes, load_checkpoint, load_every_weight, lock_folder,
                   remove_partial_checkpoints, save_checkpoint, setup_logger, to_json, visible_gpus, weights_of,
                   write_config, write_json)
from xcit import build_xcit

VERDICTS = ('passed', 'unavailable', 'different logits', 'not faster')  # of the predictor's check in -eval
HEAD_KEYS = ('head.weight', 'head.bias')
AUTO_RESUME = 'auto'  # -resume auto: continue from <SAVE>/last.pdparams when it exists
RUN_CHECKPOINTS = ('last.pdparams', 'best.pdparams')  # what a fresh run would overwrite


class TrainingDiverged(RuntimeError):
    """The training loss, or a weight, became NaN or infinite."""


USER_ERRORS = (ConfigError, DataError, CheckpointError, TrainingDiverged, OutputWriteError)


# ---------------------------------------------------------------- command line


def build_arg_parser(multi_process=False):
    """The command line of both entry points (``-ngpus`` only for the multi-process one)."""
    parser = argparse.ArgumentParser(
        description=('Train or evaluate XCiT with ' +
                     ('several processes (GPUs, or CPU processes with gloo).' if multi_process
                      else 'one process (a GPU if there is one, else the CPU).')))
    add = parser.add_argument
    add('-cfg', type=str, default=None, help='YAML config file')
    add('-dataset', type=str, default=None,
        help='imagenet2012, imagefolder, cifar10, cifar100 or digits (DATA.DATASET)')
    add('-data_path', type=str, default=None, help='dataset folder (DATA.DATA_PATH)')
    add('-batch_size', type=int, default=None,
        help='training batch per process (DATA.BATCH_SIZE); with -eval and no -batch_size_eval, '
             'the evaluation batch')
    add('-batch_size_eval', type=int, default=None, help='evaluation batch per process (DATA.BATCH_SIZE_EVAL)')
    add('-image_size', type=int, default=None, help='input side in pixels (DATA.IMAGE_SIZE)')
    add('-pretrained', type=str, default=None,
        help='weights to fine-tune from or to evaluate: a converted .pdparams or a training checkpoint')
    add('-resume', type=str, default=None,
        help="training checkpoint to continue from (weights, EMA, optimizer, schedule, epoch); 'auto': "
             "the output folder's last.pdparams if there is one, else start afresh (or from -pretrained)")
    add('-output', type=str, default=None, help='output folder (SAVE, default ./output)')
    add('-eval', action='store_true', help='evaluate only')
    add('-ema', action='store_true',
        help="use the checkpoint's EMA weights ('model_ema') for -pretrained, or with -eval for -resume")
    add('-amp', action='store_true', help='float16 mixed precision on GPU; no effect on CPU')
    if multi_process:
        add('-ngpus', type=int, default=None,
            help='number of processes (NGPUS): -1 = every visible GPU, or 2 on CPU')
    add('-opts', nargs='+', action='extend', default=None, metavar='KEY VALUE',
        help='config overrides, e.g. -opts TRAIN.NUM_EPOCHS 10 MODEL.DROPPATH 0.1 (may be repeated)')
    return parser


def parse_config(argv=None, multi_process=False):
    """Parses ``argv`` (default ``sys.argv[1:]``) into a frozen config."""
    parser = build_arg_parser(multi_process)
    args = parser.parse_args(argv)
    config = update_config(get_config(), args)
    if not multi_process and config.NGPUS not in (-1, 1):
        raise ConfigError(f'NGPUS {config.NGPUS}: main_single_gpu.py runs one process; main_multi_gpu.py runs several')
    if config.EVAL and args.batch_size:  # the evaluation batch, and -opts still has the last word
        if args.batch_size_eval:
            parser.error('-batch_size and -batch_size_eval both set the evaluation batch with -eval: give one')
        args.batch_size_eval, args.batch_size = args.batch_size, None
        config = update_config(get_config(), args)
    return config


def exit_on_user_error(fn, *args):
    """Calls ``fn(*args)``; bad input (config, data, checkpoint) or a diverged run ends the
    process with one ``error: ...`` line on stderr and exit status 1 instead of a traceback."""
    try:
        return fn(*args)
    except USER_ERRORS as e:
        where = f'[rank {get_rank()}] ' if get_world_size() > 1 else ''
        sys.stderr.write(f'{where}error: {e}\n')  # one write: the lines of several processes stay whole
        sys.stderr.flush()
        sys.exit(1)


def check_inputs(config):
    """Raises ``ConfigError`` for combinations of -pretrained, -resume, -ema and -eval that
    would leave one of them without effect, an output folder that cannot be written to or a
    training run that would overwrite another run's checkpoints, and ``DataError`` /
    ``CheckpointError`` for a data folder or weights file that does not exist: checks cheap
    enough to make before any process starts or any model is built. Creates the output folder."""
    pretrained, resume = config.MODEL.PRETRAINED, config.MODEL.RESUME
    auto = resume == AUTO_RESUME
    if pretrained and resume and not auto:
        raise ConfigError('-pretrained and -resume exclude each other: -resume restores the weights '
                          '(and when training the optimizer, schedule and epoch) from its checkpoint')
    if config.MODEL.NUM_CLASSES == 0:
        raise ConfigError('MODEL.NUM_CLASSES is 0: the model is a backbone without a classifier head, whose '
                          'features cannot be trained or evaluated against labels; give the number of classes '
                          '(-opts MODEL.NUM_CLASSES N) to train a head on it (a linear probe with '
                          'TRAIN.FREEZE_BACKBONE True), or evaluate its features with eval_knn.py')
    if config.EVAL and auto:
        raise ConfigError('-resume auto continues a training run; to evaluate a checkpoint give its path')
    if config.EVAL and not (pretrained or resume):
        raise ConfigError('-eval needs weights to evaluate: give -pretrained (a converted .pdparams '
                          'or a training checkpoint) or -resume')
    if config.EMA_EVAL and not pretrained and not (config.EVAL and resume):
        raise ConfigError('-ema selects the EMA weights of the -pretrained checkpoint (with -eval also of '
                          '-resume); when training, -resume restores both the model and its EMA')
    resume_folder = os.path.dirname(resume) or '.'
    continues_here = auto or (resume and os.path.realpath(resume_folder) == os.path.realpath(config.SAVE))
    if not config.EVAL and not continues_here:
        check_output_is_free(config.SAVE)  # a fresh run, or one continued from a checkpoint elsewhere
    if not config.EVAL and continues_here and not auto:
        check_continues_the_latest(resume, config.SAVE)
    if not config.EVAL and auto and not resume_path(config):
        check_fresh_start_keeps_checkpoints(config.SAVE)
    check_data_path(config)
    for path in (pretrained, '' if auto else resume):
        if path:
            check_checkpoint_file(path)
    check_output_folder(config.SAVE)


def check_output_is_free(folder):
    """Raises ``ConfigError`` if ``folder`` holds the checkpoints of a training run, which a
    fresh run (or one continued from a checkpoint elsewhere) would overwrite after its first epoch."""
    for name in RUN_CHECKPOINTS:
        path = os.path.join(folder, name)
        if os.path.exists(path):
            raise ConfigError(f'{path} exists: the output folder holds another training run. Continue it '
                              f'with -resume auto (or -resume {path}), or give another -output to start afresh')


def check_continues_the_latest(resume, folder):
    """Raises ``ConfigError`` when ``resume``, a checkpoint in the output folder ``folder``, is not
    its ``last.pdparams``: continuing from another one there would overwrite the run's latest
    checkpoint (and best.pdparams, and its records)."""
    last = os.path.join(folder, 'last.pdparams')
    if os.path.isfile(last) and os.path.isfile(resume) and not os.path.samefile(resume, last):
        raise ConfigError(f'-resume {resume}: {folder} holds the run\'s latest checkpoint {last}, which continuing '
                          f'from {os.path.basename(resume)} there would overwrite, with best.pdparams and '
                          f'metrics.jsonl; continue from last.pdparams (-resume auto), or give another -output')


def check_fresh_start_keeps_checkpoints(folder):
    """Raises ``ConfigError`` when ``-resume auto`` finds no last.pdparams to continue in ``folder``
    but finds the run's best.pdparams, which starting afresh there would overwrite (with
    metrics.jsonl)."""
    best = os.path.join(folder, 'best.pdparams')
    if os.path.exists(best):
        raise ConfigError(f'-resume auto: {folder} holds {best} but no last.pdparams to continue from; '
                          f'starting afresh there would overwrite it. Continue from a checkpoint of the run '
                          f'with -resume PATH and another -output, or give another -output to start afresh')


def resume_path(config):
    """The checkpoint a training run continues from, or '' for a fresh start: -resume's path,
    or for ``-resume auto`` the output folder's last.pdparams when there is one."""
    if config.MODEL.RESUME != AUTO_RESUME:
        return config.MODEL.RESUME
    last = os.path.join(config.SAVE, 'last.pdparams')
    return last if os.path.isfile(last) else ''


# ---------------------------------------------------------------- set-up


def setup_device():
    """Selects and returns 'gpu:<id>' when Paddle has CUDA and sees a GPU, else 'cpu'."""
    if visible_gpus():
        device = f'gpu:{paddle.distributed.ParallelEnv().device_id}'
    else:
        device = 'cpu'
    paddle.set_device(device)
    return device


def autocast(enabled):
    """float16 autocast at level O1 with Paddle's own operator lists, or nothing.

    As with torch's autocast in the official code, the GEMMs ('matmul_v2': linear layers and
    attention products) and the stem's convolutions run in float16, softmax, LayerNorm, sums and
    rsqrt in float32, and other operators in their inputs' type (float32 if any input is). Off
    the CPU the model uses these standard operators (``xcit._eager_on_cpu``), computes XCA's
    norms in float32 and multiplies normalised q and k, whose product cannot overflow float16."""
    if not enabled:
        return contextlib.nullcontext()
    return paddle.amp.auto_cast(enable=True, level='O1', dtype='float16')


def update_loss_scale(scaler):
    """``scaler.update()``: ``paddle.amp.GradScaler``'s dynamic loss scaling after a step.

    When it lowers the scale after a step with an infinite gradient, Paddle 3.x prints the scale
    with ``float()`` of its (1,) tensor, which NumPy 2.4 refuses ("only 0-dimensional arrays can
    be converted to Python scalars"); during the call ``float()`` of a one-element tensor takes
    its element, as with older NumPy."""
    as_float = paddle.Tensor.__float__
    paddle.Tensor.__float__ = lambda t: float(t.numpy().reshape([-1])[0]) if t.size == 1 else as_float(t)
    try:
        scaler.update()
    finally:
        paddle.Tensor.__float__ = as_float


def load_pretrained(model, path, use_ema, logger):
    """Loads ``-pretrained`` weights from ``path`` (see ``weights_of``) into ``model`` to train from.

    A classifier head whose class count differs is dropped and stays freshly initialised, as does
    the head of a model loaded from a backbone without one (e.g. self-supervised DINO weights).
    Every other weight must fit: a missing, unexpected or differently shaped entry raises
    ``CheckpointError`` with a table of them (a training run must not start from weights that
    were silently left as initialised).
    """
    state = dict(weights_of(load_checkpoint(path), path, use_ema))
    expected = state_shapes(model.state_dict())
    new_head = [k for k in HEAD_KEYS if k in state and k in expected and tuple(state[k].shape) != expected[k]]
    if new_head:
        logger.info(f'{path}: dropping the classifier head ({state["head.weight"].shape[-1]} classes) '
                    f'for a new one with {model.num_classes} classes, freshly initialised')
        for key in new_head:
            del state[key]
    elif not any(k in state for k in HEAD_KEYS) and all(k in expected for k in HEAD_KEYS):
        new_head = list(HEAD_KEYS)
        logger.info(f'{path}: a backbone without classifier head; the model\'s head '
                    f'({model.num_classes} classes) starts freshly initialised')
    check_fits(state, {k: v for k, v in expected.items() if k not in new_head},
               f'{path} does not fit the model (only a classifier head of another size, or none, is replaced)')
    own = model.state_dict()
    state.update({key: own[key] for key in new_head})  # kept as initialised (and not "skipped" by Paddle)
    model.set_state_dict(in_model_dtypes(state, own))
    logger.info(f'loaded {"EMA " if use_ema else ""}weights from {path}')


# ---------------------------------------------------------------- metrics


def classification_sums(logits, labels):
    """Float64 [correct@1, correct@5, summed cross-entropy, count] of one batch.

    ``logits`` (B, C) and ``labels`` (B,) are numpy arrays. A label counts as within top-k when
    its rank is below k: the number of classes with a larger logit, or an equal one and a smaller
    index (ties go to the first class, as with argmax). A row with a NaN or infinite logit is
    never correct. The loss is computed in float64.
    """
    logits = logits.astype(np.float64)
    labels = labels.reshape(-1, 1)
    true = np.take_along_axis(logits, labels, axis=1)
    earlier = np.arange(logits.shape[1]) < labels
    rank = (logits > true).sum(axis=1) + ((logits == true) & earlier).sum(axis=1)
    rank[~np.isfinite(logits).all(axis=1)] = logits.shape[1]
    peak = logits.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(logits - peak).sum(axis=1)) + peak[:, 0]
    return np.array([(rank < 1).sum(), (rank < 5).sum(), (log_norm - true[:, 0]).sum(), len(labels)],
                    dtype=np.float64)


def summarise(sums):
    """{'acc1', 'acc5' (percent), 'loss' (mean), 'images'} from summed ``classification_sums``."""
    n = max(sums[3], 1.0)
    return {'acc1': 100.0 * sums[0] / n, 'acc5': 100.0 * sums[1] / n, 'loss': sums[2] / n,
            'images': int(sums[3])}


# ---------------------------------------------------------------- evaluation


def cpu_threads():
    """Math-library threads for one process: ``OMP_NUM_THREADS`` when set, else the CPUs shared
    evenly between the processes."""
    threads = os.environ.get('OMP_NUM_THREADS', '')
    if threads.isdigit() and int(threads) > 0:
        return int(threads)
    return max(1, (os.cpu_count() or 1) // get_world_size())


def inference_forward(model, image_size):
    """``model``'s current weights run by ``paddle.inference`` with oneDNN
    (``export_model.in_memory_predictor``, input [N, 3, image_size, image_size]): a function
    images (N, 3, S, S) tensor -> logits tensor."""
    predictor = in_memory_predictor(model, image_size, threads=cpu_threads())
    return lambda images: paddle.to_tensor(predictor(images.numpy()))


class EvalForward:
    """The forward pass of one evaluation: ``model`` in dygraph or, on CPU, the model exported
    to a Paddle Inference predictor (oneDNN kernels, several times faster than eager Paddle on
    large batches) when that gives the same outputs (logits, or features of a model without
    head) faster.

    The choice is made once, on the first batch: the predictor must build, run, match dygraph
    within ``TOLERANCE`` and take less time than dygraph on that batch (both timed on a
    second call, after warm-up); otherwise evaluation stays in dygraph and the reason is logged.
    With several processes the predictor is used only if it passed in every one, so that all
    take the same path. When a process has a single batch, exporting cannot pay off (the check
    alone runs that batch in dygraph), so dygraph is chosen directly. The predictor holds the
    weights of the moment it was built, so only ``-eval`` tries it; validation during training
    stays in dygraph. ``path`` names the choice: 'inference' or 'dygraph'.
    """

    def __init__(self, model, image_size, try_inference):
        self.model = model
        self.image_size = image_size
        self.try_inference = try_inference
        self.compiled = None  # built by choose(), unless given
        self.path = None

    def worth_trying_inference(self, num_batches):
        """Whether ``choose`` should try the predictor: it may, no path is chosen yet, and every
        process has two batches or more (``num_batches``: this process's). With several processes
        a collective call that all of them make before their first batch (the condition on
        ``try_inference`` and ``path`` is the same in all of them, so either all call it or none)."""
        return self.try_inference and self.path is None and not all_reduce_sum([num_batches < 2])[0]

    def choose(self, images, several_batches, logger):
        """Sets ``path`` by trying the predictor on ``images``, a process's first batch.

        ``several_batches``: ``worth_trying_inference``'s answer. With several processes this
        is a collective call: each process calls it on its first batch when ``several_batches``.
        """
        self.path = 'dygraph'
        if not self.try_inference:
            return
        if not several_batches:
            logger.info('a process has a single batch: evaluating in dygraph (an exported model cannot pay off)')
            return
        verdict = self._inference_verdict(images, logger)
        passed = verdict == 'passed'
        world_size = get_world_size()
        if world_size > 1:
            counts = dict(zip(VERDICTS, all_reduce_sum([verdict == v for v in VERDICTS]).astype(int)))
            if passed and counts['passed'] < world_size:
                reasons = ', '.join(f'{v}: {n}' for v, n in counts.items() if v != 'passed' and n)
                logger.info(f'paddle.inference did not pass in {world_size - counts["passed"]} of {world_size} '
                            f'processes ({reasons}); evaluating in dygraph in all of them')
            passed = counts['passed'] == world_size
        if passed:
            logger.info('evaluating with paddle.inference')
            self.path = 'inference'

    def _inference_verdict(self, images, logger):
        """One of ``VERDICTS``: whether the predictor (built now unless given) runs ``images``,
        matches dygraph and is faster on them; logs why not."""
        try:
            if self.compiled is None:
                self.compiled = inference_forward(self.model, self.image_size)
            fast = self.compiled(images)
        except Exception as e:  # any failure to export or run means: use dygraph
            reason = ' '.join(str(e).split())[:300]
            logger.warning(f'paddle.inference unavailable ({type(e).__name__}: {reason}); evaluating in dygraph')
            return 'unavailable'
        diff = float((fast - self.model(images)).abs().max())
        if not diff <= TOLERANCE:
            logger.warning(f'paddle.inference outputs differ from dygraph by {diff:.2e} (> {TOLERANCE}) '
                           f'on the first batch; evaluating in dygraph')
            return 'different logits'
        seconds = {}
        for name, forward in (('dygraph', self.model), ('inference', self.compiled)):
            start = time.perf_counter()
            float(forward(images).sum())  # waits for the result
            seconds[name] = time.perf_counter() - start
        timing = f'{seconds["inference"]:.3f} s vs {seconds["dygraph"]:.3f} s in dygraph on the first batch'
        if seconds['inference'] >= seconds['dygraph']:
            logger.info(f'paddle.inference matches dygraph (max abs output diff {diff:.1e}) but is not faster '
                        f'({timing}); evaluating in dygraph')
            return 'not faster'
        logger.info(f'paddle.inference matches dygraph (max abs output diff {diff:.1e}) and is faster ({timing})')
        return 'passed'

    def __call__(self, images):
        return self.compiled(images) if self.path == 'inference' else self.model(images)


def log_progress(logger, what, batches_done, num_batches, images_done, start, batches_timed=None):
    """Logs '<what>: batch i/n, images/s, ETA' of a pass over a loader: ``images_done`` in the
    ``batches_timed`` batches (default ``batches_done``) since time ``start``."""
    elapsed = time.time() - start
    per_batch = elapsed / (batches_timed or batches_done)
    logger.info(f'{what}: batch {batches_done}/{num_batches}, {images_done / elapsed:.1f} images/s, '
                f'ETA {format_seconds(per_batch * (num_batches - batches_done))}')


@paddle.no_grad()
def evaluate(forward, loader, logger, use_amp=False, report_freq=50, name='model'):
    """Top-1 / top-5 accuracy (%) and mean cross-entropy of ``forward.model`` on ``loader``'s dataset.

    ``forward`` is an ``EvalForward``. Each process evaluates its shard; the sums of
    ``classification_sums`` are all-reduced, so every image counts exactly once whatever the
    number of processes. Returns dict: acc1, acc5, loss, images, seconds (wall time),
    images_per_sec (all processes; from the second batch on, so that compiling and checking on
    the first batch do not count, unless there is only one batch) and path ('inference',
    'dygraph' or 'dygraph-amp').
    """
    forward.model.eval()
    sums = np.zeros(4)
    num_batches, world_size = len(loader), get_world_size()
    several_batches = forward.worth_trying_inference(num_batches)
    start = time.time()
    steady_start, steady_images = start, 0
    for i, (images, labels) in enumerate(loader):
        if forward.path is None:
            forward.choose(images, several_batches, logger)
        with autocast(use_amp):
            logits = forward(images)
        sums += classification_sums(logits.astype('float32').numpy(), labels.numpy())
        if i == 0:
            steady_start = time.time()
        else:
            steady_images += labels.shape[0]
        if (i + 1) % report_freq == 0 or i + 1 == num_batches:  # timed as the summary's images/s
            if i == 0:
                log_progress(logger, f'eval {name}', 1, num_batches, sums[3] * world_size, start)
            else:
                log_progress(logger, f'eval {name}', i + 1, num_batches, steady_images * world_size, steady_start, i)
    # the processes run side by side: their images over the slowest one's time (a process with
    # one batch has no steady part and adds no images and no time)
    (steady_seconds,) = all_reduce_max([time.time() - steady_start if steady_images else 0.0])
    sums, (steady_images,) = all_reduce_sum(sums), all_reduce_sum([steady_images])
    seconds = time.time() - start
    rate = steady_images / steady_seconds if steady_images else sums[3] / seconds
    # a process without images reports the others' path: dygraph, as none of them tried the predictor
    chosen = forward.path or ('dygraph' if sums[3] else None)
    path = chosen + ('-amp' if use_amp else '') if chosen else 'none (no images)'
    return {**summarise(sums), 'images_per_sec': rate, 'seconds': seconds, 'path': path}


def run_evaluation(config, device, use_amp, logger):
    """``-eval``: evaluates the -pretrained (or -resume) weights; returns the summary dict, which
    also goes to ``<SAVE>/eval_summary.json`` and is printed as the last line (JSON)."""
    source = config.MODEL.PRETRAINED or config.MODEL.RESUME
    rank, world_size = get_rank(), get_world_size()
    dataset = build_dataset(config, 'val')
    if hasattr(dataset, 'label_source'):  # an image folder
        logger.info(f'{len(dataset)} images of {len(dataset.classes)} classes, labelled in the order of '
                    f'{dataset.label_source}')
    loader = build_dataloader(config, dataset, 'val', rank, world_size)
    model = build_xcit(config)
    load_every_weight(model, source, f'the {config.MODEL.NAME} model of the config', config.EMA_EVAL)
    logger.info(f'loaded {"EMA " if config.EMA_EVAL else ""}weights from {source}')
    forward = EvalForward(model, config.DATA.IMAGE_SIZE, try_inference=device == 'cpu')
    stats = evaluate(forward, loader, logger, use_amp, config.REPORT_FREQ)
    summary = {'acc1': round(stats['acc1'], 4), 'acc5': round(stats['acc5'], 4), 'loss': round(stats['loss'], 6),
               'images': stats['images'], 'images_per_sec': round(stats['images_per_sec'], 1),
               'seconds': round(stats['seconds'], 2), 'path': stats['path'], 'device': device,
               'processes': world_size, 'weights': source, 'ema': config.EMA_EVAL,
               'dataset': config.DATA.DATASET, 'model': config.MODEL.NAME}
    if rank == 0:
        write_json(os.path.join(config.SAVE, 'eval_summary.json'), summary)
        logger.info(f'Acc@1 {summary["acc1"]:.2f}%  Acc@5 {summary["acc5"]:.2f}%  loss {summary["loss"]:.4f}  '
                    f'on {summary["images"]} images, {summary["images_per_sec"]} images/s '
                    f'({stats["path"]} on {device}, {world_size} process{"es" if world_size > 1 else ""})')
        print(to_json(summary), flush=True)
    return summary


# ---------------------------------------------------------------- training


def rename_prefixes(state, names):
    """Returns ``state`` with each key ``p + '_' + rest`` renamed ``names[p] + '_' + rest``
    (longest matching ``p``); other keys are kept."""
    renamed = {}
    for key, value in state.items():
        owners = [p for p in names if key.startswith(p + '_')]
        owner = max(owners, key=len) if owners else None
        renamed[names[owner] + key[len(owner):] if owner else key] = value
    return renamed


def _check_finite_weights(model, epoch):
    for name, value in model.state_dict().items():
        if paddle.is_floating_point(value) and not bool(paddle.isfinite(value).all()):
            raise TrainingDiverged(f'weight {name} became NaN or infinite during epoch {epoch}; '
                                   f'stopping without saving (the last checkpoint is kept)')


def _no_sync(model, sync):
    """Skips DataParallel's gradient all-reduce (accumulation steps that do not update, or
    gradients that are all-reduced after the backward pass instead)."""
    if not sync and isinstance(model, paddle.DataParallel):
        return model.no_sync()
    return contextlib.nullcontext()


class Trainer:
    """Holds the training state of one process and runs the epochs (``fit``)."""

    def __init__(self, config, device, use_amp, logger):
        self.config, self.device, self.use_amp, self.logger = config, device, use_amp, logger
        self.rank, self.world_size = get_rank(), get_world_size()
        train = config.TRAIN
        paddle.seed(config.SEED)  # the same initial weights on every rank
        model = build_xcit(config)
        if train.GRAD_CHECKPOINTING:
            model.set_grad_checkpointing()
            logger.info('gradient checkpointing: the XCA blocks recompute their activations in the backward pass')
        resume = resume_path(config)
        if config.MODEL.PRETRAINED and not resume:
            load_pretrained(model, config.MODEL.PRETRAINED, config.EMA_EVAL, logger)
        if train.FREEZE_BACKBONE:
            model.freeze_backbone()
            trained = sum(int(np.prod(p.shape)) for p in model.parameters() if not p.stop_gradient)
            logger.info(f'frozen backbone: the head alone trains ({trained:,} parameters); the rest keeps its '
                        f'weights and BatchNorm statistics')
            if not (config.MODEL.PRETRAINED or resume):
                logger.warning('TRAIN.FREEZE_BACKBONE without -pretrained: the head learns on the features of '
                               'a randomly initialised model')
        for message in settings_without_effect(config):
            logger.warning(message)
        if train.SYNC_BN and self.world_size > 1:  # one process: its batch is the whole batch
            if device.startswith('gpu'):
                model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
            else:
                logger.info("TRAIN.SYNC_BN has no effect on the CPU, where Paddle's SyncBatchNorm has no kernel: "
                            "each process normalises by its own batch, and the running statistics are averaged "
                            "over the processes after every epoch")
        paddle.seed(config.SEED + self.rank)
        np.random.seed(config.SEED + self.rank)
        self.model = model
        self.model_ema = ModelEma(model, train.MODEL_EMA_DECAY) if train.MODEL_EMA else None
        teacher = build_teacher(config) if train.DISTILLATION_TYPE != 'none' else None
        self.criterion = build_criterion(config, teacher)
        self.mixup = build_mixup(config)

        self.train_set = build_dataset(config, 'train')
        if self.train_set.num_classes != config.MODEL.NUM_CLASSES:
            logger.warning(f'the training set has {self.train_set.num_classes} classes, the model '
                           f'MODEL.NUM_CLASSES={config.MODEL.NUM_CLASSES} outputs')
        self.train_loader = build_dataloader(config, self.train_set, 'train', self.rank, self.world_size)
        self.val_loader = build_dataloader(config, build_dataset(config, 'val'), 'val', self.rank, self.world_size)
        self.steps_per_epoch = len(self.train_loader) // train.ACCUM_ITER
        if self.steps_per_epoch == 0:
            raise ConfigError(f'TRAIN.ACCUM_ITER={train.ACCUM_ITER} exceeds the {len(self.train_loader)} '
                              f'batches of an epoch')
        self.lr_scheduler = build_lr_scheduler(config, self.steps_per_epoch, self.world_size)
        for message in schedule_warnings(config, self.world_size):
            logger.warning(message)
        self.optimizer = build_optimizer(config, model, self.lr_scheduler)
        self.scaler = paddle.amp.GradScaler(init_loss_scaling=2.0 ** 16) if use_amp else None
        self.epoch, self.step = 0, 0  # completed epochs, optimizer steps
        self.best_acc, self.best_epoch = None, None
        self.best_file = None  # where best.pdparams of best_epoch was written
        self.unvalidated = False  # the last epoch's validation is due but has not run yet
        self.resumed_optimizer_state = {}  # see optimizer_state
        self.metrics = MetricsLog(config.SAVE, enabled=self.rank == 0)
        if resume:
            self.resume(resume)
            if os.path.samefile(os.path.dirname(os.path.abspath(resume)), config.SAVE):
                self.metrics.keep_epochs_up_to(self.epoch, validated=not self.unvalidated)
            else:  # the records of the epochs before are in the checkpoint's folder
                self.metrics.start_afresh()
            if config.MODEL.PRETRAINED:
                logger.info(f'-pretrained {config.MODEL.PRETRAINED} not loaded: the run continues from {resume}')
        else:
            if config.MODEL.RESUME == AUTO_RESUME:
                logger.info(f'-resume auto: no checkpoint in {config.SAVE} yet, starting afresh')
            self.metrics.start_afresh()
        self.train_model = paddle.DataParallel(model) if self.world_size > 1 else model
        # DataParallel's all-reduce during the backward pass cannot follow the blocks recomputed
        # in it; with gradient checkpointing the gradients are all-reduced after it instead
        self.reduce_after_backward = self.world_size > 1 and train.GRAD_CHECKPOINTING
        models = {'model': model, 'ema': self.model_ema.module if self.model_ema else None}
        # validation in dygraph: its metrics must not depend on which path a timing picked (a
        # resumed run logs exactly what the uninterrupted one did)
        self.eval_forwards = {name: EvalForward(m, config.DATA.IMAGE_SIZE, try_inference=False)
                              for name, m in models.items() if m is not None}

    # ---- checkpoints

    def state_dict(self):
        """Everything needed to continue training; optimizer keys use structured parameter names."""
        state = {'model': self.model.state_dict(),
                 'optimizer': self.optimizer_state(),
                 'lr_scheduler': self.lr_scheduler.state_dict(),
                 'epoch': self.epoch, 'step': self.step,
                 'best_acc': self.best_acc, 'best_epoch': self.best_epoch, 'unvalidated': self.unvalidated,
                 # relative to the checkpoint's folder, which can then move with its run
                 'best_file': self.best_file and os.path.relpath(self.best_file, self.config.SAVE),
                 'config': self.config.dump()}
        if self.model_ema:
            state['model_ema'] = self.model_ema.state_dict()
        if self.scaler:
            state['scaler'] = self.scaler.state_dict()
        return state

    def optimizer_state(self):
        """The optimizer's state dict, keyed by structured parameter names. Paddle 2.6's optimizer
        keeps the moments it is given aside until its first step, and leaves them out of its state
        dict: until it holds them all, those of the checkpoint resumed from stand in."""
        names = {p.name: n for n, p in self.model.named_parameters()}
        state = rename_prefixes(self.optimizer.state_dict(), names)
        if self.resumed_optimizer_state.keys() <= state.keys():
            self.resumed_optimizer_state = {}
        return {**self.resumed_optimizer_state, **state}

    def save(self, filename):
        """Writes ``state_dict()`` to ``<SAVE>/<filename>`` (first process only); raises
        ``OutputWriteError`` naming the file when the system refuses it."""
        if self.rank == 0:
            path = os.path.join(self.config.SAVE, filename)
            try:
                save_checkpoint(self.state_dict(), path)
            except OutputWriteError as e:
                raise OutputWriteError(f'{e}, and -resume auto continues from last.pdparams') from e
            self.logger.info(f'saved {path}')

    def resume(self, path):
        """Restores a ``state_dict()`` saved by ``save``; the architecture must match exactly."""
        checkpoint = load_checkpoint(path)
        absent = [k for k in ('model', 'optimizer', 'lr_scheduler', 'epoch') if k not in checkpoint]
        if absent:
            raise CheckpointError(f'{path} is not a training checkpoint (no {", ".join(absent)}); '
                                  f'to start from its weights use -pretrained')
        expected = state_shapes(self.model.state_dict())
        check_fits(checkpoint['model'], expected, f'-resume {path}: the checkpoint is of another architecture '
                                                  f'than the config\'s')
        self.check_settings_against(checkpoint, path)
        self.model.set_state_dict(checkpoint['model'])
        if self.model_ema:
            if 'model_ema' not in checkpoint:
                raise CheckpointError(f'{path} has no EMA weights but TRAIN.MODEL_EMA is on')
            check_fits(checkpoint['model_ema'], expected, f'-resume {path}: its EMA weights do not fit the model')
            self.model_ema.set_state_dict(checkpoint['model_ema'])
        elif 'model_ema' in checkpoint:
            self.logger.warning(f'{path}: its EMA weights are not continued, TRAIN.MODEL_EMA is off (the '
                                f'checkpoints of this run have none)')
        names = {n: p.name for n, p in self.model.named_parameters()}
        self.optimizer.set_state_dict(rename_prefixes(checkpoint['optimizer'], names))
        self.resumed_optimizer_state = checkpoint['optimizer']
        self.optimizer_state()  # lets it go at once where the optimizer holds the moments (Paddle 3)
        if self.scaler and 'scaler' in checkpoint:
            self.scaler.load_state_dict(checkpoint['scaler'])
        self.epoch = int(checkpoint['epoch'])
        self.best_acc, self.best_epoch = checkpoint.get('best_acc'), checkpoint.get('best_epoch')
        if self.best_epoch is not None:  # older checkpoints have their best.pdparams beside them
            best_file = checkpoint.get('best_file') or 'best.pdparams'
            self.best_file = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(path)), best_file))
        self.unvalidated = bool(checkpoint.get('unvalidated', False))
        self.logger.info(f'resumed from {path}: {self.epoch} epochs, {int(checkpoint["step"])} steps done'
                         + (f', epoch {self.epoch} not validated yet' if self.unvalidated else ''))
        if self.best_file_elsewhere():
            self.logger.info(f'the best epoch so far, {self.best_epoch} (Acc@1 {self.best_acc:.2f}%), was saved in '
                             f'{os.path.dirname(self.best_file)}; {self.config.SAVE}/best.pdparams will be '
                             f'written when a later epoch beats it')
        self.continue_schedule_after(self.epoch, int(checkpoint['step']), path)

    def check_settings_against(self, checkpoint, path):
        """Compares this run's config with the one ``checkpoint`` was written with: a change of
        the settings that decide which optimizer state exists raises ``CheckpointError`` (the
        optimizer could not continue), any other change is named in a warning."""
        if 'config' not in checkpoint:
            return
        changes = changed_settings(checkpoint['config'], self.config, ignore=(*RUN_ONLY_KEYS, 'SAVE'))
        for key, before, now in changes:
            if key in OPTIMIZER_STATE_KEYS:
                raise CheckpointError(f'-resume {path}: its optimizer state was made with {key} {before!r}, this '
                                      f'run has {now!r}; resume with the checkpoint\'s setting, or start a new run '
                                      f'from its weights with -pretrained {path} (and another -output)')
        if changes:
            self.logger.warning(f'-resume {path}: this run\'s settings differ from the checkpoint\'s: '
                                + ', '.join(f'{key} {before!r} -> {now!r}' for key, before, now in changes))

    def continue_schedule_after(self, epochs, steps, path):
        """Sets the step count and the learning-rate schedule to the end of epoch ``epochs``.

        The schedule is per optimizer step, and ``steps`` were taken in those epochs; when an
        epoch now has another number of steps (other processes, batch size or TRAIN.ACCUM_ITER),
        the schedule, built for the new count, continues where the epochs end in it."""
        self.step = epochs * self.steps_per_epoch
        if self.step != steps:
            self.logger.warning(f'{path}: {epochs} epochs took {steps} optimizer steps, {self.steps_per_epoch} '
                                f'per epoch now (other processes, batch size or TRAIN.ACCUM_ITER); the '
                                f'learning-rate schedule continues at step {self.step} of '
                                f'{self.config.TRAIN.NUM_EPOCHS * self.steps_per_epoch}')
        self.lr_scheduler.last_epoch = self.step  # Paddle's name for the scheduler's step count
        self.lr_scheduler.last_lr = self.lr_scheduler.get_lr()

    # ---- one epoch

    def train_one_epoch(self, epoch):
        """Trains epoch ``epoch`` (0-based); returns its mean loss, without mixup its accuracy, and its seconds.

        A trailing group of fewer than ACCUM_ITER batches is skipped, so every optimizer step
        sees the same number of images.
        """
        config, logger = self.config, self.logger
        accum, report_freq = config.TRAIN.ACCUM_ITER, config.REPORT_FREQ
        model = self.train_model
        self.model.train()  # XCiT's own train(): a frozen backbone stays in eval mode
        self.train_set.set_epoch(epoch)
        self.train_loader.batch_sampler.set_epoch(epoch)
        paddle.seed(config.SEED + self.rank + 1000 * epoch)
        num_batches = self.steps_per_epoch * accum
        remaining_epochs = config.TRAIN.NUM_EPOCHS - epoch - 1
        epoch_loss, window_loss = AverageMeter(), AverageMeter()
        epoch_sums, window_sums = np.zeros(4), np.zeros(4)
        start = window_start = time.time()
        window_images = 0
        lr = self.optimizer.get_lr()
        for i, (images, labels) in enumerate(self.train_loader):
            if i == num_batches:
                break
            targets = labels
            if self.mixup is not None:
                images, targets = self.mixup(images, labels, np.random.default_rng([config.SEED, self.rank, epoch, i]))
            update = (i + 1) % accum == 0
            with _no_sync(model, update and not self.reduce_after_backward):
                with autocast(self.use_amp):
                    outputs = model(images)
                    loss = self.criterion(images, outputs, targets)
                loss_value = float(all_reduce_sum([float(loss)])[0]) / self.world_size
                if not math.isfinite(loss_value):
                    raise TrainingDiverged(f'loss is {loss_value} at epoch {epoch + 1}, step {i + 1}/{num_batches}; '
                                           f'stopping (the last checkpoint is kept)')
                scaled = loss / accum
                (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            if update:
                if self.reduce_after_backward:
                    fused_allreduce_gradients(self.model.parameters(), None)  # the mean over processes
                lr = self.optimizer.get_lr()
                if self.scaler:
                    self.scaler.step(self.optimizer)  # skipped when a gradient is infinite
                    update_loss_scale(self.scaler)
                else:
                    self.optimizer.step()
                self.optimizer.clear_grad()
                self.lr_scheduler.step()
                self.step += 1
                if self.model_ema:
                    self.model_ema.update(self.model)
            batch = labels.shape[0]
            epoch_loss.update(loss_value, batch)
            window_loss.update(loss_value, batch)
            window_images += batch
            if self.mixup is None:
                sums = classification_sums(outputs.astype('float32').numpy(), labels.numpy())
                epoch_sums += sums
                window_sums += sums
            if (i + 1) % report_freq == 0 or i + 1 == num_batches:
                now = time.time()
                acc = summarise(all_reduce_sum(window_sums)) if self.mixup is None else None
                rate = window_images * self.world_size / (now - window_start)
                eta = (now - start) / (i + 1) * (num_batches - i - 1 + remaining_epochs * num_batches)
                acc_text = (f'acc@1 {acc["acc1"]:.2f} acc@5 {acc["acc5"]:.2f}' if acc
                            else 'acc n/a (mixup)')
                logger.info(f'epoch {epoch + 1}/{config.TRAIN.NUM_EPOCHS} step {i + 1}/{num_batches} '
                            f'lr {lr:.3e} loss {window_loss.avg:.4f} (epoch {epoch_loss.avg:.4f}) {acc_text} '
                            f'{rate:.1f} images/s ETA {format_seconds(eta)}')
                self.metrics.write('train', epoch=epoch + 1, step=self.step, lr=lr, loss=window_loss.avg,
                                   acc1=acc and acc['acc1'], acc5=acc and acc['acc5'], images_per_sec=rate)
                window_loss, window_sums, window_images, window_start = AverageMeter(), np.zeros(4), 0, now
        acc = summarise(all_reduce_sum(epoch_sums)) if self.mixup is None else {'acc1': None, 'acc5': None}
        return {'loss': epoch_loss.avg, 'acc1': acc['acc1'], 'acc5': acc['acc5'],
                'seconds': time.time() - start}

    # ---- validation and the epoch loop

    def validate(self, epoch):
        """Evaluates the model (and the EMA) on the validation split; returns {name: stats}."""
        results = {}
        for name, forward in self.eval_forwards.items():
            stats = evaluate(forward, self.val_loader, self.logger, self.use_amp, self.config.REPORT_FREQ, name)
            self.logger.info(f'epoch {epoch + 1} val {name}: Acc@1 {stats["acc1"]:.2f}% Acc@5 {stats["acc5"]:.2f}% '
                             f'loss {stats["loss"]:.4f} ({stats["images"]} images, '
                             f'{stats["images_per_sec"]:.1f} images/s, {stats["path"]})')
            self.metrics.write('val', model=name, epoch=epoch + 1, step=self.step, lr=self.optimizer.get_lr(),
                               loss=stats['loss'], acc1=stats['acc1'], acc5=stats['acc5'],
                               images_per_sec=stats['images_per_sec'])
            results[name] = stats
        return results

    def finish_epoch(self):
        """Completes the checkpoints of the last completed epoch: validates it when that is due
        (``unvalidated``), saving ``best.pdparams`` when the model's Acc@1 is the best so far,
        writes ``epoch_N.pdparams`` every SAVE_FREQ epochs, and ``last.pdparams`` last, so that a
        run stopped before then does all of it again when resumed; returns ``validate``'s result,
        or {} without validation."""
        results = self.validate(self.epoch - 1) if self.unvalidated else {}
        if results:
            self.unvalidated = False
            if self.best_acc is None or results['model']['acc1'] > self.best_acc:
                self.best_acc, self.best_epoch = results['model']['acc1'], self.epoch
                self.best_file = os.path.abspath(os.path.join(self.config.SAVE, 'best.pdparams'))
                self.save('best.pdparams')
        save_freq = self.config.SAVE_FREQ
        if save_freq > 0 and self.epoch % save_freq == 0:
            self.save(f'epoch_{self.epoch}.pdparams')
        self.save('last.pdparams')
        return results

    def best_file_elsewhere(self):
        """The best epoch's best.pdparams was written in another folder than SAVE, by the run that
        this one continues from a checkpoint of that folder (a later epoch of that run may have
        replaced it since)."""
        here = os.path.realpath(os.path.join(self.config.SAVE, 'best.pdparams'))
        return self.best_file is not None and os.path.realpath(self.best_file) != here

    def replica_difference(self):
        """Max abs difference between the ranks' weights (0.0 with one process)."""
        worst = 0.0
        if self.world_size == 1:
            return worst
        for value in self.model.state_dict().values():
            if paddle.is_floating_point(value):
                high, low = value.clone(), value.clone()
                paddle.distributed.all_reduce(high, op=paddle.distributed.ReduceOp.MAX)
                paddle.distributed.all_reduce(low, op=paddle.distributed.ReduceOp.MIN)
                worst = max(worst, float((high - low).max()))
        return worst

    def fit(self):
        """Trains from ``self.epoch`` to TRAIN.NUM_EPOCHS; returns the result dict."""
        config, logger = self.config, self.logger
        num_epochs, validate_freq = config.TRAIN.NUM_EPOCHS, config.VALIDATE_FREQ
        if self.epoch < num_epochs:
            logger.info(f'training epochs {self.epoch + 1}..{num_epochs}: {self.steps_per_epoch} optimizer steps '
                        f'of {config.DATA.BATCH_SIZE} x {self.world_size} process(es) x {config.TRAIN.ACCUM_ITER} '
                        f'accumulation images each, peak lr {self.lr_scheduler.peak_lr:.3e}')
        last = self.finish_epoch() if self.unvalidated else {}
        for epoch in range(self.epoch, num_epochs):
            stats = self.train_one_epoch(epoch)
            average_batchnorm_statistics(self.model)
            if self.model_ema:
                average_batchnorm_statistics(self.model_ema.module)
            _check_finite_weights(self.model, epoch + 1)
            self.epoch = epoch + 1
            acc_text = f', acc@1 {stats["acc1"]:.2f}%' if stats['acc1'] is not None else ''
            logger.info(f'epoch {epoch + 1} done in {format_seconds(stats["seconds"])}: '
                        f'train loss {stats["loss"]:.4f}{acc_text}')
            self.unvalidated = (validate_freq > 0 and self.epoch % validate_freq == 0) or self.epoch == num_epochs
            if self.unvalidated:
                self.save('last.pdparams')  # the epoch's training is kept whatever happens while validating
            last = self.finish_epoch() or last
        result = {'best_acc1': self.best_acc, 'best_epoch': self.best_epoch, 'epochs': self.epoch,
                  'steps': self.step, 'replica_max_abs_diff': self.replica_difference()}
        if self.world_size > 1:
            logger.info(f'the {self.world_size} processes hold the same weights up to '
                        f'{result["replica_max_abs_diff"]:.1e}')
        if not last:
            logger.info(f'nothing to train: the checkpoint is at epoch {self.epoch} of {num_epochs}')
            return result
        result.update(last_acc1=last['model']['acc1'], last_acc5=last['model']['acc5'])
        ema_text = ''
        if 'ema' in last:
            result['last_ema_acc1'] = last['ema']['acc1']
            ema_text = f', EMA {last["ema"]["acc1"]:.2f}%'
        best_text = f', saved in {os.path.dirname(self.best_file)}' if self.best_file_elsewhere() else ''
        logger.info(f'result: best Acc@1 {self.best_acc:.2f}% (epoch {self.best_epoch}{best_text}), last Acc@1 '
                    f'{result["last_acc1"]:.2f}%{ema_text} after {self.epoch} epochs; checkpoints in {config.SAVE}')
        return result


OPTIMIZER_STATE_KEYS = ('TRAIN.OPTIMIZER.NAME', 'TRAIN.FREEZE_BACKBONE')  # which state the optimizer keeps
RUN_ONLY_KEYS = {'MODEL.PRETRAINED': '', 'MODEL.RESUME': '', 'EVAL': False, 'EMA_EVAL': False, 'NGPUS': -1}


PATH_KEYS = ('DATA.DATA_PATH', 'TRAIN.TEACHER_MODEL', 'TRAIN.TEACHER_PRETRAINED')  # files and folders a run reads


def reusable_config(config, class_names=None):
    """``config`` without what only its own run does (the weights it started from or continued,
    evaluation switches, its number of processes), with the paths it reads made absolute and
    DATA.CLASS_NAMES set to ``class_names`` when given (those of the classes it learned), as
    ``-cfg`` for evaluating, exporting or fine-tuning what it trained from any folder; the
    checkpoints keep the config whole."""
    config = config.clone()
    config.defrost()
    if class_names:
        config.DATA.CLASS_NAMES = list(class_names)
    for key, value in RUN_ONLY_KEYS.items():
        node, _, name = key.rpartition('.')
        setattr(config.get(node) if node else config, name, value)
    for key in PATH_KEYS:
        node, _, name = key.rpartition('.')
        if config[node][name] and config[node][name] != 'regnety_160':  # the one teacher named, not a file
            config[node][name] = os.path.abspath(config[node][name])
    config.freeze()
    return config


def hold_output_folder(folder):
    """The open ``<folder>/run.lock`` that the first process of a run (training or evaluation) holds
    while the run writes to ``folder`` (``utils.lock_folder``); raises ``ConfigError`` when another
    run holds it, as two runs would mix their lines in log.txt (and records in metrics.jsonl) and
    overwrite each other's checkpoints or summaries."""
    lock = lock_folder(folder)
    if lock is None:
        raise ConfigError(f'{folder} is the output folder of a run that is still going on (it holds '
                          f'{os.path.join(folder, "run.lock")}): wait for it to end, or give another -output')
    return lock


def run_training(config, device, use_amp, logger):
    if get_rank() == 0:  # it holds the folder: no other process writes these files now
        removed = remove_partial_checkpoints(config.SAVE)
        if removed:
            logger.info(f'removed what a stopped run left of checkpoints it was writing: {", ".join(removed)}')
    trainer = Trainer(config, device, use_amp, logger)
    if get_rank() == 0:
        classes = getattr(trainer.train_set, 'classes', None)  # an image folder's class folders
        learned = classes if classes and len(classes) == config.MODEL.NUM_CLASSES else None
        write_config(reusable_config(config, learned), os.path.join(config.SAVE, 'config.yaml'))
    return trainer.fit()


# ---------------------------------------------------------------- entry


def amp_runs_on(device, logger):
    """Whether -amp computes in float16 on ``device`` ('cpu' or 'gpu:N'): on a GPU with float16
    support (compute capability 7.0 or more), where Paddle's autocast runs; elsewhere it logs that
    the run computes in float32."""
    if device.startswith('gpu') and paddle.amp.is_float16_supported(device):
        return True
    where = f'on {device}, which has no float16 support' if device.startswith('gpu') else 'on CPU'
    logger.info(f'-amp has no effect {where}: computing in float32')
    return False


def run(config):
    """The work of one process: ``-eval`` evaluation or training. Returns the summary dict.

    In a multi-process run, ``paddle.distributed.init_parallel_env()`` must have been called.
    """
    check_inputs(config)
    rank, world_size = get_rank(), get_world_size()
    with hold_output_folder(config.SAVE) if rank == 0 else contextlib.nullcontext():
        logger = setup_logger(config.SAVE, rank)
        device = setup_device()
        logger.info(f'device: {device}' + (f', {world_size} processes' if world_size > 1 else ''))
        use_amp = config.AMP and amp_runs_on(device, logger)
        notice = ignored_data_path(config)
        if notice:
            logger.info(notice)
        if config.EVAL:
            return run_evaluation(config, device, use_amp, logger)
        return run_training(config, device, use_amp, logger)
