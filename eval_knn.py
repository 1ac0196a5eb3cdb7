"""Weighted k-NN classification on an XCiT's features, DINO's evaluation of self-supervised models.

    python eval_knn.py -cfg configs/dino/xcit_small_12_p16_dino.yaml \\
        -pretrained dino_xcit_small_12_p16.pdparams -dataset imagefolder -data_path /dataset/imagenet

The model's final-norm class token (``forward_features``: a backbone without head, or any
classifier's features) is computed for every training and validation image, both through the
evaluation transform of the config, and L2-normalised. Each validation image then takes its
``k`` most similar training images (cosine similarity s) and gives every class the sum of
exp(s / T) over the neighbours of that class; the top-1 and top-5 classes are compared with its
label. Defaults are DINO's (k = 10, 20, 100, 200 and T = 0.07). The model runs in this process on
``-device`` or, with ``-ngpus N``, in N processes (one per GPU, or gloo processes on the CPU),
each on a contiguous share of the images; the features are then gathered, in order, in the first
process, which alone holds them all and votes. On the CPU the model is exported to a
``paddle.inference`` predictor when that gives the same features faster, as ``-eval`` does. The
result is printed per k, its last line is the summary as JSON, also written to
``<output>/knn_summary.json`` with ``-output``; ``-save_features`` also writes the features and
labels to ``<output>/features.npz``.

    python eval_knn.py -ngpus 4 -cfg ... -pretrained ... -data_path /dataset/imagenet  # 4 GPUs
"""
import argparse
import math
import os
import time

import numpy as np
import paddle

import launch
from config import ConfigError, get_config, update_config
from datasets import build_dataloader, build_dataset, check_data_path, ignored_data_path
from engine import EvalForward, exit_on_user_error, log_progress, setup_device
from utils import (check_checkpoint_file, check_output_folder, gather_rows, get_rank, get_world_size,
                   load_every_weight, replacing, resolve_device, setup_logger, to_json, visible_gpus, write_json)
from xcit import build_xcit

DEFAULT_K = (10, 20, 100, 200)
SIMILARITIES_PER_CHUNK = 2 ** 26  # validation images x training images scored at once (256 MiB of float32)
ANY_NUMBER_OF_CLASSES = 2 ** 31 - 1  # the bound on the classes of a dataset that defines them itself


def normalise(features):
    """Rows scaled to unit L2 norm (norms below 1e-12 count as 1e-12, as torch's ``normalize``)."""
    return features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)


