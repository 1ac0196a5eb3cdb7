"""Helpers shared by the training/evaluation engine: logging, meters, distributed
reductions and atomic checkpoint files."""
import codecs
import collections
import contextlib
import json
import logging
import math
import os
import pickle
import re
import sys
import tempfile
import time

try:
    import fcntl
except ImportError:  # Windows: no flock, output folders go unguarded
    fcntl = None
import numpy as np
import paddle
import paddle.distributed as dist

from config import ConfigError
from port_weights.convert import check_fits, state_shapes
# CheckpointError: the project's one error type for bad checkpoints
from port_weights.safe_load import CheckpointError, check_checkpoint_file, checkpoint_kind, map_nested


# ---------------------------------------------------------------- distributed


def get_rank():
    return dist.get_rank() if dist.is_initialized() else 0


def get_world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def visible_gpus():
    """How many GPUs Paddle can run on: 0 when it is built without CUDA or sees no device."""
    return paddle.device.cuda.device_count() if paddle.is_compiled_with_cuda() else 0


def resolve_device(name=None):
    """A ``-device`` value (``cpu``, ``gpu``, ``gpu:N``, or None: the first GPU if there is
    one, else the CPU) -> ``'cpu'`` or ``'gpu:N'``; ValueError when that device is not there."""
    gpus = visible_gpus()
    if name is None:
        return 'gpu:0' if gpus else 'cpu'
    if name == 'cpu':
        return name
    kind, _, index = name.partition(':')
    if kind != 'gpu' or not (index == '' or index.isdigit()):
        raise ValueError(f"unknown device {name!r}: use cpu, gpu or gpu:N")
    index = int(index or 0)
    if index >= gpus:
        if not gpus and not paddle.is_compiled_with_cuda():
            raise ValueError(f'{name}: this Paddle has no CUDA support (install paddlepaddle-gpu)')
        raise ValueError(f'{name}: Paddle sees {gpus} GPU{"" if gpus == 1 else "s"}')
    return f'gpu:{index}'


def all_reduce_sum(values):
    """Sums a list of numbers over all processes; returns a float64 ndarray of the same length.

    Used for exact metrics: every process contributes sums (correct counts, loss * n, n),
    never means, so the result does not depend on how the data was split.
    """
    return _all_reduce(values, dist.ReduceOp.SUM)


def all_reduce_max(values):
    """The largest of each number over all processes (e.g. the slowest one's seconds), as a float64 ndarray."""
    return _all_reduce(values, dist.ReduceOp.MAX)


def _all_reduce(values, op):
    array = np.asarray(values, dtype='float64')
    if get_world_size() == 1:
        return array
    tensor = paddle.to_tensor(array)
    dist.all_reduce(tensor, op=op)
    return tensor.numpy()


ROWS_PER_GATHER = 2 ** 16  # rows each process sends per all_gather call


def gather_rows(array, everywhere=True):
    """Every process's ``array`` (n_p, ...) concatenated along the first axis in rank order, on every
    process, or with ``everywhere=False`` on the first one only (the others get no rows, so that
    they do not hold all of them) (a collective call). Only the first dimension may differ between
    processes. The rows go in pieces of ``ROWS_PER_GATHER`` per process, so that a device holds at
    most that many rows of each process at a time."""
    world_size = get_world_size()
    if world_size == 1:
        return array
    rank = get_rank()
    keep = everywhere or rank == 0
    counts = all_reduce_sum([len(array) if r == rank else 0 for r in range(world_size)]).astype(int)
    padded = np.zeros((int(counts.max()),) + array.shape[1:], array.dtype)  # all_gather wants one shape
    padded[:len(array)] = array
    pieces = [[] for _ in range(world_size)]
    for start in range(0, len(padded), ROWS_PER_GATHER):
        gathered = []
        dist.all_gather(gathered, paddle.to_tensor(padded[start:start + ROWS_PER_GATHER]))
        if keep:
            for rows, tensor in zip(pieces, gathered):
                rows.append(tensor.numpy())
    if not keep:
        return padded[:0]
    return np.concatenate([np.concatenate(rows)[:count] if rows else padded[:0]
                           for rows, count in zip(pieces, counts)])


BATCHNORMS = (paddle.nn.BatchNorm1D, paddle.nn.BatchNorm2D, paddle.nn.BatchNorm3D, paddle.nn.SyncBatchNorm)


def average_batchnorm_statistics(layer):
    """Replaces the running mean and variance of every BatchNorm in ``layer`` by their mean over
    the processes, so that every process holds the same model. (Gradients keep the parameters
    in step; without SyncBatchNorm each process's statistics follow its own batches.)
    """
    world_size = get_world_size()
    if world_size == 1:
        return
    for sub in layer.sublayers(include_self=True):
        if isinstance(sub, BATCHNORMS):
            for stat in (sub._mean, sub._variance):
                dist.all_reduce(stat)
                paddle.assign(stat / world_size, output=stat)


