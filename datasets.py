"""Datasets and data loaders.

``DATA.DATASET`` selects the layout under ``DATA.DATA_PATH``:

* ``imagenet2012``: ``train_list.txt`` / ``val_list.txt`` with one ``relative/path label`` per line,
  paths relative to DATA_PATH (PaddleViT's layout);
* ``imagefolder``: ``train/<class>/...`` and ``val/<class>/...``; classes sorted by folder name get
  labels 0, 1, ...; image files found as torchvision's ``ImageFolder`` finds them;
* ``digits``: scikit-learn's 8x8 handwritten digits bundled in ``data/digits.npz`` (1,797 images,
  10 classes, fixed split documented in ``data/README.md``); DATA_PATH is not used;
* ``cifar10`` / ``cifar100``: the CIFAR "python version" (train / test as train / val), either
  extracted (``cifar-10-batches-py/`` or ``cifar-100-python/`` in DATA_PATH) or as the archive
  (``cifar-10-python.tar.gz`` / ``cifar-100-python.tar.gz``, also Paddle's cached download). Its
  batches are pickles: they are read with an unpickler that builds numpy arrays and nothing else.

An item is ``(image, label)``: image float32 (3, S, S) from the evaluation or training transform,
label int64. In 'train' mode the augmentation of item ``index`` draws all its randomness from
``np.random.default_rng([SEED, epoch, index])``, so the data stream depends only on the seed,
the epoch and the sampler, whatever the number of loader workers.

Problems with the data raise ``DataError`` naming the file (and list-file line): undecodable
images when they are loaded; everything else (missing images, files or folders, malformed list
lines, labels outside [0, MODEL.NUM_CLASSES), empty datasets) when the dataset is built.
"""
import codecs
import functools
import gc
import io
import itertools
import os
import pickle
import re
import tarfile
import threading
import warnings
import zlib

import numpy as np
import paddle
from PIL import Image

from launch import end_with_parent
from samplers import EvalBatchSampler, TrainBatchSampler
from transforms import build_eval_transform, build_train_transform, to_rgb

IMG_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.ppm', '.bmp', '.pgm', '.tif', '.tiff', '.webp')
DIGITS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data', 'digits.npz')
MODES = ('train', 'val')
FOLDER_DATASETS = ('imagenet2012', 'imagefolder', 'cifar10', 'cifar100')  # in DATA.DATA_PATH; digits is bundled
# name -> (archive, its folder, train batches, test batches, label key, classes)
CIFAR = {
    'cifar10': ('cifar-10-python.tar.gz', 'cifar-10-batches-py', [f'data_batch_{i}' for i in range(1, 6)],
                ['test_batch'], b'labels', 10),
    'cifar100': ('cifar-100-python.tar.gz', 'cifar-100-python', ['train'], ['test'], b'fine_labels', 100),
}


class DataError(ValueError):
    """Missing, unreadable or inconsistent data; the message names the file (and line). Also
    data that could not be loaded for another reason (a loader worker process that died)."""


class ImageDataset(paddle.io.Dataset):
    """Images with int64 labels, transformed for ``mode`` 'train' (the random augmentation, seeded
    per item) or 'val' (the evaluation transform).

    ``num_classes`` is the number of classes the dataset defines: the class folders of an image
    folder, 10 for digits, MODEL.NUM_CLASSES for list files (which do not say).
    Subclasses implement ``load_image(i) -> PIL.Image``. An index ``>= len(self)`` reads image
    ``index % len(self)`` with the augmentation seeded by the full index (the extra copies of
    repeated augmentation, see ``samplers.py``).
    """

    def __init__(self, labels, num_classes, mode, transform, seed):
        self.labels = np.asarray(labels, dtype=np.int64)
        self.num_classes = num_classes
        self.mode = mode
        self.transform = transform
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch):
        """Selects the epoch's augmentations; call before iterating each epoch."""
        self.epoch = epoch

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        i = index % len(self.labels)
        img = self.load_image(i)
        if self.mode == 'train':
            image = self.transform(img, np.random.default_rng([self.seed, self.epoch, index]))
        else:
            image = self.transform(img)
        return image, self.labels[i]

    def load_image(self, i):
        raise NotImplementedError