def knn_accuracy(train_features, train_labels, test_features, test_labels, k, temperature, num_classes):
    """Top-1 and top-5 accuracy (%) of weighted k-NN voting.

    Features are (N, D) and (M, D) unit rows, labels int (N,) and (M,). A test image's score for
    class c is the sum of exp(similarity / ``temperature``) over those of its ``k`` nearest
    training images (largest dot product) labelled c; classes are ranked by score, ties by
    index. With k < 5, top-5 counts the first k classes (the others have no votes). A test image's
    weights are computed as exp((similarity - its largest similarity) / ``temperature``), the same
    votes scaled by one factor, which cannot overflow however small the temperature.
    """
    num_train = len(train_labels)
    if not 0 < k <= num_train:
        raise ValueError(f'k={k} must be between 1 and the number of training images ({num_train})')
    correct1 = correct5 = 0
    chunk = max(1, SIMILARITIES_PER_CHUNK // num_train)
    for start in range(0, len(test_labels), chunk):
        similarity = test_features[start:start + chunk] @ train_features.T  # (b, N)
        rows = np.arange(len(similarity))[:, None]
        nearest = np.argpartition(similarity, num_train - k, axis=1)[:, num_train - k:]  # the k largest
        scaled = similarity[rows, nearest].astype(np.float64) / temperature
        weights = np.exp(scaled - scaled.max(axis=1, keepdims=True))  # the largest is 1
        scores = np.zeros((len(similarity), num_classes))
        np.add.at(scores, (np.broadcast_to(rows, nearest.shape), train_labels[nearest]), weights)
        ranked = np.argsort(-scores, axis=1, kind='stable')[:, :min(5, k)]
        hits = ranked == test_labels[start:start + chunk, None]
        correct1 += int(hits[:, 0].sum())
        correct5 += int(hits.any(axis=1).sum())
    return 100.0 * correct1 / len(test_labels), 100.0 * correct5 / len(test_labels)


@paddle.no_grad()
def extract_features(forward, loader, what, logger, several_batches, report_freq):
    """(features float32 (N, D) with unit rows, labels int64 (N,)) of the images of ``loader`` and
    of the other processes' loaders, in order, in the first process (the others get no rows; a
    collective call with several processes).

    ``forward`` is an ``engine.EvalForward`` of a model without head (its outputs are the
    features); on its first batch, unless it has chosen already, it chooses between dygraph and
    the exported predictor (``several_batches``: ``EvalForward.worth_trying_inference``)."""
    features = [np.zeros((0, forward.model.num_features), np.float32)]
    labels = [np.zeros(0, np.int64)]
    start = time.time()
    done, world_size = 0, get_world_size()
    for i, (images, batch_labels) in enumerate(loader):
        if forward.path is None:
            forward.choose(images, several_batches, logger)
        features.append(forward(images).numpy().astype(np.float32))
        labels.append(batch_labels.numpy())
        done += len(labels[-1])
        if (i + 1) % report_freq == 0 or i + 1 == len(loader):
            log_progress(logger, f'{what} features', i + 1, len(loader), done * world_size, start)
    return (normalise(gather_rows(np.concatenate(features), everywhere=False)),
            gather_rows(np.concatenate(labels), everywhere=False))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('-cfg', required=True, help='model YAML config (its DATA section sets the transform)')
    parser.add_argument('-pretrained', required=True, help='weights (.pdparams or training checkpoint)')
    parser.add_argument('-ema', action='store_true', help="the training checkpoint's EMA weights ('model_ema')")
    parser.add_argument('-dataset', default=None,
                        help='imagenet2012, imagefolder, cifar10, cifar100 or digits (DATA.DATASET)')
    parser.add_argument('-data_path', default=None, help='dataset folder (DATA.DATA_PATH)')
    parser.add_argument('-batch_size', dest='batch_size_eval', type=int, default=None,
                        help='images per forward pass (DATA.BATCH_SIZE_EVAL)')
    parser.add_argument('-image_size', type=int, default=None, help='input side in pixels (DATA.IMAGE_SIZE)')
    parser.add_argument('-k', type=int, nargs='+', action='extend', default=None,
                        help='numbers of neighbours (default: 10 20 100 200)')
    parser.add_argument('-temperature', type=float, default=0.07,
                        help='T of the exp(similarity / T) votes (default 0.07)')
    parser.add_argument('-num_classes', type=int, default=None,
                        help='labels are in [0, this): needed by list-file datasets when the model has no '
                             'head (default: MODEL.NUM_CLASSES, or 1000 without head; the other datasets give '
                             'their classes)')
    parser.add_argument('-output', default=None,
                        help='folder for knn_summary.json (default: none, the summary is only printed)')
    parser.add_argument('-save_features', action='store_true',
                        help='also write the unit-norm features and the labels to <output>/features.npz')
    parser.add_argument('-device', default=None, help='cpu, gpu or gpu:N (default: the first GPU if any)')
    parser.add_argument('-ngpus', type=int, default=1,
                        help='processes: one per GPU (NCCL), or with -device cpu or no GPU gloo processes '
                             'on the CPU; -1 = every visible GPU, or 2 on the CPU (default 1: this process)')
    parser.add_argument('-opts', nargs='+', action='extend', default=None, metavar='KEY VALUE',
                        help='config overrides (may be repeated)')
    args = parser.parse_args(argv)
    args.k = args.k or list(DEFAULT_K)
    if args.num_classes is not None and args.num_classes < 1:
        parser.error(f'-num_classes must be > 0, got {args.num_classes}')
    if not 0 < args.temperature < math.inf:  # also refuses nan, whose votes would all be nan
        parser.error(f'-temperature must be a number > 0, got {args.temperature}')
    if args.save_features and not args.output:
        parser.error('-save_features writes <output>/features.npz: give -output')
    if args.ngpus != 1 and args.device not in (None, 'cpu', 'gpu'):
        parser.error(f'-device {args.device} picks one GPU, but with -ngpus each process takes its own: '
                     'give -device gpu or cpu')
    try:
        args.device = resolve_device(args.device)
    except ValueError as e:
        parser.error(f'argument -device: {e}')
    return args


def data_config(config, num_classes):
    """``config`` whose MODEL.NUM_CLASSES, which the datasets check labels against, is ``num_classes``.
    By default (None), for list files (whose lines alone give the labels) the model's, or 1000 for a model
    without head; the other datasets define their classes (an image folder's class folders, digits,
    CIFAR), which the votes take as they are, whatever the size of the model's head."""
    config = config.clone()
    config.defrost()
    default = (config.MODEL.NUM_CLASSES or 1000) if config.DATA.DATASET == 'imagenet2012' else ANY_NUMBER_OF_CLASSES
    config.MODEL.NUM_CLASSES = default if num_classes is None else num_classes
    config.freeze()
    return config


# config keys this script does not read (and every TRAIN. one): its flags choose weights, output and processes
UNREAD_KEYS = {'MODEL.PRETRAINED', 'MODEL.RESUME', 'SAVE', 'NGPUS', 'EMA_EVAL', 'EVAL', 'AMP', 'SEED',
               'DATA.BATCH_SIZE', 'SAVE_FREQ', 'VALIDATE_FREQ'}


def read_config(args):
    """The config of the command line (ConfigError for a bad -cfg or -opts, or an -opts key that
    this script would not read)."""
    for key in (args.opts or [])[0::2]:
        if key in UNREAD_KEYS or key.startswith('TRAIN.'):
            raise ConfigError(f'-opts {key}: eval_knn.py does not read it (weights: -pretrained and -ema, '
                              f'output: -output, processes: -ngpus, batch: -batch_size)')
    return update_config(get_config(), argparse.Namespace(
        cfg=args.cfg, dataset=args.dataset, data_path=args.data_path, batch_size_eval=args.batch_size_eval,
        image_size=args.image_size, opts=args.opts))


def set_process_device(args):
    """Selects and returns this process's device: ``-device``, or with several processes on GPUs
    its own GPU (``engine.setup_device``)."""
    if get_world_size() == 1 or args.device == 'cpu':
        paddle.set_device(args.device)
        return args.device
    return setup_device()


def run(args):
    """Extracts the features and votes for every k; returns the summary dict (with several
    processes in the first one, None in the others)."""
    if args.output and get_rank() == 0:  # the first process writes there, once every feature is computed
        check_output_folder(args.output)
    config = read_config(args)
    data = data_config(config, args.num_classes)
    sets = {split: build_dataset(data, split, augment=False) for split in ('train', 'val')}
    for k in args.k:
        if not 0 < k <= len(sets['train']):
            raise ConfigError(f'-k {k}: must be between 1 and the number of training images ({len(sets["train"])})')
    rank, world_size = get_rank(), get_world_size()
    device = set_process_device(args)
    logger = setup_logger(rank=rank)
    notice = ignored_data_path(data)
    if notice:
        logger.info(notice)
    model = build_xcit(config)
    load_every_weight(model, args.pretrained, f'the model of {args.cfg}', args.ema)
    model.reset_classifier(0)  # the votes use the final-norm class token, which forward() now returns
    model.eval()
    forward = EvalForward(model, config.DATA.IMAGE_SIZE, try_inference=device == 'cpu')
    loaders = {split: build_dataloader(data, dataset, 'val', rank, world_size) for split, dataset in sets.items()}
    several_batches = forward.worth_trying_inference(len(loaders['train']))  # chosen on the first training batch
    (train_features, train_labels), (val_features, val_labels) = (
        extract_features(forward, loaders[split], split, logger, several_batches, config.REPORT_FREQ)
        for split in ('train', 'val'))
    if rank > 0:
        return None
    num_classes = max(sets['train'].num_classes, int(train_labels.max()) + 1, int(val_labels.max()) + 1)
    # a first process without images chose no path; then no process tried the predictor (that
    # needs two batches in each), so the others ran in dygraph
    path = forward.path or 'dygraph'
    summary = {'train_images': len(train_labels), 'val_images': len(val_labels),
               'feature_dim': int(train_features.shape[1]), 'temperature': args.temperature, 'path': path,
               'processes': world_size, 'knn': {}}
    for k in args.k:
        acc1, acc5 = knn_accuracy(train_features, train_labels, val_features, val_labels, k, args.temperature,
                                  num_classes)
        summary['knn'][str(k)] = {'acc1': acc1, 'acc5': acc5}
        logger.info(f'{k}-NN (T={args.temperature}): Acc@1 {acc1:.2f}% Acc@5 {acc5:.2f}% '
                    f'({len(val_labels)} images against {len(train_labels)}, {path})')
    if args.output:
        write_json(os.path.join(args.output, 'knn_summary.json'), summary)
        if args.save_features:
            with replacing(os.path.join(args.output, 'features.npz')) as tmp, open(tmp, 'wb') as f:
                np.savez(f, train_features=train_features, train_labels=train_labels, val_features=val_features,
                         val_labels=val_labels)
    print(to_json(summary), flush=True)
    return summary


def check_inputs(args):
    """The errors the processes would meet, raised before any starts: a bad config, data folder,
    weights path or output folder (which is created)."""
    check_data_path(read_config(args))
    check_checkpoint_file(args.pretrained)
    if args.output:
        check_output_folder(args.output)


def job(args):
    """The work of each of the -ngpus processes: ``run``, ending with one error line on bad input."""
    return exit_on_user_error(run, args)


def main(argv=None):
    """Runs with the command line ``argv``; returns the summary when run in this process."""
    args = parse_args(argv)
    gpus = 0 if args.device == 'cpu' else visible_gpus()
    return exit_on_user_error(launch.run_job, job, args, args.ngpus, gpus, '-ngpus', check_inputs)


if __name__ == '__main__':
    main()
