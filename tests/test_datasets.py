"""Datasets, samplers and loaders: layouts built from generated images, the bundled digits, every
bad-input error, rank sharding, and the determinism of the training stream."""
import io
import multiprocessing
import os
import pickle
import re
import signal
import subprocess
import sys
import tarfile
import time
import warnings

import numpy as np
import paddle
import pytest
from PIL import Image

from conftest import ROOT, running, wait_for
from config import ConfigError, get_config, merge_from_list
import datasets
from datasets import DataError, build_dataloader, build_dataset
from samplers import EvalBatchSampler, TrainBatchSampler
from transforms import build_eval_transform


def make_config(**opts):
    config = get_config()
    config.defrost()
    base = {'DATA.IMAGE_SIZE': 16, 'DATA.NUM_WORKERS': 0, 'MODEL.NUM_CLASSES': 10}
    base.update(opts)
    merge_from_list(config, [item for pair in base.items() for item in pair])
    return config


def write_image(path, seed, size=(20, 14)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def eval_of(path, config):
    with Image.open(path) as img:
        return build_eval_transform(config)(img)


# ------------------------------------------------------------------ digits


def test_digits_split_sizes_and_pixels():
    config = make_config(**{'DATA.DATASET': 'digits'})
    train, val = build_dataset(config, 'train'), build_dataset(config, 'val')
    assert (len(train), len(val), train.num_classes) == (1438, 359, 10)
    np.testing.assert_array_equal(np.bincount(train.labels), [142, 146, 142, 146, 145, 146, 145, 143, 139, 144])
    np.testing.assert_array_equal(np.bincount(val.labels), [36, 36, 35, 37, 36, 36, 36, 36, 35, 36])
    assert train.images.shape == (1438, 8, 8) and train.images.max() == 255  # 0..16 stretched
    image, label = val[0]
    assert image.shape == (3, 16, 16) and image.dtype == np.float32 and label.dtype == np.int64
    gray = Image.fromarray(val.images[0]).convert('RGB')
    np.testing.assert_array_equal(image, build_eval_transform(config)(gray))
    assert not np.array_equal(image[0], image[1])  # per-channel normalisation of a gray image


def test_digits_need_ten_classes():
    with pytest.raises(DataError, match='digits.npz.*NUM_CLASSES'):
        build_dataset(make_config(**{'DATA.DATASET': 'digits', 'MODEL.NUM_CLASSES': 9}), 'val')


# ------------------------------------------------------------------ CIFAR


def cifar_batch(seed, count, label_key, num_classes, numpy_labels=False):
    """A CIFAR "python version" batch as pickled bytes (protocol 2, bytes keys, as the originals;
    labels Python ints as there, or numpy integers as in some re-saved copies)."""
    rng = np.random.default_rng(seed)
    labels = list(rng.integers(0, num_classes, count))
    batch = {b'data': rng.integers(0, 256, (count, 3072), dtype=np.uint8),
             label_key: labels if numpy_labels else [int(v) for v in labels], b'batch_label': b'test'}
    return pickle.dumps(batch, protocol=2)


def write_cifar10(root, count=4):
    """An extracted cifar-10-batches-py with ``count`` images per batch; returns the batches."""
    folder = root / 'cifar-10-batches-py'
    folder.mkdir(parents=True)
    batches = {name: cifar_batch(i, count, b'labels', 10)
               for i, name in enumerate([f'data_batch_{i}' for i in range(1, 6)] + ['test_batch'])}
    for name, raw in batches.items():
        (folder / name).write_bytes(raw)
    return batches


def test_cifar10_from_the_extracted_folder(tmp_path):
    batches = write_cifar10(tmp_path)
    config = make_config(**{'DATA.DATASET': 'cifar10', 'DATA.DATA_PATH': str(tmp_path)})
    train, val = build_dataset(config, 'train'), build_dataset(config, 'val')
    assert (len(train), len(val), train.num_classes) == (20, 4, 10)
    test = pickle.loads(batches['test_batch'], encoding='bytes')
    np.testing.assert_array_equal(val.labels, test[b'labels'])
    # row-major planes R, G, B of 32 x 32 pixels -> an RGB image
    expected = Image.fromarray(test[b'data'][2].reshape(3, 32, 32).transpose(1, 2, 0))
    image, label = val[2]
    np.testing.assert_array_equal(image, build_eval_transform(config)(expected))
    assert label == test[b'labels'][2]
    first = pickle.loads(batches['data_batch_1'], encoding='bytes')
    np.testing.assert_array_equal(train.labels[:4], first[b'labels'])


def test_cifar100_from_the_archive_and_its_fine_labels(tmp_path):
    with tarfile.open(tmp_path / 'cifar-100-python.tar.gz', 'w:gz') as tar:
        for i, name in enumerate(['train', 'test']):
            raw = cifar_batch(i, 6 - 2 * i, b'fine_labels', 100, numpy_labels=True)
            info = tarfile.TarInfo(f'cifar-100-python/{name}')
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    config = make_config(**{'DATA.DATASET': 'cifar100', 'DATA.DATA_PATH': str(tmp_path), 'MODEL.NUM_CLASSES': 100})
    train, val = build_dataset(config, 'train'), build_dataset(config, 'val')
    assert (len(train), len(val), train.num_classes) == (6, 4, 100)
    expected = pickle.loads(cifar_batch(1, 4, b'fine_labels', 100), encoding='bytes')[b'fine_labels']
    np.testing.assert_array_equal(val.labels, expected)
    with pytest.raises(DataError, match=r'labels 0\.\.99 need MODEL.NUM_CLASSES >= 100, got 10'):
        build_dataset(make_config(**{'DATA.DATASET': 'cifar100', 'DATA.DATA_PATH': str(tmp_path)}), 'val')


@pytest.mark.parametrize('kept', [0.0, 0.1, 0.5])
def test_a_corrupt_or_truncated_cifar_archive_is_named(tmp_path, kept):
    archive = tmp_path / 'cifar-10-python.tar.gz'
    with tarfile.open(archive, 'w:gz') as tar:
        for i, name in enumerate([f'data_batch_{i}' for i in range(1, 6)]):
            raw = cifar_batch(i, 4, b'labels', 10)
            info = tarfile.TarInfo(f'cifar-10-batches-py/{name}')
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    raw = archive.read_bytes()
    archive.write_bytes(raw[:int(len(raw) * kept)] if kept else b'not a tar archive')
    config = make_config(**{'DATA.DATASET': 'cifar10', 'DATA.DATA_PATH': str(tmp_path)})
    with pytest.raises(DataError, match=re.escape(f'{archive}: corrupt or truncated archive (')):
        build_dataset(config, 'train')


class RunsACommand:
    def __reduce__(self):
        return os.system, ('touch pwned',)


def test_cifar_batches_never_run_code_and_bad_ones_are_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_cifar10(tmp_path)
    config = make_config(**{'DATA.DATASET': 'cifar10', 'DATA.DATA_PATH': str(tmp_path)})
    test_batch = tmp_path / 'cifar-10-batches-py' / 'test_batch'
    test_batch.write_bytes(pickle.dumps({b'data': RunsACommand(), b'labels': []}, protocol=2))
    with pytest.raises(DataError, match=f"{test_batch}: refused global '(posix|nt).system'"):
        build_dataset(config, 'val')
    assert not (tmp_path / 'pwned').exists()
    for content in (b'truncated', pickle.dumps({b'data': np.zeros((2, 3072), np.uint8), b'labels': 7}),
                    pickle.dumps(['not', 'a', 'dict'])):
        test_batch.write_bytes(content)
        with pytest.raises(DataError, match=f'{test_batch}: not a CIFAR batch'):
            build_dataset(config, 'val')
    (tmp_path / 'cifar-10-batches-py' / 'data_batch_3').unlink()
    with pytest.raises(DataError, match='CIFAR batch not found: .*data_batch_3'):
        build_dataset(config, 'train')
    empty = tmp_path / 'empty'
    empty.mkdir()
    with pytest.raises(DataError, match='neither cifar-10-batches-py/ nor cifar-10-python.tar.gz found'):
        build_dataset(make_config(**{'DATA.DATASET': 'cifar10', 'DATA.DATA_PATH': str(empty)}), 'val')


# ------------------------------------------------------------------ imagefolder and imagenet2012


@pytest.fixture
def folder(tmp_path):
    """train/ and val/ with classes 'cat', 'dog', 'emu' (JPEG, PNG, nested, upper-case extension)."""
    tmp_path = tmp_path / 'folder'
    for split, n in [('train', 3), ('val', 2)]:
        for c, name in enumerate(['dog', 'cat', 'emu']):
            for i in range(n):
                write_image(str(tmp_path / split / name / f'{i}.jpg'), 100 * c + i)
        write_image(str(tmp_path / split / 'cat' / 'deeper' / 'x.PNG'), 7)
        (tmp_path / split / 'cat' / 'notes.txt').write_text('not an image')
    return tmp_path


def test_imagefolder_layout(folder):
    config = make_config(**{'DATA.DATASET': 'imagefolder', 'DATA.DATA_PATH': str(folder)})
    val = build_dataset(config, 'val')
    assert val.classes == ['cat', 'dog', 'emu'] and val.num_classes == 3
    assert val.label_source == f'the class folders of {folder / "train"}'
    rel = [os.path.relpath(p, folder / 'val') for p in val.paths]
    assert rel == ['cat/0.jpg', 'cat/1.jpg', 'cat/deeper/x.PNG', 'dog/0.jpg', 'dog/1.jpg', 'emu/0.jpg', 'emu/1.jpg']
    np.testing.assert_array_equal(val.labels, [0, 0, 0, 1, 1, 2, 2])
    image, label = val[3]
    np.testing.assert_array_equal(image, eval_of(val.paths[3], config))
    assert label == 1
    assert len(build_dataset(config, 'train')) == 10


def imagefolder_config(root, **opts):
    return make_config(**{'DATA.DATASET': 'imagefolder', 'DATA.DATA_PATH': str(root), **opts})


def test_a_val_split_without_some_classes_keeps_the_training_labels(folder):
    """Labels follow the train/ class folders, so a val/ lacking 'dog' still labels 'emu' 2."""
    for f in (folder / 'val' / 'dog').iterdir():
        f.unlink()
    (folder / 'val' / 'dog').rmdir()
    val = build_dataset(imagefolder_config(folder), 'val')
    assert val.classes == ['cat', 'dog', 'emu'] and val.num_classes == 3
    np.testing.assert_array_equal(val.labels, [0, 0, 0, 2, 2])


def test_configured_class_names_label_the_folders_by_name(folder):
    """DATA.CLASS_NAMES (a trained run's config.yaml records the classes it learned) gives the
    labels, whatever the folders' sorted order or how many of them there are."""
    config = imagefolder_config(folder, **{'DATA.CLASS_NAMES': ['emu', 'dog', 'cat', 'gnu'], 'MODEL.NUM_CLASSES': 4})
    for mode in ('train', 'val'):
        dataset = build_dataset(config, mode)
        assert dataset.classes == ['emu', 'dog', 'cat', 'gnu'] and dataset.num_classes == 4
        assert dataset.label_source == 'DATA.CLASS_NAMES'
    np.testing.assert_array_equal(dataset.labels, [2, 2, 2, 1, 1, 0, 0])
    config = imagefolder_config(folder, **{'DATA.CLASS_NAMES': ['cat', 'dog', 'yak']})
    with pytest.raises(DataError, match=r"val: class folders 'emu' are not among the 3 classes of "
                                        r"DATA.CLASS_NAMES \(the classes the model learned; -opts "
                                        r"DATA.CLASS_NAMES \"\[\]\" labels the sorted class folders instead\)"):
        build_dataset(config, 'val')


def test_hidden_entries_are_left_out_and_linked_folders_read_once(folder):
    """Hidden folders and files (a notebook's checkpoints, macOS's AppleDouble ``._x.jpg``) are not
    classes or images; a symbolic link back to a folder above is not walked round and round."""
    write_image(str(folder / 'val' / '.ipynb_checkpoints' / 'a.jpg'), 1)
    write_image(str(folder / 'val' / 'cat' / '.cache' / 'b.jpg'), 2)
    (folder / 'val' / 'cat' / '._0.jpg').write_bytes(b'\x00\x05\x16\x07 AppleDouble')
    os.symlink('..', folder / 'val' / 'cat' / 'deeper' / 'up')
    val = build_dataset(imagefolder_config(folder), 'val')
    rel = [os.path.relpath(p, folder / 'val') for p in val.paths]
    assert rel == ['cat/0.jpg', 'cat/1.jpg', 'cat/deeper/x.PNG', 'dog/0.jpg', 'dog/1.jpg', 'emu/0.jpg', 'emu/1.jpg']


def write_list(root, name, lines):
    (root / name).write_text(''.join(line + '\n' for line in lines), encoding='utf-8')
    return str(root / name)


@pytest.fixture
def imagenet(tmp_path):
    write_image(str(tmp_path / 'train' / 'n01' / 'a.JPEG'), 1)
    write_image(str(tmp_path / 'train' / 'n02' / 'b c.png'), 2)  # a space in the name
    write_image(str(tmp_path / 'val' / 'v1.JPEG'), 3)
    write_list(tmp_path, 'train_list.txt', ['train/n01/a.JPEG 0', '', 'train/n02/b c.png 9'])
    write_list(tmp_path, 'val_list.txt', ['val/v1.JPEG 4'])
    return tmp_path


def test_imagenet2012_layout(imagenet):
    config = make_config(**{'DATA.DATASET': 'imagenet2012', 'DATA.DATA_PATH': str(imagenet)})
    train = build_dataset(config, 'train')
    assert len(train) == 2 and train.num_classes == 10
    np.testing.assert_array_equal(train.labels, [0, 9])
    assert train.paths[1] == os.path.join(str(imagenet), 'train/n02/b c.png')
    image, label = build_dataset(config, 'val')[0]
    np.testing.assert_array_equal(image, eval_of(imagenet / 'val' / 'v1.JPEG', config))
    assert label == 4


def test_list_files_with_a_byte_order_mark(imagenet):
    """Windows editors may start a UTF-8 file with a byte-order mark; it is not part of the first path."""
    (imagenet / 'val_list.txt').write_text('val/v1.JPEG 4\r\n', encoding='utf-8-sig')
    val = build_dataset(make_config(**{'DATA.DATASET': 'imagenet2012', 'DATA.DATA_PATH': str(imagenet)}), 'val')
    assert val.paths == [os.path.join(str(imagenet), 'val/v1.JPEG')] and val.labels.tolist() == [4]


# ------------------------------------------------------------------ bad input


def imagenet_config(root):
    return make_config(**{'DATA.DATASET': 'imagenet2012', 'DATA.DATA_PATH': str(root)})


@pytest.mark.parametrize('line,message', [
    ('val/v1.JPEG', r"val_list.txt line 2: expected 'relative/path label'"),
    ('val/v1.JPEG cat', r"val_list.txt line 2: expected 'relative/path label'"),
    ('val/v1.JPEG --3', r"val_list.txt line 2: expected 'relative/path label'"),
    ('val/v1.JPEG \u00b3', r"val_list.txt line 2: expected 'relative/path label'"),  # a digit to str.isdigit
    ('val/v1.JPEG 10', r'val_list.txt line 2: label 10 outside \[0, MODEL.NUM_CLASSES=10\)'),
    ('val/v1.JPEG -1', r'val_list.txt line 2: label -1 outside'),
])
def test_bad_list_lines_fail_when_built(imagenet, line, message):
    write_list(imagenet, 'val_list.txt', ['val/v1.JPEG 1', line])
    with pytest.raises(DataError, match=message):
        build_dataset(imagenet_config(imagenet), 'val')


def test_list_files_that_are_not_utf8_name_the_line(imagenet):
    (imagenet / 'val_list.txt').write_bytes(b'val/v1.JPEG 1\r\nval/caf\xe9.jpg 2\r\n')
    with pytest.raises(DataError, match=r'val_list.txt line 2: not UTF-8 text \(byte 0xe9\)'):
        build_dataset(imagenet_config(imagenet), 'val')


def test_missing_images_fail_when_built_undecodable_ones_when_loaded(imagenet):
    """A missing file is found before any training or evaluation starts; an undecodable one
    when it is read. Both name the file and its line."""
    (imagenet / 'val' / 'broken.jpg').write_bytes(b'\xff\xd8 not really a jpeg')
    write_list(imagenet, 'val_list.txt', ['val/v1.JPEG 1', 'val/missing.jpg 2', 'val/broken.jpg 3'])
    with pytest.raises(DataError, match=r'val_list.txt: 1 of 3 listed images not found: .*missing.jpg \(line 2\)'):
        build_dataset(imagenet_config(imagenet), 'val')
    write_list(imagenet, 'val_list.txt', ['val/v1.JPEG 1', 'val/broken.jpg 3'])
    dataset = build_dataset(imagenet_config(imagenet), 'val')
    dataset[0]
    with pytest.raises(DataError, match=r'broken.jpg \(.*val_list.txt line 2\)'):
        dataset[1]


def test_floating_point_images_name_the_file(imagenet):
    Image.fromarray(np.ones((8, 8), np.float32)).save(imagenet / 'val' / 'depth.tif')
    write_list(imagenet, 'val_list.txt', ['val/v1.JPEG 1', 'val/depth.tif 2'])
    dataset = build_dataset(imagenet_config(imagenet), 'val')
    with pytest.raises(DataError, match=r'depth.tif \(.*val_list.txt line 2\): a floating-point image'):
        dataset[1]


def test_decompression_bomb_warnings_name_every_file(imagenet, monkeypatch):
    """PIL warns once per process without a file name; here every large image is named (under
    Python's default warning filter) and still read. Twice the limit is an error naming the file."""
    write_image(str(imagenet / 'val' / 'v2.JPEG'), 4)  # the same size as v1
    write_list(imagenet, 'val_list.txt', ['val/v1.JPEG 1', 'val/v2.JPEG 2'])
    dataset = build_dataset(imagenet_config(imagenet), 'val')
    width, height = Image.open(dataset.paths[0]).size
    monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', width * height - 1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('default')
        assert [dataset[i][0].shape for i in range(2)] == [(3, 16, 16)] * 2
    ours = [str(w.message) for w in caught if str(w.message).startswith(tuple(dataset.paths))]
    assert ours == [f'{path}: {width * height} pixels, above the {width * height - 1} at which PIL suspects '
                    f'a decompression bomb' for path in dataset.paths]
    monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', width * height // 2 - 1)
    with pytest.raises(DataError, match=re.escape(dataset.paths[0]) + r' \(.*val_list.txt line 1\): .*decompression bomb'):
        dataset[0]


@pytest.mark.parametrize('workers', [0, 1])
def test_loader_errors_keep_the_file_name(imagenet, workers):
    (imagenet / 'val' / 'broken.jpg').write_bytes(b'\xff\xd8 not really a jpeg')
    write_list(imagenet, 'val_list.txt', ['val/v1.JPEG 1', 'val/broken.jpg 2'])
    config = imagenet_config(imagenet)
    config.DATA.NUM_WORKERS = workers
    loader = build_dataloader(config, build_dataset(config, 'val'), 'val')
    with pytest.raises(DataError, match=r'broken.jpg \(.*val_list.txt line 2\)'):
        list(loader)


class FailingInWorkers(paddle.io.Dataset):
    """400 items of which item 40 fails in a loader worker only: ``kill`` kills the worker (as the
    out-of-memory killer would), otherwise it raises an error that this process does not
    reproduce. Meanwhile the other worker is stuck for ``STUCK_SECONDS`` on item 44 (as a worker
    blocked on a lock that the killed one held would be for ever). Counts the items this process
    loads itself."""

    STUCK_SECONDS = 120

    def __init__(self, kill):
        self.kill, self.loaded_here = kill, 0

    def __len__(self):
        return 400

    def __getitem__(self, index):
        if paddle.io.get_worker_info() is None:
            self.loaded_here += 1
        elif index == 40:
            if self.kill:
                os.kill(os.getpid(), signal.SIGKILL)
            raise DataError('item 40: a passing read error')
        elif index == 44:
            time.sleep(self.STUCK_SECONDS)
        return np.zeros((3, 2, 2), np.float32), np.int64(index)


@pytest.mark.parametrize('kill', [True, False], ids=['killed worker', 'error only a worker raises'])
def test_loader_worker_failures_that_do_not_reproduce_here(kill):
    """A worker that dies without an exception is named as such, at once; an error that loading
    the batches in flight here again does not reproduce is raised as the worker raised it. Either
    way the rest of the pass is not loaded here one item at a time, and a worker that does not
    stop when asked is not waited for."""
    dataset = FailingInWorkers(kill)
    loader = datasets.DataLoader(dataset, batch_sampler=paddle.io.BatchSampler(dataset, batch_size=4),
                                 collate_fn=datasets.collate, num_workers=2)
    message = 'a data loader worker process died without an error' if kill else 'item 40: a passing read error'
    started = time.monotonic()
    with pytest.raises(DataError, match=message):
        list(loader)
    assert time.monotonic() - started < FailingInWorkers.STUCK_SECONDS / 2
    in_flight = loader.prefetch_factor * (loader.num_workers + 1) * 4
    assert dataset.loaded_here <= (0 if kill else in_flight)


def test_missing_paths_and_empty_datasets(tmp_path, folder):
    with pytest.raises(DataError, match='DATA.DATA_PATH not found: .*nowhere'):
        build_dataset(imagenet_config(tmp_path / 'nowhere'), 'val')
    with pytest.raises(DataError, match='list file not found: .*train_list.txt'):
        build_dataset(imagenet_config(tmp_path), 'train')
    write_list(tmp_path, 'val_list.txt', ['', '  '])
    with pytest.raises(DataError, match='val_list.txt: no images listed'):
        build_dataset(imagenet_config(tmp_path), 'val')

    def imagefolder(root):
        return make_config(**{'DATA.DATASET': 'imagefolder', 'DATA.DATA_PATH': str(root)})
    with pytest.raises(DataError, match='image folder split not found: .*train'):
        build_dataset(imagefolder(tmp_path), 'train')
    (tmp_path / 'train').mkdir()
    with pytest.raises(DataError, match='train: no class folders'):
        build_dataset(imagefolder(tmp_path), 'train')
    (folder / 'val' / 'emu' / 'empty').mkdir()
    os.rename(folder / 'val' / 'emu', folder / 'val' / 'gnu')
    with pytest.raises(DataError, match=r"val: class folders 'gnu' are not among the 3 classes of the class "
                                        r"folders of .*train, so they have no label"):
        build_dataset(imagefolder(folder), 'val')
    (folder / 'train' / 'emu').rename(folder / 'train' / 'gnu')
    for f in (folder / 'val' / 'gnu').glob('*.jpg'):
        f.unlink()
    with pytest.raises(DataError, match='gnu: no image files'):
        build_dataset(imagefolder(folder), 'val')


def test_imagefolder_with_more_classes_than_the_model(folder):
    config = make_config(**{'DATA.DATASET': 'imagefolder', 'DATA.DATA_PATH': str(folder), 'MODEL.NUM_CLASSES': 2})
    with pytest.raises(DataError, match=r'3 classes, but labels must be in \[0, MODEL.NUM_CLASSES=2\)'):
        build_dataset(config, 'train')


def test_unknown_dataset_and_mode():
    with pytest.raises(ConfigError, match='DATA.DATASET'):
        build_dataset(make_config(**{'DATA.DATASET': 'cifar'}), 'val')
    with pytest.raises(ValueError, match='mode'):
        build_dataset(make_config(**{'DATA.DATASET': 'digits'}), 'test')


# ------------------------------------------------------------------ samplers


@pytest.mark.parametrize('world_size', [1, 2, 3])
def test_eval_shards_cover_every_index_once(world_size):
    shards = [[i for b in EvalBatchSampler(17, 4, rank, world_size) for i in b] for rank in range(world_size)]
    assert sorted(i for shard in shards for i in shard) == list(range(17))
    assert all(shard == sorted(shard) for shard in shards)
    assert all(len(b) <= 4 for rank in range(world_size) for b in EvalBatchSampler(17, 4, rank, world_size))


def epoch_batches(num_samples, batch_size, world_size, repeats=1, epoch=0, seed=0):
    samplers = [TrainBatchSampler(num_samples, batch_size, seed, r, world_size, repeats) for r in range(world_size)]
    for s in samplers:
        s.set_epoch(epoch)
    return [list(s) for s in samplers]


@pytest.mark.parametrize('repeats', [1, 3])
def test_train_global_batches_do_not_depend_on_world_size(repeats):
    single, = epoch_batches(50, 8, 1, repeats)
    two = epoch_batches(50, 4, 2, repeats)
    assert len(single) == len(two[0]) == len(two[1]) == 6
    for b, batch in enumerate(single):
        assert sorted(batch) == sorted(two[0][b] + two[1][b])


def test_train_shuffle_is_seeded_per_epoch_without_duplicates():
    rank0, rank1 = epoch_batches(50, 4, 2)
    seen = [i for b in rank0 + rank1 for i in b]
    assert len(seen) == len(set(seen)) == 48 and max(seen) < 50
    assert epoch_batches(50, 4, 2) == [rank0, rank1]
    assert epoch_batches(50, 4, 2, epoch=1) != [rank0, rank1]
    assert epoch_batches(50, 4, 2, seed=1) != [rank0, rank1]


def test_repeated_augmentation_spreads_copies_over_ranks():
    ranks = epoch_batches(30, 5, 3, repeats=3)
    for r, batches in enumerate(ranks):
        indices = [i for b in batches for i in b]
        assert len(indices) == 10
        assert all(i // 30 == r for i in indices)  # with 3 ranks, rank r gets copy r of each image
    images = [[i % 30 for b in batches for i in b] for batches in ranks]
    assert images[0] == images[1] == images[2] and len(set(images[0])) == 10


# ------------------------------------------------------------------ loaders


def set_epoch(loader, epoch):
    loader.dataset.set_epoch(epoch)
    loader.batch_sampler.set_epoch(epoch)


def digits_loader(mode, epoch=0, **opts):
    config = make_config(**{'DATA.DATASET': 'digits', 'DATA.BATCH_SIZE': 8, 'DATA.BATCH_SIZE_EVAL': 100, **opts})
    loader = build_dataloader(config, build_dataset(config, mode), mode)
    if mode == 'train':  # the evaluation order does not depend on the epoch
        set_epoch(loader, epoch)
    return loader


def first_batches(loader, count=2):
    out = []
    for images, labels in loader:
        assert isinstance(images, paddle.Tensor) and images.dtype == paddle.float32
        assert isinstance(labels, paddle.Tensor) and labels.dtype == paddle.int64
        out.append((images.numpy(), labels.numpy()))
        if len(out) == count:
            break
    return out


def test_val_loader_yields_the_whole_split_in_order():
    batches = first_batches(digits_loader('val'), count=10)
    assert [len(b[1]) for b in batches] == [100, 100, 100, 59]
    assert batches[0][0].shape == (100, 3, 16, 16)


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for (x0, y0), (x1, y1) in zip(a, b):
        np.testing.assert_array_equal(x0, x1)
        np.testing.assert_array_equal(y0, y1)


def test_train_stream_depends_on_seed_and_epoch_not_on_workers():
    with_workers = digits_loader('train', **{'DATA.NUM_WORKERS': 2})
    epoch0 = first_batches(with_workers)
    set_epoch(with_workers, 1)
    epoch1 = first_batches(with_workers)  # workers start anew and see the new epoch
    assert_same_batches(epoch0, first_batches(digits_loader('train', epoch=0)))
    assert_same_batches(epoch1, first_batches(digits_loader('train', epoch=1)))
    assert not np.array_equal(epoch0[0][1], epoch1[0][1])
    assert not np.array_equal(epoch0[0][0], first_batches(digits_loader('train', **{'SEED': 1}))[0][0])


def test_leaving_a_loop_early_stops_the_workers_at_once():
    before = set(multiprocessing.active_children())
    loader = digits_loader('train', **{'DATA.NUM_WORKERS': 2})
    assert len(first_batches(loader, count=1)) == 1
    assert set(multiprocessing.active_children()) <= before  # the two workers are gone


def test_repeated_copies_get_different_augmentations():
    config = make_config(**{'DATA.DATASET': 'digits'})
    dataset = build_dataset(config, 'train')
    (a, label_a), (b, label_b) = dataset[5], dataset[5 + len(dataset)]
    assert label_a == label_b and not np.array_equal(a, b)
    np.testing.assert_array_equal(a, dataset[5][0])


def test_train_loader_needs_one_full_batch():
    config = make_config(**{'DATA.DATASET': 'digits', 'DATA.BATCH_SIZE': 1024})
    with pytest.raises(DataError, match='no full batch'):
        build_dataloader(config, build_dataset(config, 'train'), 'train', rank=1, world_size=2)


LOADING = """\
import sys
import time

sys.path.insert(0, {root!r})
from config import get_config
from datasets import build_dataloader, build_dataset

config = get_config()
config.defrost()
config.DATA.DATASET, config.MODEL.NUM_CLASSES, config.DATA.IMAGE_SIZE, config.DATA.NUM_WORKERS = 'digits', 10, 32, 2
config.freeze()
for batch in build_dataloader(config, build_dataset(config, 'val'), 'val'):
    print('loading', flush=True)
    time.sleep(300)
"""


def children(pid):
    """The ids of the processes whose parent is ``pid`` (Linux: reads /proc)."""
    found = []
    for entry in filter(str.isdigit, os.listdir('/proc')):
        try:
            with open(f'/proc/{entry}/stat') as f:
                if int(f.read().rpartition(')')[2].split()[1]) == pid:
                    found.append(int(entry))
        except (FileNotFoundError, ProcessLookupError):  # ended meanwhile
            continue
    return found


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='reads /proc')
def test_loader_workers_end_when_the_loading_process_is_killed(tmp_path):
    """Paddle's worker processes of a killed process stayed, blocked on their queue."""
    script = tmp_path / 'load.py'
    script.write_text(LOADING.format(root=ROOT))
    loading = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                               text=True)
    workers = []
    try:
        assert loading.stdout.readline() == 'loading\n'
        workers = children(loading.pid)
        assert len(workers) == 2
        loading.kill()
        loading.wait(timeout=30)
        assert wait_for(lambda: not any(map(running, workers)), 10)
    finally:
        for pid in workers:
            if running(pid):
                os.kill(pid, 9)
        if loading.poll() is None:
            loading.kill()
        loading.stdout.close()


