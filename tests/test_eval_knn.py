"""``eval_knn.py``: DINO's weighted k-NN evaluation on an XCiT's features."""
import json
import os
import subprocess
import sys

import numpy as np
import paddle
import pytest
from PIL import Image

import eval_knn
from conftest import ROOT, random_model_files
from datasets import build_dataloader, build_dataset
from engine import EvalForward
from config import get_config
from xcit import build_xcit

DIGITS_YAML = """\
DATA:
  DATASET: digits
  IMAGE_SIZE: 32
  NUM_WORKERS: 0
  BATCH_SIZE_EVAL: 256
MODEL:
  NUM_CLASSES: {classes}
  PATCH_SIZE: 8
  EMBED_DIM: 32
  DEPTH: 1
  NUM_HEADS: 2
"""


def reference_knn(train_features, train_labels, test_features, test_labels, k, temperature, num_classes):
    """The voting written out one test image at a time, as DINO's ``knn_classifier`` does it."""
    top1 = top5 = 0
    for feature, label in zip(test_features, test_labels):
        similarity = train_features @ feature
        nearest = np.argsort(-similarity, kind='stable')[:k]
        scores = np.zeros(num_classes)
        for j in nearest:
            scores[train_labels[j]] += np.exp(similarity[j] / temperature)
        ranked = np.argsort(-scores, kind='stable')[:min(5, k)]
        top1 += ranked[0] == label
        top5 += label in ranked
    return 100.0 * top1 / len(test_labels), 100.0 * top5 / len(test_labels)