# ---------------------------------------------------------------- logging


def setup_logger(output=None, rank=0, name='xcit'):
    """Returns a logger printing to stdout on rank 0 (warnings and errors on every rank).

    Rank 0 also appends to ``<output>/log.txt`` when ``output`` is given.
    """
    logger = logging.getLogger(name)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    formatter = logging.Formatter('%(asctime)s %(message)s', datefmt='%H:%M:%S')
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(formatter)
    console.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    logger.addHandler(console)
    if output and rank == 0:
        os.makedirs(output, exist_ok=True)
        log_file = logging.FileHandler(os.path.join(output, 'log.txt'))
        log_file.setFormatter(formatter)
        logger.addHandler(log_file)
    return logger


class MetricsLog:
    """Appends one JSON object per line to ``<output>/metrics.jsonl`` (rank 0 only).

    Each record has at least ``kind`` ('train' or 'val'), ``epoch``, ``step``, ``lr``, ``loss``,
    ``acc1``, ``acc5``, ``images_per_sec`` and ``time`` (seconds since the Unix epoch).
    """

    def __init__(self, output, enabled=True):
        self.path = os.path.join(output, 'metrics.jsonl')
        self.enabled = enabled
        if enabled:
            os.makedirs(output, exist_ok=True)

    def write(self, kind, **fields):
        if not self.enabled:
            return
        record = {'kind': kind, **fields, 'time': round(time.time(), 3)}
        try:
            with open(self.path, 'a', encoding='utf-8') as f:
                f.write(to_json(record) + '\n')
        except OSError as e:
            raise cannot_write(self.path, e) from e

    def start_afresh(self):
        """Removes the records a run that is not continued here left (a fresh run starts a fresh file)."""
        if self.enabled and os.path.exists(self.path):
            os.remove(self.path)

    def keep_epochs_up_to(self, epoch, validated=True):
        """Drops the records of epochs after ``epoch`` (1-based), those of its validation unless
        ``validated``, and any line cut short, as a run resumed from there logs them again."""
        if not (self.enabled and os.path.isfile(self.path)):
            return
        kept = []
        with open(self.path, encoding='utf-8') as f:
            for line in f:
                try:
                    record = json.loads(line)
                    if record['epoch'] < epoch or (record['epoch'] == epoch and (validated or record['kind'] != 'val')):
                        kept.append(line)
                except (ValueError, KeyError, TypeError):
                    continue
        with replacing(self.path) as tmp, open(tmp, 'w', encoding='utf-8') as f:
            f.writelines(kept)


class AverageMeter:
    """Running sum and count of a value; ``avg`` is their ratio (0 when empty)."""

    def __init__(self):
        self.sum = 0.0
        self.count = 0

    def update(self, value, n=1):
        self.sum += float(value) * n
        self.count += n

    @property
    def avg(self):
        return self.sum / self.count if self.count else 0.0


def format_seconds(seconds):
    """Seconds -> 'H:MM:SS'."""
    seconds = int(round(max(seconds, 0)))
    return f'{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}'


def to_json(data, **options):
    """``json.dumps(data, **options)`` in standard JSON, which has no NaN or infinity: such a
    number (e.g. the loss of diverged weights) is written as null."""
    finite = map_nested(data, lambda x, where: None if isinstance(x, float) and not math.isfinite(x) else x)
    return json.dumps(finite, allow_nan=False, **options)


class OutputWriteError(OSError):
    """An output file could not be written (a full disk, permissions, a folder in its place); the
    message names it."""


def cannot_write(path, error):
    """The ``OutputWriteError`` for ``path`` and the ``OSError`` that refused it."""
    return OutputWriteError(f'cannot write {path} ({error.strerror or error})')


@contextlib.contextmanager
def replacing(path):
    """Yields a temporary name beside ``path`` (``<path>.tmp<pid>``) to write to; the file then
    replaces ``path`` in one rename once its data are on disk (``fsync``), and is removed if
    writing failed: a reader of ``path`` finds the previous file or the new one whole, never part
    of one, also after a power failure. A write the system refuses raises ``OutputWriteError``."""
    tmp = f'{path}.tmp{os.getpid()}'
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OutputWriteError:
        raise
    except OSError as e:
        raise OutputWriteError(f'{cannot_write(path, e)}; the file is as it was before') from e
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_png(image, path):
    """Writes the PIL ``image`` to ``path`` as a PNG, atomically (``replacing``)."""
    with replacing(path) as tmp:
        image.save(tmp, format='PNG')