# what PIL raises for a file it cannot decode (a broken PNG chunk is a SyntaxError)
IMAGE_READ_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def read_image(path):
    """The decoded PIL image in the file ``path``; raises one of ``IMAGE_READ_ERRORS``.

    An image above PIL's decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``, 89 M pixels; PIL
    refuses twice that) is read with a warning naming the file, for every such file: PIL's own
    warning names none and is shown once per process.
    """
    with open(path, 'rb') as f:
        img = Image.open(f)
        pixels = img.width * img.height
        if Image.MAX_IMAGE_PIXELS and pixels > Image.MAX_IMAGE_PIXELS:
            warnings.warn(f'{path}: {pixels} pixels, above the {Image.MAX_IMAGE_PIXELS} at which PIL '
                          f'suspects a decompression bomb', Image.DecompressionBombWarning, stacklevel=2)
        img.load()
    return img


class ImageFileDataset(ImageDataset):
    """Images read from files; those listed in ``list_file`` name their line in error messages."""

    def __init__(self, paths, labels, num_classes, mode, transform, seed, list_file=None, line_numbers=None):
        super().__init__(labels, num_classes, mode, transform, seed)
        self.paths = paths
        self.list_file = list_file
        self.line_numbers = line_numbers

    def load_image(self, i):
        path = self.paths[i]
        try:
            return to_rgb(read_image(path))
        except IMAGE_READ_ERRORS as e:
            where = f' ({self.list_file} line {self.line_numbers[i]})' if self.list_file else ''
            raise DataError(f'cannot read image {path}{where}: {e}') from e


class ArrayDataset(ImageDataset):
    """Images held in memory: uint8 (N, H, W) grayscale or (N, H, W, 3) RGB."""

    def __init__(self, images, labels, num_classes, mode, transform, seed):
        super().__init__(labels, num_classes, mode, transform, seed)
        self.images = images

    def load_image(self, i):
        return Image.fromarray(self.images[i])  # mode 'L' or 'RGB'


def _check_dir(path, what):
    if not os.path.isdir(path):
        raise DataError(f'{what} not found: {path}')


def _text_lines(path):
    """The UTF-8 text file ``path`` as a file object of its lines (any line ending; a leading
    byte-order mark, which some Windows editors write, is dropped); ``DataError`` naming the line
    of a byte that is not UTF-8."""
    with open(path, 'rb') as f:
        raw = f.read().removeprefix(codecs.BOM_UTF8)
    try:
        text = raw.decode('utf-8')
    except UnicodeDecodeError as e:
        line = raw.count(b'\n', 0, e.start) + 1
        raise DataError(f'{path} line {line}: not UTF-8 text (byte {raw[e.start]:#04x}); save it as UTF-8') from None
    return io.StringIO(text, newline=None)


def _read_list_file(root, list_file, num_classes):
    """(paths, labels, line numbers) from the UTF-8 lines 'relative/path label'; blank lines are skipped."""
    if not os.path.isfile(list_file):
        raise DataError(f'list file not found: {list_file} (imagenet2012 expects train_list.txt '
                        f'and val_list.txt in DATA.DATA_PATH)')
    paths, labels, line_numbers = [], [], []
    with _text_lines(list_file) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            fields = line.rsplit(None, 1)
            if len(fields) != 2 or not re.fullmatch('-?[0-9]+', fields[1]):
                raise DataError(f"{list_file} line {lineno}: expected 'relative/path label', "
                                f'got {line.rstrip()!r}')
            label = int(fields[1])
            if not 0 <= label < num_classes:
                raise DataError(f'{list_file} line {lineno}: label {label} outside '
                                f'[0, MODEL.NUM_CLASSES={num_classes})')
            paths.append(os.path.join(root, fields[0].strip()))
            labels.append(label)
            line_numbers.append(lineno)
    if not paths:
        raise DataError(f'{list_file}: no images listed')
    missing = [(path, lineno) for path, lineno in zip(paths, line_numbers) if not os.path.isfile(path)]
    if missing:
        shown = ', '.join(f'{path} (line {lineno})' for path, lineno in missing[:5])
        raise DataError(f'{list_file}: {len(missing)} of {len(paths)} listed images not found: {shown}'
                        + (', ...' if len(missing) > 5 else ''))
    return paths, labels, np.asarray(line_numbers, dtype=np.int64)