def test_votes_are_weighted_by_similarity():
    """Two far neighbours of class 0 lose against one close neighbour of class 1 at T = 0.07, and
    win when every vote counts about the same (T = 100)."""
    angles = np.array([0.0, 1.2, -1.2, 0.05])
    train = np.stack([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32)[1:]
    labels = np.array([0, 0, 1])
    test = np.array([[1.0, 0.0]], np.float32)
    assert eval_knn.knn_accuracy(train, labels, test, np.array([1]), 3, 0.07, 2) == (100.0, 100.0)
    assert eval_knn.knn_accuracy(train, labels, test, np.array([1]), 3, 100.0, 2) == (0.0, 100.0)
    assert eval_knn.knn_accuracy(train, labels, test, np.array([1]), 1, 100.0, 2) == (100.0, 100.0)
    with pytest.raises(ValueError, match='k=4 must be between 1 and the number of training images'):
        eval_knn.knn_accuracy(train, labels, test, np.array([1]), 4, 0.07, 2)


@pytest.mark.parametrize('k', [1, 3, 20])
def test_matches_the_voting_written_out(k, monkeypatch):
    rng = np.random.default_rng(k)
    train, test = (eval_knn.normalise(rng.standard_normal((n, 8)).astype(np.float32)) for n in (300, 70))
    train_labels, test_labels = rng.integers(0, 7, 300), rng.integers(0, 7, 70)
    expected = reference_knn(train, train_labels, test, test_labels, k, 0.07, 7)
    monkeypatch.setattr(eval_knn, 'SIMILARITIES_PER_CHUNK', 300 * 16)  # several chunks, the last one short
    assert eval_knn.knn_accuracy(train, train_labels, test, test_labels, k, 0.07, 7) == pytest.approx(expected)


def test_tiny_temperatures_do_not_overflow_the_votes():
    """exp(similarity / T) overflowed float64 above a similarity of 709 T (every such vote inf, the
    classes then ranked by index). At T = 1e-3 the votes agree with those added up as logarithms
    (which cannot overflow); at T = 1e-6 the nearest neighbour alone decides, as k = 1 does."""
    rng = np.random.default_rng(0)
    train, test = (eval_knn.normalise(rng.standard_normal((n, 8)).astype(np.float32)) for n in (300, 70))
    train_labels, test_labels = rng.integers(0, 7, 300), rng.integers(0, 7, 70)
    top1 = top5 = 0
    for feature, label in zip(test, test_labels):
        similarity = train @ feature
        log_scores = np.full(7, -np.inf)
        for j in np.argsort(-similarity, kind='stable')[:20]:
            log_scores[train_labels[j]] = np.logaddexp(log_scores[train_labels[j]], similarity[j] / 1e-3)
        ranked = np.argsort(-log_scores, kind='stable')[:5]
        top1 += ranked[0] == label
        top5 += label in ranked
    assert eval_knn.knn_accuracy(train, train_labels, test, test_labels, 20, 1e-3, 7) == pytest.approx(
        (100.0 * top1 / 70, 100.0 * top5 / 70))
    nearest_alone = eval_knn.knn_accuracy(train, train_labels, test, test_labels, 1, 0.07, 7)[0]
    assert eval_knn.knn_accuracy(train, train_labels, test, test_labels, 20, 1e-6, 7)[0] == nearest_alone


@pytest.fixture(scope='module')
def backbone(tmp_path_factory):
    """A tiny digits model without head, random weights."""
    return random_model_files(tmp_path_factory.mktemp('knn'), DIGITS_YAML.format(classes=0))


def test_script_on_a_backbone_without_head(backbone, tmp_path, capsys):
    """On the CPU the predictor is tried as in -eval; the summary is printed and written."""
    cfg, weights = backbone
    summary = eval_knn.main(['-cfg', cfg, '-pretrained', weights, '-k', '1', '20', '-output', str(tmp_path),
                             '-device', 'cpu'])
    out = capsys.readouterr().out
    assert 'paddle.inference matches dygraph (max abs output diff' in out
    assert 'train features: batch 6/6' in out and 'val features: batch 2/2' in out
    assert json.loads(out.strip().splitlines()[-1]) == summary
    assert json.loads((tmp_path / 'knn_summary.json').read_text()) == summary
    assert (summary['train_images'], summary['val_images'], summary['feature_dim']) == (1438, 359, 32)
    assert summary['path'] in ('inference', 'dygraph') and sorted(summary['knn']) == ['1', '20']
    for k in ('1', '20'):
        acc = summary['knn'][k]
        assert f'{k}-NN (T=0.07): Acc@1 {acc["acc1"]:.2f}% Acc@5 {acc["acc5"]:.2f}% (359 images against 1438, ' in out


def test_features_are_the_models_final_norm_class_tokens(backbone, monkeypatch):
    """In dygraph, the script's figures are those of the model's features computed here (the
    voting itself is checked against the reference above; on these random-weight features
    float rounding decides near-ties, hence the same path)."""
    monkeypatch.setattr(eval_knn, 'EvalForward', lambda model, size, try_inference: EvalForward(model, size, False))
    cfg, weights = backbone
    summary = eval_knn.main(['-cfg', cfg, '-pretrained', weights, '-k', '1', '20', '-device', 'cpu'])
    assert summary['path'] == 'dygraph'
    config = get_config(cfg)
    model = build_xcit(config)
    model.set_state_dict(paddle.load(weights))
    model.eval()
    features = {}
    for split in ('train', 'val'):
        data_config = eval_knn.data_config(config, None)
        loader = build_dataloader(data_config, build_dataset(data_config, split, augment=False), 'val')
        with paddle.no_grad():
            pairs = [(model.forward_features(x).numpy(), y.numpy()) for x, y in loader]
        features[split] = (eval_knn.normalise(np.concatenate([p[0] for p in pairs])),
                           np.concatenate([p[1] for p in pairs]))
    for k in (1, 20):
        acc1, acc5 = eval_knn.knn_accuracy(*features['train'], *features['val'], k, 0.07, 10)
        assert summary['knn'][str(k)] == {'acc1': pytest.approx(acc1, abs=1e-9), 'acc5': pytest.approx(acc5, abs=1e-9)}
    assert summary['knn']['1']['acc1'] > 30  # random features of digits are far better than chance (10%)


def test_training_images_go_through_the_evaluation_transform():
    config = get_config()
    config.defrost()
    config.DATA.DATASET, config.DATA.IMAGE_SIZE = 'digits', 32
    dataset = build_dataset(config, 'train', augment=False)
    image, _ = dataset[0]
    again, _ = dataset[0]
    np.testing.assert_array_equal(image, again)  # no random augmentation
    assert len(dataset) == 1438 and dataset.mode == 'val'
    augmented = build_dataset(config, 'train')
    assert augmented.mode == 'train' and not np.array_equal(augmented[0][0], image)


def test_batch_size_and_opts_reach_the_run(backbone, capsys):
    cfg, weights = backbone
    for args, batches in ((['-batch_size', '700'], 3), (['-opts', 'DATA.BATCH_SIZE_EVAL', '1000'], 2)):
        eval_knn.main(['-cfg', cfg, '-pretrained', weights, '-k', '5', '-device', 'cpu', '-image_size', '24', *args])
        assert f'train features: batch {batches}/{batches}' in capsys.readouterr().out
    eval_knn.main(['-cfg', cfg, '-pretrained', weights, '-k', '5', '-device', 'cpu', '-image_size', '24',
                   '-batch_size', '700', '-opts', 'REPORT_FREQ', '1'])
    assert 'train features: batch 1/3' in capsys.readouterr().out  # a progress line every batch


def test_data_path_of_the_bundled_digits_is_reported_as_without_effect(backbone, tmp_path, capsys):
    cfg, weights = backbone
    eval_knn.main(['-cfg', cfg, '-pretrained', weights, '-k', '5', '-device', 'cpu', '-image_size', '16',
                   '-data_path', str(tmp_path / 'nowhere')])
    assert f'-data_path {tmp_path / "nowhere"} has no effect: the digits dataset is bundled' in capsys.readouterr().out


@pytest.mark.parametrize('key, value', [('EMA_EVAL', 'True'), ('NGPUS', '2'), ('SAVE', 'out'),
                                        ('MODEL.PRETRAINED', 'x.pdparams'), ('TRAIN.BASE_LR', '0.1'),
                                        ('DATA.BATCH_SIZE', '8')])
def test_opts_this_script_does_not_read_are_errors(backbone, capsys, key, value):
    cfg, weights = backbone
    with pytest.raises(SystemExit) as exit_info:
        eval_knn.main(['-cfg', cfg, '-pretrained', weights, '-device', 'cpu', '-opts', key, value])
    assert exit_info.value.code == 1
    assert f'error: -opts {key}: eval_knn.py does not read it' in capsys.readouterr().err


def test_list_file_labels_are_checked_against_num_classes(backbone, tmp_path, capsys):
    """A model without head says nothing about the labels: -num_classes (default 1000) does."""
    cfg, weights = backbone
    for split in ('train', 'val'):
        Image.new('RGB', (40, 40), (90, 10, 200)).save(tmp_path / f'{split}.png')
        (tmp_path / f'{split}_list.txt').write_text(f'{split}.png 15\n', encoding='utf-8')
    args = ['-cfg', cfg, '-pretrained', weights, '-k', '1', '-device', 'cpu', '-dataset', 'imagenet2012',
            '-data_path', str(tmp_path)]
    assert eval_knn.main(args)['knn']['1'] == {'acc1': 100.0, 'acc5': 100.0}
    with pytest.raises(SystemExit) as exit_info:
        eval_knn.main(args + ['-num_classes', '10'])
    assert exit_info.value.code == 1
    assert 'label 15 outside [0, MODEL.NUM_CLASSES=10)' in capsys.readouterr().err


def test_datasets_that_define_their_classes_are_not_bounded_by_the_head(tmp_path):
    """The votes use no head: a 3-class image folder or the 10 digits with a 2-class model."""
    cfg, weights = random_model_files(tmp_path, DIGITS_YAML.format(classes=2))
    for split in ('train', 'val'):
        for c, colour in enumerate([(250, 0, 0), (0, 250, 0), (0, 0, 250)]):
            os.makedirs(tmp_path / split / f'c{c}')
            Image.new('RGB', (40, 40), colour).save(tmp_path / split / f'c{c}' / '0.png')
    args = ['-cfg', cfg, '-pretrained', weights, '-k', '1', '-device', 'cpu']
    summary = eval_knn.main(args + ['-dataset', 'imagefolder', '-data_path', str(tmp_path)])
    assert (summary['train_images'], summary['val_images']) == (3, 3)
    assert summary['knn']['1'] == {'acc1': 100.0, 'acc5': 100.0}
    assert eval_knn.main(args)['val_images'] == 359


def test_repeated_multi_value_flags_all_apply():
    required = ['-cfg', 'c.yaml', '-pretrained', 'w.pdparams']
    args = eval_knn.parse_args(required + ['-k', '5', '-k', '10', '20',
                                           '-opts', 'SEED', '1', '-opts', 'DATA.BATCH_SIZE', '8'])
    assert args.k == [5, 10, 20] and args.opts == ['SEED', '1', 'DATA.BATCH_SIZE', '8']
    assert eval_knn.parse_args(required).k == [10, 20, 100, 200]


@pytest.mark.parametrize('args, message', [
    (['-k', '2000'], 'error: -k 2000: must be between 1 and the number of training images (1438)'),
    (['-dataset', 'imagefolder', '-data_path', 'no/such/folder'], 'error: DATA.DATA_PATH not found: no/such/folder'),
    (['-ema'], "error: {weights}: its EMA weights ('model_ema') were asked for (-ema; use_ema in Python), but this "
               "plain state dict has none"),
])
def test_bad_arguments_are_one_error_line(backbone, capsys, args, message):
    cfg, weights = backbone
    with pytest.raises(SystemExit) as exit_info:
        eval_knn.main(['-cfg', cfg, '-pretrained', weights, '-device', 'cpu', *args])
    assert exit_info.value.code == 1
    assert capsys.readouterr().err.strip() == message.format(weights=weights)


@pytest.mark.parametrize('value', ['0', 'nan', 'inf'])
def test_temperature_must_be_positive(backbone, capsys, value):
    """nan made every vote nan (garbage accuracies, and NaN in the JSON summary); inf is no weighting."""
    cfg, weights = backbone
    with pytest.raises(SystemExit) as exit_info:
        eval_knn.main(['-cfg', cfg, '-pretrained', weights, '-temperature', value])
    assert exit_info.value.code == 2
    assert f'-temperature must be a number > 0, got {float(value)}' in capsys.readouterr().err


@pytest.mark.parametrize('value', ['0', '-5'])
def test_num_classes_must_be_positive(backbone, capsys, value):
    """0 was taken for the default; -5 was blamed on the first label of the list file."""
    cfg, weights = backbone
    with pytest.raises(SystemExit) as exit_info:
        eval_knn.main(['-cfg', cfg, '-pretrained', weights, '-num_classes', value])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith(f': error: -num_classes must be > 0, got {value}')


TWO_PROCESS_GATHER = '''\
"""2 gloo processes gather rows of different counts, a few rows per all_gather call; each
writes what it got to gathered_<rank>.npz."""
import sys

import numpy as np
import paddle.distributed as dist

sys.path.insert(0, sys.argv[1])
import utils


def work():
    dist.init_parallel_env()
    utils.ROWS_PER_GATHER = 3
    rank = dist.get_rank()
    rows = np.arange(10 * rank, 10 * rank + (5 if rank == 0 else 2))
    features = np.stack([rows, -rows], axis=1).astype(np.float32)
    gathered = {'features': utils.gather_rows(features), 'labels': utils.gather_rows(rows),
                'rank_1_has_none': utils.gather_rows(rows[:3] if rank == 0 else rows[:0]),
                'first_only': utils.gather_rows(features, everywhere=False)}
    np.savez(f'gathered_{rank}.npz', **gathered)


if __name__ == '__main__':
    dist.spawn(work, nprocs=2, backend='gloo')
'''


def test_rows_are_gathered_in_rank_order(tmp_path):
    script = tmp_path / 'gather.py'
    script.write_text(TWO_PROCESS_GATHER)
    done = subprocess.run([sys.executable, str(script), ROOT], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    first, second = (np.load(tmp_path / f'gathered_{rank}.npz') for rank in (0, 1))
    expected = np.array([0, 1, 2, 3, 4, 10, 11])
    for gathered in (first, second):
        np.testing.assert_array_equal(gathered['labels'], expected)
        assert gathered['labels'].dtype == np.int64 and gathered['features'].dtype == np.float32
        np.testing.assert_array_equal(gathered['features'], np.stack([expected, -expected], axis=1))
        np.testing.assert_array_equal(gathered['rank_1_has_none'], [0, 1, 2])
    np.testing.assert_array_equal(first['first_only'], first['features'])
    assert second['first_only'].shape == (0, 2) and second['first_only'].dtype == np.float32


def test_two_processes_give_the_features_of_one(backbone, tmp_path):
    """-ngpus 2 on the CPU: two gloo processes, each on half of the images, give the features and
    labels of one process in the same order (each process may run the predictor or dygraph,
    which agree within the export check's 1e-4) and the summary comes from the first process."""
    cfg, weights = backbone
    args = ['-cfg', cfg, '-pretrained', weights, '-k', '1', '20', '-device', 'cpu', '-save_features']
    one = eval_knn.main(args + ['-output', str(tmp_path / 'one')])
    done = subprocess.run([sys.executable, os.path.join(ROOT, 'eval_knn.py'), *args, '-ngpus', '2',
                           '-output', str(tmp_path / 'two')], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert 'starting 2 processes (gloo)' in done.stdout
    assert 'train features: batch 3/3' in done.stdout  # the first process's half of 6 batches of 256
    two = json.loads(done.stdout.strip().splitlines()[-1])
    assert two == json.loads((tmp_path / 'two' / 'knn_summary.json').read_text())
    assert (two['processes'], one['processes']) == (2, 1)
    assert (two['train_images'], two['val_images']) == (one['train_images'], one['val_images']) == (1438, 359)
    features = {name: np.load(tmp_path / name / 'features.npz') for name in ('one', 'two')}
    for split, count in (('train', 1438), ('val', 359)):
        np.testing.assert_array_equal(features['two'][f'{split}_labels'], features['one'][f'{split}_labels'])
        assert features['one'][f'{split}_features'].shape == (count, 32)
        np.testing.assert_allclose(features['two'][f'{split}_features'], features['one'][f'{split}_features'],
                                   atol=1e-4)
        np.testing.assert_allclose(np.linalg.norm(features['one'][f'{split}_features'], axis=1), 1.0, atol=1e-6)
    labels = np.concatenate([features['one']['train_labels'], features['one']['val_labels']])
    assert np.bincount(labels).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]  # the digits


@pytest.mark.parametrize('args, message', [
    (['-save_features'], '-save_features writes <output>/features.npz: give -output'),
    (['-ngpus', '2', '-device', 'gpu:1'], '-device gpu:1 picks one GPU, but with -ngpus each process takes its own'),
])
def test_option_conflicts_are_usage_errors(backbone, capsys, args, message):
    cfg, weights = backbone
    with pytest.raises(SystemExit) as exit_info:
        eval_knn.main(['-cfg', cfg, '-pretrained', weights, *args])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize('args, message', [
    (['-ngpus', '0'], 'error: -ngpus must be -1 or positive, got 0'),
    (['-ngpus', '2', '-pretrained', 'no/such.pdparams'], 'error: checkpoint not found: no/such.pdparams'),
])
def test_bad_input_stops_before_any_process_starts(backbone, capsys, args, message):
    cfg, weights = backbone
    with pytest.raises(SystemExit) as exit_info:
        eval_knn.main(['-cfg', cfg, '-pretrained', weights, '-device', 'cpu', *args])
    captured = capsys.readouterr()
    assert exit_info.value.code == 1 and captured.err.strip() == message
    assert 'starting' not in captured.out


@pytest.mark.parametrize('processes', [[], ['-ngpus', '2']])
def test_output_that_is_a_file_stops_before_any_feature(backbone, tmp_path, capsys, processes):
    """It was a FileExistsError traceback once every feature had been computed."""
    cfg, weights = backbone
    (tmp_path / 'out').write_text('')
    with pytest.raises(SystemExit) as exit_info:
        eval_knn.main(['-cfg', cfg, '-pretrained', weights, '-device', 'cpu', '-output', str(tmp_path / 'out'),
                       *processes])
    captured = capsys.readouterr()
    assert exit_info.value.code == 1
    assert captured.err == f'error: -output {tmp_path / "out"} is a file, not a folder\n'
    assert 'features' not in captured.out and 'starting' not in captured.out


def test_a_process_without_images_does_not_stall_the_others(backbone, tmp_path):
    """One training and one validation image on 2 processes: the second process has no batch at all;
    the first computes both features alone and both processes finish."""
    cfg, weights = backbone
    for split, colour in (('train', (90, 10, 200)), ('val', (80, 20, 190))):
        Image.new('RGB', (40, 40), colour).save(tmp_path / f'{split}.png')
        (tmp_path / f'{split}_list.txt').write_text(f'{split}.png 3\n', encoding='utf-8')
    done = subprocess.run([sys.executable, os.path.join(ROOT, 'eval_knn.py'), '-cfg', cfg, '-pretrained', weights,
                           '-k', '1', '-device', 'cpu', '-ngpus', '2', '-dataset', 'imagenet2012', '-data_path',
                           str(tmp_path), '-num_classes', '5'], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert (summary['train_images'], summary['val_images'], summary['processes']) == (1, 1, 2)
    assert summary['knn']['1'] == {'acc1': 100.0, 'acc5': 100.0} and summary['path'] == 'dygraph'
