"""``eval_knn.py``: DINO's weighted k-NN evaluation on an XCiT's features."""
import json

import numpy as np
import paddle
import pytest
from PIL import Image

import eval_knn
from conftest import random_model_files
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


@pytest.mark.parametrize('args, message', [
    (['-k', '2000'], 'error: -k 2000: must be between 1 and the number of training images (1438)'),
    (['-dataset', 'imagefolder', '-data_path', 'no/such/folder'], 'error: DATA.DATA_PATH not found: no/such/folder'),
    (['-ema'], "error: {weights}: -ema needs EMA weights ('model_ema'), but this plain state dict has none"),
])
def test_bad_arguments_are_one_error_line(backbone, capsys, args, message):
    cfg, weights = backbone
    with pytest.raises(SystemExit) as exit_info:
        eval_knn.main(['-cfg', cfg, '-pretrained', weights, '-device', 'cpu', *args])
    assert exit_info.value.code == 1
    assert capsys.readouterr().err.strip() == message.format(weights=weights)


def test_temperature_must_be_positive(backbone, capsys):
    cfg, weights = backbone
    with pytest.raises(SystemExit) as exit_info:
        eval_knn.main(['-cfg', cfg, '-pretrained', weights, '-temperature', '0'])
    assert exit_info.value.code == 2 and '-temperature must be > 0, got 0.0' in capsys.readouterr().err