def ignored_data_path(config):
    """The notice that ``DATA.DATA_PATH`` (-data_path) is set but not read, as the dataset is
    bundled, or None."""
    if config.DATA.DATA_PATH and config.DATA.DATASET not in FOLDER_DATASETS:
        return f'-data_path {config.DATA.DATA_PATH} has no effect: the {config.DATA.DATASET} dataset is bundled'
    return None


def check_data_path(config):
    """Raises ``DataError`` unless ``DATA.DATA_PATH`` is a folder, for the datasets read from one."""
    if config.DATA.DATASET not in FOLDER_DATASETS:
        return
    if not config.DATA.DATA_PATH:
        raise DataError(f'DATA.DATA_PATH is not set: give -data_path, the folder of the '
                        f'{config.DATA.DATASET} dataset')
    _check_dir(config.DATA.DATA_PATH, 'DATA.DATA_PATH')


def _imagenet2012(config, mode, transform):
    check_data_path(config)
    root = config.DATA.DATA_PATH
    num_classes = config.MODEL.NUM_CLASSES
    list_file = os.path.join(root, f'{mode}_list.txt')
    paths, labels, line_numbers = _read_list_file(root, list_file, num_classes)
    return ImageFileDataset(paths, labels, num_classes, mode, transform, config.SEED, list_file, line_numbers)


def _visible(name):
    """False for hidden names (a leading '.'): ``.ipynb_checkpoints``, macOS's ``._photo.jpg``."""
    return not name.startswith('.')


def find_classes(split_dir):
    """Sorted names of the class folders of ``split_dir``, hidden ones left out."""
    _check_dir(split_dir, 'image folder split')
    classes = sorted(entry.name for entry in os.scandir(split_dir) if entry.is_dir() and _visible(entry.name))
    if not classes:
        raise DataError(f'{split_dir}: no class folders')
    return classes


def image_files_under(folder):
    """Image files (``IMG_EXTENSIONS``, in any case) below ``folder``, sorted folder by folder as
    torchvision's ImageFolder sorts them. Hidden files and folders are left out; symbolic links are
    followed, each folder read once (a link to a folder above is not walked round and round)."""
    found, seen = [], set()
    for path, dirs, names in os.walk(folder, followlinks=True):
        real = os.path.realpath(path)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if _visible(d))
        found.append((path, sorted(n for n in names if _visible(n) and n.lower().endswith(IMG_EXTENSIONS))))
    return [os.path.join(path, name) for path, names in sorted(found) for name in names]


def _image_files(class_dir):
    files = image_files_under(class_dir)
    if not files:
        raise DataError(f'{class_dir}: no image files (extensions {", ".join(IMG_EXTENSIONS)})')
    return files


def _label_order(config, root, mode, folders):
    """The class names in label order and where they come from: ``DATA.CLASS_NAMES`` when set (the
    classes a model learned, which its run's config.yaml records), else the sorted class folders
    of ``root/train`` (so that a ``val/`` lacking a class keeps the labels of the others), else
    ``folders``, those of the split itself."""
    if config.DATA.CLASS_NAMES:
        return list(config.DATA.CLASS_NAMES), 'DATA.CLASS_NAMES'
    train_dir = os.path.join(root, 'train')
    if mode != 'train' and os.path.isdir(train_dir):
        return find_classes(train_dir), f'the class folders of {train_dir}'
    return folders, None


def _imagefolder(config, mode, transform):
    """Images of ``root/<mode>/<class>/...``, each labelled by its class's place in the label order
    (``_label_order``); a class folder outside that order is an error."""
    check_data_path(config)
    root = config.DATA.DATA_PATH
    split_dir = os.path.join(root, mode)
    folders = find_classes(split_dir)
    classes, source = _label_order(config, root, mode, folders)
    unlabelled = [name for name in folders if name not in classes]
    if unlabelled:
        hint = (' (the classes the model learned; -opts DATA.CLASS_NAMES "[]" labels the sorted class folders '
                'instead)' if source == 'DATA.CLASS_NAMES' else '')
        raise DataError(f'{split_dir}: class folders {", ".join(map(repr, unlabelled))} are not among the '
                        f'{len(classes)} classes of {source}{hint}, so they have no label')
    if len(classes) > config.MODEL.NUM_CLASSES:
        raise DataError(f'{split_dir}: {len(classes)} classes, but labels must be in '
                        f'[0, MODEL.NUM_CLASSES={config.MODEL.NUM_CLASSES})')
    label_of = {name: label for label, name in enumerate(classes)}
    paths, labels = [], []
    for name in folders:
        files = _image_files(os.path.join(split_dir, name))
        paths += files
        labels += [label_of[name]] * len(files)
    dataset = ImageFileDataset(paths, labels, len(classes), mode, transform, config.SEED)
    dataset.classes = classes
    dataset.label_source = source or f'the class folders of {split_dir}'
    return dataset


