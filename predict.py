"""Top-5 predictions (or features) of an XCiT for image files and folders.

    python predict.py -cfg configs/xcit_nano_12_p16_224.yaml -pretrained xcit_nano_12_p16_224.pdparams cat.jpg
    python predict.py -model_dir export/xcit_nano_12_p16_224 photos/ -output top5.csv

The model is the dygraph XCiT with ``-pretrained`` weights, or an exported model
(``export_model.py``) run by ``paddle.inference`` with ``-model_dir``, on ``-device`` (by
default the first GPU when Paddle sees one, else the CPU); images go through the evaluation
transform of ``-cfg`` (for an exported model, by default the config.yaml of its folder), at
``-image_size`` if given (as for ``-eval``, ``export_model.py`` and ``visualize_attention.py``),
read by ``-workers`` threads one batch ahead of the model; photos are first turned upright as
their EXIF orientation tag says (training and ``-eval`` read pixels as stored, as the official
code does). Single images are printed as a ranked list. Folders (every image file below them,
sorted) and ``-output`` give a CSV instead: path, the top-5 class indices (all classes for a
model with fewer), their names and their probabilities, to ``-output`` (its folder is created)
or stdout. Class names come from
``-class_names``: a text file (one per line, in class-index order), or the image folder dataset
a model was trained on (``-dataset imagefolder -data_path DIR``: the class folders of
``DIR/train``, in the order training labels them), by default the config's ``DATA.CLASS_NAMES``
(which a training run on an image folder writes in its ``config.yaml``, and ``export_model.py``
keeps with the exported model), else the bundled ImageNet-1k list for 1000-class models. A
model without classifier head (``MODEL.NUM_CLASSES: 0``, e.g. a DINO backbone) gives its
features instead: ``-output FILE.npz`` receives ``paths`` and ``features``
(N, EMBED_DIM), the final-norm class tokens. A file that cannot be read as an image is
reported on stderr and skipped; the exit status is then 1.
"""
import argparse
import csv
import os
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import paddle
from PIL import ImageOps

from config import ConfigError
from datasets import IMAGE_READ_ERRORS, IMG_EXTENSIONS, DataError, find_classes, image_files_under, read_image
from export_model import EXPORT_CONFIG, ExportError, InferenceModel, config_at_size, load_model
from transforms import build_eval_transform
from utils import CheckpointError, OutputWriteError, check_output_file, replacing, resolve_device

TOP_K = 5
DEFAULT_WORKERS = min(4, os.cpu_count() or 1)
IMAGENET_CLASSES = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data', 'imagenet_classes.txt')


def read_class_names(path, num_classes, configured=()):
    """Class names from ``path`` (``class_names_in``); when ``path`` is None, ``configured`` (the
    config's DATA.CLASS_NAMES) if any, else the bundled ImageNet-1k names for a 1000-class model,
    else the class indices as text. None for a model without head (``num_classes`` 0), which then
    must not be given names. Raises ``ConfigError`` naming where the names come from when they
    are not one per class."""
    if num_classes == 0:
        if path is not None:
            raise ConfigError(f'-class_names {path}: a model without classifier head has no classes to name')
        return None
    if path is not None:
        source, names = path, class_names_in(path)
    elif configured:
        source, names = 'DATA.CLASS_NAMES of the config', list(configured)
    elif num_classes == 1000:
        source, names = IMAGENET_CLASSES, class_names_in(IMAGENET_CLASSES)
    else:
        return [str(i) for i in range(num_classes)]
    if len(names) != num_classes:
        raise ConfigError(f'{source}: {len(names)} class names, but the model has {num_classes} classes')
    return names