def test_loader_workers_watch_the_process_that_built_the_loader(monkeypatch):
    """The loading process's id is bound when the loader is built: a worker that read its parent's
    id only once it ran would watch another process if the loading one had died meanwhile."""
    watched = []
    monkeypatch.setattr(datasets, 'end_with_parent', watched.append)
    monkeypatch.setattr(os, 'getppid', lambda: 1)  # as a worker orphaned before its start would see
    config = make_config(**{'DATA.DATASET': 'digits'})
    build_dataloader(config, build_dataset(config, 'val'), 'val').worker_init_fn(0)
    assert watched == [os.getpid()]


GARBAGE_THEN_LOADING = """\
import gc
import os
import sys
import time

sys.path.insert(0, {root!r})
import numpy as np
import paddle
import datasets

PARENT = os.getpid()


class WaitsForThreadsAWorkerLacks:
    \"\"\"Garbage (a reference cycle) whose finalizer, like that of a used Paddle queue, waits for
    threads of this process: in a forked worker, which has none of them, for ever.\"\"\"

    def __init__(self):
        self.cycle = self

    def __del__(self):
        if os.getpid() != PARENT:
            time.sleep(180)


class Items(paddle.io.Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, index):
        return np.zeros(2, np.float32), np.int64(index)


def collect_garbage(worker_id):
    gc.collect()  # as a worker may, soon after the fork


dataset = Items()
loader = datasets.DataLoader(dataset, batch_sampler=paddle.io.BatchSampler(dataset, batch_size=2),
                             collate_fn=datasets.collate, num_workers=2, worker_init_fn=collect_garbage)
gc.disable()  # the garbage stays until a collection: here, the one in the workers
WaitsForThreadsAWorkerLacks()
print(sum(len(labels) for _, labels in loader), flush=True)
"""