def _check_num_classes(config, num_classes, where):
    if config.MODEL.NUM_CLASSES < num_classes:
        raise DataError(f'{where}: labels 0..{num_classes - 1} need MODEL.NUM_CLASSES >= {num_classes}, '
                        f'got {config.MODEL.NUM_CLASSES}')


def _digits(config, mode, transform):
    _check_num_classes(config, 10, DIGITS_FILE)
    with np.load(DIGITS_FILE) as data:
        keep = data['is_val'] == (mode == 'val')
        images = np.rint(data['images'][keep].astype(np.float32) * (255 / 16)).astype(np.uint8)  # 0..16 -> 0..255
        return ArrayDataset(images, data['labels'][keep], 10, mode, transform, config.SEED)


def _numpy_multiarray():
    try:
        from numpy._core import multiarray
    except ImportError:  # numpy 1.x before 1.26
        from numpy.core import multiarray
    return multiarray


class ArrayUnpickler(pickle.Unpickler):
    """Unpickles containers of numpy arrays (CIFAR's batches): the only globals it hands out are
    numpy's array and scalar constructors, ``ndarray`` and ``dtype``, and ``codecs.encode`` (how
    Python 3 writes bytes in protocol 2); any other raises ``DataError``."""

    ALLOWED = ({(module, name) for module in ('numpy.core.multiarray', 'numpy._core.multiarray')
                for name in ('_reconstruct', 'scalar')}
               | {('numpy', 'ndarray'), ('numpy', 'dtype'), ('_codecs', 'encode')})

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise DataError(f"refused global '{module}.{name}': a CIFAR batch holds only arrays, lists "
                            f"and bytes, and nothing from the file is ever executed")
        if module == '_codecs':
            return codecs.encode
        return getattr(np if module == 'numpy' else _numpy_multiarray(), name)


def _cifar_batch(raw, where, label_key):
    """(images uint8 (N, 32, 32, 3), labels) of one pickled CIFAR batch; ``where`` names it."""
    try:
        batch = ArrayUnpickler(io.BytesIO(raw), encoding='bytes').load()
    except DataError as e:
        raise DataError(f'{where}: {e}') from None
    except Exception as e:  # a truncated or foreign file: whatever pickle raises, name the file
        raise DataError(f'{where}: not a CIFAR batch ({type(e).__name__}: {e})') from e
    data = batch.get(b'data') if isinstance(batch, dict) else None
    labels = np.asarray(batch.get(label_key, []) if isinstance(batch, dict) else [])
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.shape[1:] == (3 * 32 * 32,)
            and labels.shape == (len(data),) and labels.dtype.kind in 'iu'):
        raise DataError(f"{where}: not a CIFAR batch (expected b'data' uint8 (N, 3072) and {label_key!r}, "
                        f"N integer labels)")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels.astype(np.int64)


def _cifar_files(root, archive, folder, names):
    """[(raw bytes, where)] of the batch files ``names`` of ``folder``, read from the extracted
    folder in ``root`` or else from the ``archive`` there."""
    extracted = os.path.join(root, folder)
    if os.path.isdir(extracted):
        files = []
        for name in names:
            path = os.path.join(extracted, name)
            if not os.path.isfile(path):
                raise DataError(f'CIFAR batch not found: {path}')
            with open(path, 'rb') as f:
                files.append((f.read(), path))
        return files
    archive = os.path.join(root, archive)
    if not os.path.isfile(archive):
        raise DataError(f'{root}: neither {folder}/ nor {os.path.basename(archive)} found')
    try:
        with tarfile.open(archive) as tar:
            files = []
            for name in names:
                try:
                    member = tar.extractfile(f'{folder}/{name}')
                except KeyError:
                    member = None
                if member is None:
                    raise DataError(f'{archive}: no {folder}/{name} in the archive')
                files.append((member.read(), f'{archive}:{folder}/{name}'))
            return files
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:  # truncated or corrupt download
        raise DataError(f'{archive}: corrupt or truncated archive ({type(e).__name__}: {e}); download it again, '
                        f'or extract it in {root}') from e