def class_names_in(path):
    """The names in ``path``: a UTF-8 text file (one per line), or an image folder dataset (see
    ``folder_class_names``). Raises ``ConfigError`` naming ``path`` when it is a file that is not
    UTF-8 text."""
    if os.path.isdir(path):
        return folder_class_names(path)
    try:
        with open(path, encoding='utf-8') as f:
            return [line.strip() for line in f if line.strip()]
    except UnicodeDecodeError as e:
        raise ConfigError(f'-class_names {path}: not UTF-8 text ({e.reason} at byte {e.start}); give a text '
                          f'file of class names, one per line') from e
    except OSError as e:
        raise ConfigError(f'-class_names {path}: cannot read: {e.strerror or e}') from e


def folder_class_names(root):
    """The class names of the image folder dataset ``root`` (``-data_path`` of ``-dataset
    imagefolder``), in label order: its ``train/`` class folders sorted as ``datasets.py`` sorts
    them (by code point: 'B' before 'a'), or, for a folder without ``train/``, its own."""
    split = os.path.join(root, 'train')
    try:
        return find_classes(split if os.path.isdir(split) else root)
    except DataError as e:
        raise ConfigError(f'-class_names {root}: {e}') from e


def image_paths(inputs):
    """(path, from_folder) for each input file and each image file below each input folder;
    raises OSError when there is none."""
    paths = []
    for item in inputs:
        if os.path.isdir(item):
            paths += [(path, True) for path in image_files_under(item)]
        else:
            paths.append((item, False))
    if not paths:
        raise OSError(f'no image files ({", ".join(IMG_EXTENSIONS)}) in {", ".join(inputs)}')
    return paths


def load_image(path, transform):
    """The transformed image, turned upright as its EXIF orientation tag says (as photo viewers
    and OpenCV's ``imread`` show it), or raises OSError naming the problem."""
    try:
        return transform(ImageOps.exif_transpose(read_image(path)))
    except IMAGE_READ_ERRORS as e:
        raise OSError(f'{path}: cannot read the image ({type(e).__name__}: {e})') from e


def top_k(logits, k=TOP_K):
    """Softmax probabilities of the k best classes: (indices (B, k'), probabilities (B, k')), k' =
    min(k, classes)."""
    logits = logits - logits.max(axis=1, keepdims=True)
    probs = np.exp(logits)
    probs /= probs.sum(axis=1, keepdims=True)
    indices = np.argsort(-probs, axis=1, kind='stable')[:, :k]
    return indices, np.take_along_axis(probs, indices, axis=1)


def build_predictor(args):
    """(config, callable images (B, 3, S, S) float32 -> logits (B, classes) ndarray, or the features
    (B, EMBED_DIM) of a model without head) on ``args.device``."""
    if args.model_dir:
        return config_at_size(args.cfg, args.image_size), InferenceModel(args.model_dir, device=args.device)
    paddle.set_device(args.device)
    config, model = load_model(args.cfg, args.pretrained, args.image_size, args.ema)

    def run(images):
        with paddle.no_grad():
            return model(paddle.to_tensor(images)).numpy()
    return config, run