def test_loader_workers_start_without_this_process_garbage(tmp_path):
    """A forked worker that collects garbage of the loading process can run finalizers that never
    return there (a used Paddle queue's waits for its threads): it never started, and the loading
    waited for ever (seen at random in test runs). The garbage is collected before the fork."""
    script = tmp_path / 'load.py'
    script.write_text(GARBAGE_THEN_LOADING.format(root=ROOT))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == '8'


@pytest.mark.parametrize('label', [-1, 10])
def test_cifar_labels_outside_the_classes_name_the_batch(tmp_path, label):
    """A CIFAR-10 label outside 0..9 (e.g. a CIFAR-100 batch under the CIFAR-10 name) is refused
    when the dataset is built, naming the first batch file."""
    batches = write_cifar10(tmp_path)
    test = pickle.loads(batches['test_batch'], encoding='bytes')
    test[b'labels'][1] = label
    path = tmp_path / 'cifar-10-batches-py' / 'test_batch'
    path.write_bytes(pickle.dumps(test, protocol=2))
    config = make_config(**{'DATA.DATASET': 'cifar10', 'DATA.DATA_PATH': str(tmp_path)})
    with pytest.raises(DataError, match=re.escape(f'{path}: labels outside [0, 10)')):
        build_dataset(config, 'val')