def _cifar(config, mode, transform):
    check_data_path(config)
    archive, folder, train_names, test_names, label_key, num_classes = CIFAR[config.DATA.DATASET]
    _check_num_classes(config, num_classes, config.DATA.DATASET)
    files = _cifar_files(config.DATA.DATA_PATH, archive, folder, train_names if mode == 'train' else test_names)
    batches = [_cifar_batch(raw, where, label_key) for raw, where in files]
    images, labels = (np.concatenate(parts) for parts in zip(*batches))
    if labels.min() < 0 or labels.max() >= num_classes:
        raise DataError(f'{files[0][1]}: labels outside [0, {num_classes})')
    return ArrayDataset(np.ascontiguousarray(images), labels, num_classes, mode, transform, config.SEED)


BUILDERS = {'imagenet2012': _imagenet2012, 'imagefolder': _imagefolder, 'digits': _digits,
            'cifar10': _cifar, 'cifar100': _cifar}  # one for each of config.DATASETS


def build_dataset(config, mode, augment=None):
    """The ``mode`` ('train' or 'val') split of ``DATA.DATASET``, through the training augmentation
    when ``augment`` (by default for 'train') and the evaluation transform otherwise (e.g. the
    training images for a k-NN classifier, ``eval_knn.py``)."""
    if mode not in MODES:
        raise ValueError(f'mode must be one of {MODES}, got {mode!r}')
    augment = mode == 'train' if augment is None else augment
    transform = build_train_transform(config) if augment else build_eval_transform(config)
    dataset = BUILDERS[config.DATA.DATASET](config, mode, transform)
    dataset.mode = 'train' if augment else 'val'  # how items go through the transform
    return dataset


def collate(samples):
    """[(image (3, S, S) float32, label int64), ...] -> (images (B, 3, S, S), labels (B,) int64)."""
    images, labels = zip(*samples)
    return np.stack(images), np.asarray(labels, dtype=np.int64)


READER_JOIN_SECONDS = 10  # for the exception of a failed reader thread to arrive
WORKER_EXIT_SECONDS = 5  # for a loader worker to end when asked to, before it is terminated


class DataLoader(paddle.io.DataLoader):
    """``paddle.io.DataLoader`` whose failures still name the bad file.

    With ``num_workers=0`` batches are loaded right here, so a loading error propagates as it
    is (Paddle's own single-process loader runs a reader thread that dies silently on an error
    and leaves the consumer waiting forever). With workers, Paddle re-raises a worker's
    exception in its reader thread, so this process only gets a generic ``SystemError``. The
    batches that were in flight are then loaded again here, from the first one not yet
    delivered: loading is deterministic, so this raises the original error (e.g. a ``DataError``
    with the file name); if none of them fails, the worker's exception is raised as Paddle
    passed it on. A worker that died without an exception (killed by a signal, e.g. by the
    out-of-memory killer) gives a ``DataError`` saying so, at once.
    """

    def __iter__(self):
        if self.num_workers == 0:
            for indices in self.batch_sampler:
                batch = self.collate_fn([self.dataset[index] for index in indices])
                yield [paddle.to_tensor(array) for array in batch]
            return
        worker_errors = []
        threading.excepthook = functools.partial(_leave_data_errors_to_the_consumer, worker_errors)
        batches = _start_workers(super().__iter__)
        delivered = 0
        try:
            while True:
                try:
                    batch = next(batches)
                except StopIteration:
                    return
                except SystemError as error:
                    _stop_workers(batches)
                    self._raise_worker_error(batches, delivered, worker_errors, error)
                delivered += 1
                yield batch
        finally:
            _stop_workers(batches)  # also when the loop over this loader ends early

    def _raise_worker_error(self, batches, delivered, worker_errors, error):
        """Raises what made Paddle's reader thread stop with ``error`` after ``delivered`` batches."""
        reader = getattr(batches, '_thread', None)
        if reader is not None:
            reader.join(READER_JOIN_SECONDS)  # its exception reaches worker_errors before it ends
        if not worker_errors:
            raise DataError(
                'a data loader worker process died without an error (killed by a signal, e.g. by the '
                f'out-of-memory killer when {self.num_workers} workers (DATA.NUM_WORKERS) need more '
                'memory than is free); fewer workers or a smaller batch need less') from error
        in_flight = self.prefetch_factor * (self.num_workers + 1)  # sent to workers, or queued
        for indices in itertools.islice(self.batch_sampler, delivered, delivered + in_flight):
            for index in indices:
                self.dataset[index]
        raise worker_errors[0] from error