def csv_header(k=TOP_K):
    return (['path'] + [f'index_{i + 1}' for i in range(k)] + [f'name_{i + 1}' for i in range(k)]
            + [f'prob_{i + 1}' for i in range(k)])


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('inputs', nargs='+', metavar='IMAGE_OR_FOLDER',
                        help='image files, or folders: every image file below them, sorted')
    parser.add_argument('-cfg', default=None,
                        help='model YAML config (its DATA section sets the transform); with -model_dir, by '
                             'default the config.yaml export_model.py wrote there')
    weights = parser.add_mutually_exclusive_group(required=True)
    weights.add_argument('-pretrained', help='weights for the dygraph model (.pdparams or training checkpoint)')
    weights.add_argument('-model_dir', help='folder of a model exported by export_model.py')
    parser.add_argument('-ema', action='store_true',
                        help="with -pretrained, the training checkpoint's EMA weights ('model_ema')")
    parser.add_argument('-image_size', type=int, default=None,
                        help="input side in pixels (default: the config's; a model exported with -image_size "
                             'takes only that size)')
    parser.add_argument('-output', default=None,
                        help='write the CSV here (default: stdout); for a model without head, the .npz '
                             'of the features (required)')
    parser.add_argument('-class_names', default=None,
                        help='class names, one per line, or the image folder dataset the model was trained on '
                             '(its train/ class folders, in label order) (default: the config\'s DATA.CLASS_NAMES, '
                             'which a run on an image folder writes in its config.yaml, else ImageNet-1k names '
                             'for 1000 classes)')
    parser.add_argument('-batch_size', type=int, default=16, help='images per forward pass (default 16)')
    parser.add_argument('-workers', type=int, default=DEFAULT_WORKERS,
                        help='threads that read and transform the next batch of images while the model '
                             'runs on this one (default: 4, or the number of CPUs if fewer)')
    parser.add_argument('-device', default=None,
                        help='cpu, gpu or gpu:N (default: the first GPU if Paddle sees one, else the CPU)')
    args = parser.parse_args(argv)
    for name in ('batch_size', 'workers'):
        if getattr(args, name) < 1:
            parser.error(f'-{name} must be > 0, got {getattr(args, name)}')
    if args.ema and args.model_dir:
        parser.error('-ema selects weights of a -pretrained checkpoint; an exported model has its own '
                     '(export it with export_model.py -ema)')
    if args.model_dir and not os.path.isdir(args.model_dir):
        parser.error(f'-model_dir {args.model_dir}: ' + ('a file, not the folder export_model.py writes'
                                                         if os.path.exists(args.model_dir) else 'no such folder'))
    if args.cfg is None:
        exported = os.path.join(args.model_dir, EXPORT_CONFIG) if args.model_dir else None
        if not (exported and os.path.isfile(exported)):
            parser.error('-cfg is required' + (f': {args.model_dir} has no {EXPORT_CONFIG} (exported by an '
                                                f'earlier version); give the config it was exported with'
                                                if args.model_dir else ' with -pretrained'))
        args.cfg = exported
    try:
        args.device = resolve_device(args.device)
    except ValueError as e:
        parser.error(f'argument -device: {e}')
    return args


def readable_batches(paths, transform, batch_size, failed, workers):
    """Yields ``(paths, images (B, 3, S, S) float32)`` of the readable images of ``paths``, in
    order, ``batch_size`` at a time; unreadable files are reported on stderr and appended to
    ``failed``. ``workers`` threads read and transform the next batch while the caller runs the
    model on this one (Pillow decodes and resizes without holding the GIL), so at most two
    batches are in memory."""
    chunks = [paths[start:start + batch_size] for start in range(0, len(paths), batch_size)]
    with ThreadPoolExecutor(workers) as pool:
        def start_reading(chunk):
            return [(path, pool.submit(load_image, path, transform)) for path in chunk]

        reading = []
        for chunk in chunks + [[]]:  # start reading a batch, then hand out the one before it
            loads, reading = reading, start_reading(chunk)
            batch, images = [], []
            for path, load in loads:
                try:
                    images.append(load.result())
                    batch.append(path)
                except OSError as e:
                    print(f'error: {e}', file=sys.stderr)
                    failed.append(path)
            if batch:
                yield batch, np.stack(images)


def check_output_width(outputs, expected, args):
    """Raises ``ExportError`` when an exported model gives other than ``expected`` outputs per
    image (it was exported from another config than ``-cfg``)."""
    if outputs.shape[1] != expected:
        raise ExportError(f'{args.model_dir}: the exported model gives {outputs.shape[1]} outputs per image, but '
                          f'the model of {args.cfg} gives {expected}; give -cfg the config it was exported with')