def write_json(path, data):
    """Writes ``data`` as indented JSON (``to_json``), atomically (``replacing``)."""
    with replacing(path) as tmp, open(tmp, 'w', encoding='utf-8') as f:
        f.write(to_json(data, indent=1))


def lock_folder(folder, name='run.lock'):
    """Takes an exclusive lock on ``<folder>/<name>`` (created if need be) and returns its open
    file, which holds the lock until it is closed or the process ends, however it ends; returns
    None if another open file of it holds the lock (another run, or this process)."""
    os.makedirs(folder, exist_ok=True)
    lock = open(os.path.join(folder, name), 'a', encoding='utf-8')
    if fcntl is not None:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            return None
    return lock


def check_output_folder(folder, flag='-output'):
    """Creates the output folder ``folder`` if need be; raises ``ConfigError`` naming ``flag`` and
    ``folder`` when it is a file or cannot be created or written to (a file on its path,
    permissions, a read-only or full file system)."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ConfigError(f'{flag} {folder} is a file, not a folder')
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise ConfigError(f'{flag} {folder}: cannot create or write to the folder ({e.strerror or e})') from e


def check_output_file(path, flag):
    """Raises ``ConfigError`` naming ``flag`` and ``path`` when the output file ``path`` is a folder
    or its folder cannot be created or written to (``check_output_folder``, which creates it). Made
    before the work whose result ``path`` receives, which would be lost if writing it failed."""
    if os.path.isdir(path):
        raise ConfigError(f'{flag} {path} is a folder, not a file')
    check_output_folder(os.path.dirname(os.path.abspath(path)), f'{flag} {path}: its folder')


def write_config(config, path):
    """Writes ``config`` whole as YAML, usable as ``-cfg`` (a run's or an export's config.yaml),
    atomically (``replacing``)."""
    with replacing(path) as tmp, open(tmp, 'w', encoding='utf-8') as f:
        f.write(config.dump())


# ---------------------------------------------------------------- checkpoints


PARTIAL_CHECKPOINT = re.compile(r'.+\.pdparams\.tmp[0-9]+')  # the temporary files of save_checkpoint


def save_checkpoint(state, path):
    """Saves ``state`` with ``paddle.save`` to a temporary file, then renames it over ``path``.

    A crash while writing leaves any previous ``path`` intact (and, if the process is killed,
    the temporary file: see ``remove_partial_checkpoints``).
    """
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with replacing(path) as tmp:
        paddle.save(state, tmp)


def remove_partial_checkpoints(folder):
    """Removes from ``folder`` the temporary files (``<name>.pdparams.tmp<pid>``) that
    ``save_checkpoint`` leaves behind when its process is killed while writing, each as large as a
    checkpoint; returns their names. For a folder that no running process writes to."""
    names = sorted(name for name in os.listdir(folder) if PARTIAL_CHECKPOINT.fullmatch(name))
    for name in names:
        os.remove(os.path.join(folder, name))
    return names


class _PdparamsUnpickler(pickle.Unpickler):
    """Unpickles what ``paddle.save`` writes (dicts, lists, tuples, numbers, strings, numpy
    arrays and scalars) and nothing else: any other global is refused, so that a file cannot
    run code, as ``pickle`` (and ``paddle.load``) would let it."""

    _reconstruct = np.ndarray.__reduce__(np.empty(0))[0]  # numpy's array and scalar builders,
    _scalar = np.float64(0).__reduce__()[0]  # pickled as numpy.core or numpy._core by numpy 1 or 2
    ALLOWED = {('numpy', 'ndarray'): np.ndarray, ('numpy', 'dtype'): np.dtype,
               ('numpy.core.multiarray', '_reconstruct'): _reconstruct,
               ('numpy._core.multiarray', '_reconstruct'): _reconstruct,
               ('numpy.core.multiarray', 'scalar'): _scalar, ('numpy._core.multiarray', 'scalar'): _scalar,
               ('builtins', 'tuple'): tuple, ('collections', 'OrderedDict'): collections.OrderedDict,
               ('_codecs', 'encode'): codecs.encode}  # how pickle protocol 2 writes bytes

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refused global '{module}.{name}': a .pdparams holds arrays, numbers "
                                         f"and containers only")
        return self.ALLOWED[(module, name)]


def _tensors_of(obj):
    """``obj`` as ``paddle.load`` returns it: every numpy array (or ``(name, array)`` pair, how
    Paddle 2.1 saved tensors) a ``paddle.Tensor`` (``map_nested``: shared objects are converted
    once; a container that holds itself raises ``CheckpointError``)."""
    def is_pair(x):
        return isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str) and isinstance(x[1], np.ndarray)
    pairs = []
    map_nested(obj, lambda x, where: pairs.append(x) if is_pair(x) else x, is_leaf=is_pair)
    if pairs:  # Paddle 2.1's files: the pairs are the tensors, other arrays stay arrays
        return map_nested(obj, lambda x, where: paddle.to_tensor(x[1]) if is_pair(x) else x, is_leaf=is_pair)
    return map_nested(obj, lambda x, where: paddle.to_tensor(x) if isinstance(x, np.ndarray) else x)


def _joined_big_arrays(state):
    """``state`` with the arrays that ``paddle.save`` split into slices (pickle protocols 2 and 3
    hold at most 4 GB per object) joined again."""
    info = state.pop('UnpackBigParamInfor@@', None) or {}
    for name, parts in info.items():
        state[name] = np.concatenate([state.pop(part) for part in parts['slices']]).reshape(parts['OriginShape'])
    return state


FOREIGN_KINDS = {'zip': 'a PyTorch checkpoint', 'legacy': 'a PyTorch checkpoint (legacy format)',
                 'safetensors': 'a safetensors file'}  # safe_load.checkpoint_kind -> what the file is


def load_checkpoint(path):
    """Loads a ``.pdparams`` file (a state dict, or a training checkpoint dict) as ``paddle.load``
    does, but without running code: see ``_PdparamsUnpickler``."""
    check_checkpoint_file(path)
    try:
        foreign = FOREIGN_KINDS.get(checkpoint_kind(path))
    except OSError as e:
        raise CheckpointError(f'{path}: cannot read: {e.strerror or e}') from e
    if foreign:
        raise CheckpointError(f'{path} is {foreign}, not a Paddle .pdparams: convert it first, e.g. python '
                              f'port_weights/convert.py --src {path} --dst NAME.pdparams --cfg CONFIG.yaml')
    try:
        with open(path, 'rb') as f:
            state = _PdparamsUnpickler(f, encoding='latin1').load()
        if not isinstance(state, dict):
            raise CheckpointError(f'expected a dict, got {type(state).__name__}')
        state.pop('StructuredToParameterName@@', None)
        return _tensors_of(_joined_big_arrays(state))
    except CheckpointError as e:
        raise CheckpointError(f'{path}: {e}') from e
    except Exception as e:  # a foreign, truncated or hostile file: whatever unpickling raises, name the file
        raise CheckpointError(f'{path}: not a readable Paddle checkpoint ({type(e).__name__}: {e})') from e


def weights_of(checkpoint, path, use_ema=False):
    """The state dict to load from a file's content: the file itself when it is a plain state
    dict (a converted ``.pdparams``), else its 'model' (or, with ``use_ema``, 'model_ema') entry."""
    is_training_checkpoint = isinstance(checkpoint.get('model'), dict)
    if use_ema:
        if not isinstance(checkpoint.get('model_ema'), dict):
            kind = 'training checkpoint' if is_training_checkpoint else 'plain state dict'
            raise CheckpointError(f"{path}: its EMA weights ('model_ema') were asked for (-ema; use_ema in "
                                  f"Python), but this {kind} has none")
        state = checkpoint['model_ema']
    else:
        state = checkpoint['model'] if is_training_checkpoint else checkpoint
    not_arrays = [name for name, value in state.items() if not hasattr(value, 'shape')]
    if not_arrays:
        raise CheckpointError(f'{path}: not a state dict (nor a training checkpoint with one under \'model\'): '
                              f'entries {", ".join(map(repr, not_arrays[:5]))} are not arrays')
    return state


def load_every_weight(model, path, what, use_ema=False):
    """Loads ``path`` (a converted ``.pdparams`` or a training checkpoint, see ``weights_of``)
    into ``model``, which must take every entry: a missing, unexpected or differently shaped
    key raises ``CheckpointError`` naming ``what`` the model is, with a table of them."""
    state = weights_of(load_checkpoint(path), path, use_ema)
    model_state = model.state_dict()
    check_fits(state, state_shapes(model_state), f'{path} does not fit {what}')
    model.set_state_dict(in_model_dtypes(state, model_state))


def in_model_dtypes(state, model_state):
    """``state`` with each floating-point entry cast to the dtype of the model's entry of that
    name (e.g. weights converted with ``--dtype float16`` for a float32 model, which
    ``set_state_dict`` refuses); other entries unchanged."""
    cast = {}
    for name, value in state.items():
        target = model_state.get(name)
        if target is not None and paddle.is_floating_point(target):
            value = paddle.to_tensor(value) if not isinstance(value, paddle.Tensor) else value
            if paddle.is_floating_point(value) and value.dtype != target.dtype:
                value = value.astype(target.dtype)
        cast[name] = value
    return cast