def _leave_data_errors_to_the_consumer(worker_errors, args, report=threading.excepthook):
    """``threading.excepthook`` while a ``DataLoader`` with workers runs: an exception of Paddle's
    reader thread (a worker's, re-raised there) is kept in ``worker_errors`` for
    ``DataLoader.__iter__`` to raise again where the batches are used; a ``DataError``, which
    names its file there, is not printed here (a traceback of the worker's traceback), any other
    exception is also reported by ``report``, Python's hook."""
    if args.exc_type is not None and issubclass(args.exc_type, Exception):
        worker_errors.append(args.exc_value)
    if args.exc_type is None or not issubclass(args.exc_type, DataError):
        report(args)


def _start_workers(start):
    """``start()``, which forks the worker processes, with this process's garbage collected first
    and the rest hidden from the workers' collector (``gc.freeze``): a worker that collected it
    would run its finalizers, and that of a used Paddle queue waits for threads the worker does
    not have (``pthread_cond_destroy``), so the worker never started and loading waited for ever."""
    gc.collect()
    gc.freeze()
    try:
        return start()
    finally:
        gc.unfreeze()


def _stop_workers(batches):
    """Shuts down the worker processes of Paddle's multi-process batch iterator now. Its reader
    thread holds a reference to it, so dropping ours would leave the workers running (and
    later reported as "exit unexpectedly") until the interpreter exits. A worker that has not
    ended ``WORKER_EXIT_SECONDS`` after being asked to is terminated: Paddle would wait for it
    for ever, and one can be stuck for ever (on the result queue's lock, if a killed worker
    held it)."""
    shutdown = getattr(batches, '_try_shutdown_all', None)
    if shutdown is None:
        return
    shutdown(WORKER_EXIT_SECONDS)
    for worker in batches._workers:
        if worker.is_alive():
            worker.terminate()
            worker.join(WORKER_EXIT_SECONDS)


def _end_with_loading_process(loading_pid, worker_id):
    """``worker_init_fn`` of the loader's worker processes (with ``loading_pid`` bound): each ends
    when the process it loads for ends, however it ends (Paddle's workers of a killed process
    stayed, blocked on their queue). The loading process's id is taken before the fork: one that
    died before a worker got here would have left it ``os.getppid()`` of another process."""
    end_with_parent(loading_pid)


def build_dataloader(config, dataset, mode, rank=0, world_size=1):
    """A ``DataLoader`` (a ``paddle.io.DataLoader``) yielding [images float32 (B, 3, S, S), labels int64 (B,)] tensors.

    'train': ``DATA.BATCH_SIZE`` per rank, shuffled per epoch from ``SEED``, repeated augmentation
    when ``TRAIN.REPEATED_AUG``, incomplete batches dropped. 'val': ``DATA.BATCH_SIZE_EVAL``, this
    rank's contiguous shard in order (ranks may get one batch more or less than each other).
    Before each training epoch call ``loader.dataset.set_epoch(e)`` and
    ``loader.batch_sampler.set_epoch(e)``. Workers are ``DATA.NUM_WORKERS`` processes started
    anew for each pass, so they see the current epoch; they end when this process ends.
    """
    if mode == 'train':
        repeats = config.TRAIN.REPEATED_AUG_COUNT if config.TRAIN.REPEATED_AUG else 1
        sampler = TrainBatchSampler(len(dataset), config.DATA.BATCH_SIZE, config.SEED, rank,
                                    world_size, repeats)
        if len(sampler) == 0:
            raise DataError(f'{len(dataset)} training images give no full batch of '
                            f'DATA.BATCH_SIZE={config.DATA.BATCH_SIZE} on each of {world_size} processes')
    elif mode == 'val':
        sampler = EvalBatchSampler(len(dataset), config.DATA.BATCH_SIZE_EVAL, rank, world_size)
    else:
        raise ValueError(f'mode must be one of {MODES}, got {mode!r}')
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=config.DATA.NUM_WORKERS,
                      worker_init_fn=functools.partial(_end_with_loading_process, os.getpid()))