def write_predictions(predict, batches, names, args, as_csv):
    """Top-5 classes per image: a CSV to ``args.output`` (replaced whole once every image is done,
    so that an interrupted run leaves the previous file) or stdout, or a ranked list per image."""
    if not args.output:
        write_top_k(predict, batches, names, args, sys.stdout, as_csv)
        return
    # surrogateescape: a file or class name that is not valid UTF-8 is written as its own bytes
    with replacing(args.output) as tmp, open(tmp, 'w', newline='', encoding='utf-8', errors='surrogateescape') as out:
        written = write_top_k(predict, batches, names, args, out, as_csv=True)
        keep_unless_written(written, args.output)
    print(f'wrote {written} predictions to {args.output}', file=sys.stderr)


def keep_unless_written(count, output):
    """Raises ``DataError`` when no image was read (``count`` 0), so that ``replacing`` keeps the
    previous ``output`` instead of an empty one."""
    if not count:
        raise DataError(f'no image could be read, so {output} is left as it was')


def write_top_k(predict, batches, names, args, out, as_csv):
    """Writes the top-5 classes of each image to the text stream ``out``; returns the image count."""
    k = min(TOP_K, len(names))
    writer = csv.writer(out) if as_csv else None
    if writer:
        writer.writerow(csv_header(k))
    written = 0
    for batch, images in batches:
        logits = predict(images)
        check_output_width(logits, len(names), args)
        indices, probs = top_k(logits, k)
        for path, idx, prob in zip(batch, indices, probs):
            if writer:
                writer.writerow([path] + [int(i) for i in idx] + [names[i] for i in idx]
                                + [f'{p:.6f}' for p in prob])
            else:
                print(path, file=out)
                for rank, (i, p) in enumerate(zip(idx, prob), 1):
                    print(f'  {rank}. {names[i]} ({i}): {p:.4f}', file=out)
        written += len(batch)
    return written


def write_features(predict, batches, width, args):
    """The outputs of a model without head, its final-norm class tokens, to ``args.output`` (.npz,
    replaced whole at the end): ``paths`` (N,) and ``features`` (N, width) float32, in the order
    of the images."""
    paths, features = [], []
    for batch, images in batches:
        outputs = predict(images)
        check_output_width(outputs, width, args)
        paths += batch
        features.append(outputs.astype(np.float32))
    keep_unless_written(len(paths), args.output)
    features = np.concatenate(features)
    with replacing(args.output) as tmp, open(tmp, 'wb') as f:
        np.savez(f, paths=np.array(paths), features=features)
    print(f'wrote the features of {len(paths)} images to {args.output}', file=sys.stderr)


def main(argv=None):
    args = parse_args(argv)
    try:
        if args.output:  # before the model is built and the images are read, not after
            check_output_file(args.output, '-output')
        config, predict = build_predictor(args)
        features_only = config.MODEL.NUM_CLASSES == 0
        if features_only and not (args.output or '').endswith('.npz'):
            raise ConfigError(f'{args.cfg}: a model without classifier head (MODEL.NUM_CLASSES 0) gives features, '
                              f'not classes: write them with -output FILE.npz')
        names = read_class_names(args.class_names, config.MODEL.NUM_CLASSES, config.DATA.CLASS_NAMES)
        paths = image_paths(args.inputs)
    except (ConfigError, CheckpointError, ExportError, OSError) as e:
        print(f'error: {e}', file=sys.stderr)
        sys.exit(1)
    failed = []
    batches = readable_batches([path for path, _ in paths], build_eval_transform(config), args.batch_size, failed,
                               args.workers)
    try:
        if features_only:
            write_features(predict, batches, config.MODEL.EMBED_DIM, args)
        else:
            as_csv = args.output is not None or any(from_folder for _, from_folder in paths)
            write_predictions(predict, batches, names, args, as_csv)
        error = None
    except (ExportError, DataError, OutputWriteError) as e:
        error = e
    if failed:
        print(f'error: {len(failed)} of {len(paths)} files could not be read', file=sys.stderr)
    if error:
        print(f'error: {error}', file=sys.stderr)
    if failed or error:
        sys.exit(1)


if __name__ == '__main__':
    main()
