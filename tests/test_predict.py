"""predict.py on generated images: ranked output, CSV for folders, unreadable files, exported
models, the device choice."""
import csv
import io
import os
import re
import shutil

import numpy as np
import paddle
import pytest
import yaml
from paddle import inference
from PIL import Image

import utils
from config import ConfigError, get_config
from datasets import build_dataset
from export_model import GPU_MEMORY_POOL_MB, export
from export_model import main as export_main
import predict
from predict import main, read_class_names, top_k
from transforms import build_eval_transform
from xcit import build_xcit

NAMES = ['ant', 'bee', 'cat', 'dog', 'eel']
TINY = {'DATA': {'IMAGE_SIZE': 32, 'CROP_PCT': 0.875},
        'MODEL': {'EMBED_DIM': 32, 'DEPTH': 1, 'NUM_HEADS': 2, 'NUM_CLASSES': len(NAMES)}}


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    """Config, weights, class names, images (two RGB JPEGs, a grayscale PNG in a subfolder,
    a corrupt .jpg and a text file) and the model's expected top-5 for each readable image."""
    root = tmp_path_factory.mktemp('predict')
    cfg = str(root / 'tiny.yaml')
    with open(cfg, 'w', encoding='utf-8') as f:
        yaml.safe_dump(TINY, f)
    names = root / 'names.txt'
    names.write_text('\n'.join(NAMES) + '\n', encoding='utf-8')
    paddle.seed(3)
    config = get_config(cfg)
    model = build_xcit(config)
    model.head.bias.set_value(paddle.to_tensor([0.0, 2.0, -1.0, 0.5, 1.0]))  # distinct probabilities
    weights = str(root / 'tiny.pdparams')
    paddle.save(model.state_dict(), weights)
    model.eval()
    images = root / 'images'
    (images / 'sub').mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, size in [('a.jpg', (40, 50)), ('b.jpg', (64, 33))]:
        Image.fromarray(rng.integers(0, 256, size + (3,), dtype=np.uint8)).save(images / name)
    Image.fromarray(rng.integers(0, 256, (36, 36), dtype=np.uint8)).save(images / 'sub' / 'c.png')
    (images / 'broken.jpg').write_bytes(b'this is not a JPEG')
    (images / 'notes.txt').write_text('not an image')
    transform = build_eval_transform(config)
    expected = {}
    for path in [images / 'a.jpg', images / 'b.jpg', images / 'sub' / 'c.png']:
        with Image.open(path) as img:
            x = transform(img)[None]
        with paddle.no_grad():
            expected[str(path)] = top_k(model(paddle.to_tensor(x)).numpy())
    return {'cfg': cfg, 'weights': weights, 'names': str(names), 'images': images, 'expected': expected,
            'model': model, 'root': root}


def test_single_images_print_ranked_top5(setup, capsys):
    a = str(setup['images'] / 'a.jpg')
    main(['-cfg', setup['cfg'], '-pretrained', setup['weights'], '-class_names', setup['names'], a])
    lines = capsys.readouterr().out.splitlines()
    indices, probs = setup['expected'][a]
    assert lines[0] == a
    assert lines[1:] == [f'  {rank}. {NAMES[i]} ({i}): {p:.4f}'
                         for rank, (i, p) in enumerate(zip(indices[0], probs[0]), 1)]
    assert np.all(np.diff(probs[0]) <= 0) and probs[0].sum() == pytest.approx(1.0, abs=1e-5)


def test_folder_gives_csv_and_reports_unreadable_files(setup, capsys):
    out = setup['root'] / 'top5.csv'
    with pytest.raises(SystemExit) as exit_info:
        main(['-cfg', setup['cfg'], '-pretrained', setup['weights'], '-class_names', setup['names'],
              '-output', str(out), '-batch_size', '2', str(setup['images'])])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert f"error: {setup['images'] / 'broken.jpg'}: cannot read the image" in err
    assert 'error: 1 of 4 files could not be read' in err and 'notes.txt' not in err
    rows = list(csv.reader(io.StringIO(out.read_text(encoding='utf-8'))))
    assert rows[0] == (['path'] + [f'index_{i}' for i in range(1, 6)] + [f'name_{i}' for i in range(1, 6)]
                       + [f'prob_{i}' for i in range(1, 6)])
    assert [row[0] for row in rows[1:]] == sorted(setup['expected'])
    for row in rows[1:]:
        indices, probs = setup['expected'][row[0]]
        assert [int(v) for v in row[1:6]] == list(indices[0])
        assert row[6:11] == [NAMES[i] for i in indices[0]]
        np.testing.assert_allclose([float(v) for v in row[11:16]], probs[0], atol=1e-6)


def backbone_of(setup, tmp_path):
    """The config and weights of the setup's model without its head (it gives features): two paths."""
    cfg, weights = tmp_path / 'backbone.yaml', tmp_path / 'backbone.pdparams'
    cfg.write_text(yaml.safe_dump({**TINY, 'MODEL': {**TINY['MODEL'], 'NUM_CLASSES': 0}}), encoding='utf-8')
    paddle.save({k: v for k, v in paddle.load(setup['weights']).items() if not k.startswith('head.')}, str(weights))
    return [str(cfg), str(weights)]


@pytest.mark.parametrize('output', ['top5.csv', 'features.npz'])
def test_an_interrupted_run_leaves_the_previous_output_file(setup, tmp_path, monkeypatch, output):
    """Stopped on its second batch (Ctrl-C here), predict leaves -output as it was, with no
    temporary file beside it; the file is replaced whole once every image is done."""
    out = tmp_path / output
    out.write_text('the previous run\n')
    batches = iter([None, KeyboardInterrupt])
    model_outputs = predict.check_output_width

    def interrupted(*args):
        if next(batches):
            raise KeyboardInterrupt
        return model_outputs(*args)
    monkeypatch.setattr(predict, 'check_output_width', interrupted)
    args = ['-cfg', setup['cfg'], '-pretrained', setup['weights'], '-output', str(out), '-batch_size', '1',
            str(setup['images'] / 'a.jpg'), str(setup['images'] / 'b.jpg')]
    if output.endswith('.npz'):
        args[1:4:2] = backbone_of(setup, tmp_path)
    with pytest.raises(KeyboardInterrupt):
        main(args)
    assert out.read_text() == 'the previous run\n'
    assert [p.name for p in tmp_path.iterdir() if '.tmp' in p.name] == []


@pytest.mark.parametrize('output', ['top5.csv', 'features.npz'])
def test_a_run_that_reads_no_image_leaves_the_previous_output_file(setup, tmp_path, capsys, output):
    """It used to replace -output with a header alone (or no features)."""
    out = tmp_path / output
    out.write_text('the previous run\n')
    cfg, weights = backbone_of(setup, tmp_path) if output.endswith('.npz') else (setup['cfg'], setup['weights'])
    with pytest.raises(SystemExit) as exit_info:
        main(['-cfg', cfg, '-pretrained', weights, '-output', str(out), str(setup['images'] / 'broken.jpg')])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err.endswith(f'error: 1 of 1 files could not be read\nerror: no image could be read, so {out} is left '
                        f'as it was\n')
    assert out.read_text() == 'the previous run\n'
    assert [p.name for p in tmp_path.iterdir() if '.tmp' in p.name] == []


def test_a_png_with_a_broken_chunk_is_reported_by_name(tmp_path):
    """PIL raises SyntaxError for a broken PNG chunk (here the second IDAT's type); it is an
    unreadable image like any other, named, as in training and evaluation."""
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (256, 256, 3), dtype=np.uint8)).save(buf, 'PNG')
    data = bytearray(buf.getvalue())
    second_idat = data.find(b'IDAT', data.find(b'IDAT') + 4)
    data[second_idat:second_idat + 4] = b'ID\x01T'
    path = tmp_path / 'broken_chunk.png'
    path.write_bytes(bytes(data))
    with pytest.raises(OSError, match=f'{path}: cannot read the image \\(SyntaxError: broken PNG file'):
        predict.load_image(str(path), lambda img: img)


def test_reading_threads_keep_the_order_and_read_one_batch_ahead(monkeypatch, capsys):
    """Images come out in input order, unreadable ones are reported in order, and when a batch
    is handed out no image beyond the next batch has been started."""
    started = []

    def load(path, transform):
        started.append(path)
        if path.startswith('bad'):
            raise OSError(f'{path}: cannot read the image')
        return np.full((3, 2, 2), float(path[-1]), np.float32)
    monkeypatch.setattr(predict, 'load_image', load)
    paths = ['img0', 'img1', 'bad2', 'img3', 'img4', 'bad5', 'img6']
    failed, batches = [], []
    for batch, images in predict.readable_batches(paths, None, 2, failed, workers=3):
        assert set(started) <= set(paths[:2 * (len(batches) + 2)])
        batches.append((batch, images[:, 0, 0, 0].tolist()))
    assert batches == [(['img0', 'img1'], [0.0, 1.0]), (['img3'], [3.0]), (['img4'], [4.0]), (['img6'], [6.0])]
    assert failed == ['bad2', 'bad5']
    assert capsys.readouterr().err.splitlines() == ['error: bad2: cannot read the image',
                                                    'error: bad5: cannot read the image']


def test_one_or_several_reading_threads_give_the_same_csv(setup, capsys):
    outputs, out = [], setup['root'] / 'top5_workers.csv'
    for workers in ('1', '3'):
        with pytest.raises(SystemExit):  # broken.jpg
            main(['-cfg', setup['cfg'], '-pretrained', setup['weights'], '-class_names', setup['names'],
                  '-output', str(out), '-batch_size', '1', '-workers', workers, str(setup['images'])])
        outputs.append((out.read_text(encoding='utf-8'), capsys.readouterr().err))
    assert outputs[0] == outputs[1]
    assert len(outputs[0][0].splitlines()) == 1 + len(setup['expected'])


@pytest.mark.parametrize('flag', ['-batch_size', '-workers'])
def test_batch_size_and_workers_must_be_positive(setup, flag, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(['-cfg', setup['cfg'], '-pretrained', setup['weights'], flag, '0', str(setup['images'])])
    assert exit_info.value.code == 2
    assert f'{flag} must be > 0, got 0' in capsys.readouterr().err


def test_exported_model_gives_the_same_predictions(setup):
    """One image per run, so that the predictor runs the same input shape several times."""
    model_dir = setup['root'] / 'exported'
    export(setup['model'], str(model_dir))
    out = setup['root'] / 'exported_top5.csv'
    with pytest.raises(SystemExit):  # broken.jpg
        main(['-cfg', setup['cfg'], '-model_dir', str(model_dir), '-class_names', setup['names'],
              '-output', str(out), '-batch_size', '1', str(setup['images'])])
    rows = list(csv.reader(io.StringIO(out.read_text(encoding='utf-8'))))
    assert [row[0] for row in rows[1:]] == sorted(setup['expected'])
    for row in rows[1:]:
        indices, probs = setup['expected'][row[0]]
        assert [int(v) for v in row[1:6]] == list(indices[0])
        np.testing.assert_allclose([float(v) for v in row[11:16]], probs[0], atol=1e-5)


def test_exported_model_brings_its_config(setup, tmp_path, capsys):
    """export_model.py writes the config beside the model: -model_dir needs no -cfg; without one
    (an older export, or -pretrained) -cfg is a usage error."""
    model_dir = tmp_path / 'exported'
    export_main(['-cfg', setup['cfg'], '-pretrained', setup['weights'], '-output', str(model_dir)])
    main(['-model_dir', str(model_dir), '-class_names', setup['names'], '-device', 'cpu',
          str(setup['images'] / 'a.jpg')])
    out = capsys.readouterr().out
    indices, probs = setup['expected'][str(setup['images'] / 'a.jpg')]
    assert f'  1. {NAMES[indices[0][0]]} ({indices[0][0]}): {probs[0][0]:.4f}' in out
    os.remove(model_dir / 'config.yaml')
    for weights in (['-model_dir', str(model_dir)], ['-pretrained', setup['weights']]):
        with pytest.raises(SystemExit) as exit_info:
            main([*weights, str(setup['images'] / 'a.jpg')])
        assert exit_info.value.code == 2 and '-cfg is required' in capsys.readouterr().err


def test_exported_model_with_another_models_config_is_an_error(setup, tmp_path, capsys):
    """The class names come from -cfg: an exported 5-class model with a 1000-class config would
    print ImageNet names for its 5 outputs."""
    model_dir = tmp_path / 'exported'
    export(setup['model'], str(model_dir))
    imagenet = tmp_path / 'imagenet.yaml'
    imagenet.write_text(yaml.safe_dump({**TINY, 'MODEL': {**TINY['MODEL'], 'NUM_CLASSES': 1000}}), encoding='utf-8')
    with pytest.raises(SystemExit) as exit_info:
        main(['-cfg', str(imagenet), '-model_dir', str(model_dir), str(setup['images'] / 'a.jpg')])
    assert exit_info.value.code == 1
    assert (f'error: {model_dir}: the exported model gives 5 outputs per image, but the model of {imagenet} gives '
            f'1000; give -cfg the config it was exported with') in capsys.readouterr().err


@pytest.mark.parametrize('size, message', [
    (48, r'failed on images of shape \[1, 3, 48, 48\] \(.*\); a model exported with -image_size takes only that size'),
    # 16 tokens fold into the 4-token graph as 4 images: it used to give 4 rows of wrong logits
    (64, 'gave 4 rows of outputs for 1 images of 64 x 64 pixels: it was exported with -image_size for another '
         'size, and takes only that size')])
def test_exported_fixed_size_model_with_another_size_is_an_error(setup, tmp_path, capsys, size, message):
    model_dir = tmp_path / 'exported_32'
    export(setup['model'], str(model_dir), image_size=32)
    larger = tmp_path / 'larger.yaml'
    larger.write_text(yaml.safe_dump({**TINY, 'DATA': {**TINY['DATA'], 'IMAGE_SIZE': size}}), encoding='utf-8')
    with pytest.raises(SystemExit) as exit_info:
        main(['-cfg', str(larger), '-model_dir', str(model_dir), '-device', 'cpu', str(setup['images'] / 'a.jpg')])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert re.fullmatch(f'error: {re.escape(str(model_dir))}: paddle.inference (oneDNN|CPU) {message}\n', err,
                        re.DOTALL), err


def test_image_size_sets_the_transform_of_both_models(setup, capsys):
    """-image_size S predicts at S x S (as -eval -image_size S evaluates), with the dygraph and
    the exported model alike; a size out of range is named."""
    config = get_config(setup['cfg'])
    config.defrost()
    config.DATA.IMAGE_SIZE = 48
    a = str(setup['images'] / 'a.jpg')
    with Image.open(a) as img:
        x = build_eval_transform(config)(img)[None]
    assert x.shape == (1, 3, 48, 48)
    with paddle.no_grad():
        (best, *_), (prob, *_) = (row[0] for row in top_k(setup['model'](paddle.to_tensor(x)).numpy()))
    assert f'{prob:.4f}' != f'{setup["expected"][a][1][0][0]:.4f}'  # not what the config's 32 x 32 gives
    model_dir = setup['root'] / 'exported_any_size'
    export(setup['model'], str(model_dir))
    for weights in (['-pretrained', setup['weights']], ['-model_dir', str(model_dir)]):
        main(['-cfg', setup['cfg'], *weights, '-image_size', '48', '-class_names', setup['names'], a])
        assert capsys.readouterr().out.splitlines()[1] == f'  1. {NAMES[best]} ({best}): {prob:.4f}'
    with pytest.raises(SystemExit) as exit_info:
        main(['-cfg', setup['cfg'], '-pretrained', setup['weights'], '-image_size', '0', a])
    assert exit_info.value.code == 1
    assert 'error: -image_size: DATA.IMAGE_SIZE must be > 0, got 0' in capsys.readouterr().err


def test_ema_weights_of_a_training_checkpoint(setup, tmp_path, capsys):
    """-ema predicts with the checkpoint's 'model_ema' (here the fixture's weights), not its 'model'."""
    weights = paddle.load(setup['weights'])
    other = {name: value * 0.5 for name, value in weights.items()}
    checkpoint = str(tmp_path / 'last.pdparams')
    paddle.save({'model': other, 'model_ema': weights, 'epoch': 3}, checkpoint)
    a = str(setup['images'] / 'a.jpg')
    main(['-cfg', setup['cfg'], '-pretrained', checkpoint, '-ema', '-class_names', setup['names'], a])
    (best, *_), (prob, *_) = (row[0] for row in setup['expected'][a])
    assert capsys.readouterr().out.splitlines()[1] == f'  1. {NAMES[best]} ({best}): {prob:.4f}'
    with pytest.raises(SystemExit) as exit_info:
        main(['-cfg', setup['cfg'], '-pretrained', setup['weights'], '-ema', a])
    assert exit_info.value.code == 1
    assert ("its EMA weights ('model_ema') were asked for (-ema; use_ema in Python), but this "
            "plain state dict has none") in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(['-cfg', setup['cfg'], '-model_dir', str(tmp_path), '-ema', a])
    assert exit_info.value.code == 2 and 'an exported model has its own' in capsys.readouterr().err


def test_default_class_names():
    """The bundled ImageNet-1k names for 1000-class models, the indices otherwise."""
    names = read_class_names(None, 1000)
    assert len(names) == 1000 and names[0] == 'tench' and names[999] == 'toilet_tissue'
    assert read_class_names(None, 3) == ['0', '1', '2']


def test_class_names_of_the_config_are_the_default(tmp_path):
    assert read_class_names(None, 2, ['cat', 'dog']) == ['cat', 'dog']
    names = tmp_path / 'names.txt'
    names.write_text('a\nb\n')
    assert read_class_names(str(names), 2, ['cat', 'dog']) == ['a', 'b']  # -class_names wins
    with pytest.raises(ConfigError, match=re.escape('DATA.CLASS_NAMES of the config: 2 class names, but the model '
                                                    'has 3 classes')):
        read_class_names(None, 3, ['cat', 'dog'])


def test_a_backbone_without_head_writes_its_features(setup, tmp_path, capsys):
    cfg, weights = backbone_of(setup, tmp_path)
    out = tmp_path / 'features.npz'
    with pytest.raises(SystemExit) as exit_info:  # broken.jpg
        main(['-cfg', str(cfg), '-pretrained', weights, '-output', str(out), str(setup['images'])])
    assert exit_info.value.code == 1
    assert f'wrote the features of 3 images to {out}' in capsys.readouterr().err
    with np.load(out) as saved:
        assert list(saved['paths']) == sorted(setup['expected'])
        transform = build_eval_transform(get_config(str(cfg)))
        for path, feature in zip(saved['paths'], saved['features']):
            with Image.open(path) as img:
                x = paddle.to_tensor(transform(img)[None])
            with paddle.no_grad():
                np.testing.assert_allclose(feature, setup['model'].forward_features(x).numpy()[0], atol=1e-6)
    # the exported backbone gives the same features
    model_dir = tmp_path / 'exported'
    backbone = build_xcit(get_config(str(cfg)))
    backbone.set_state_dict(paddle.load(weights))
    backbone.eval()
    export(backbone, str(model_dir))
    exported = tmp_path / 'exported_features.npz'
    main(['-cfg', str(cfg), '-model_dir', str(model_dir), '-output', str(exported), str(setup['images'] / 'a.jpg'),
          str(setup['images'] / 'sub' / 'c.png')])
    with np.load(out) as dygraph, np.load(exported) as inference:
        assert list(inference['paths']) == [str(setup['images'] / 'a.jpg'), str(setup['images'] / 'sub' / 'c.png')]
        np.testing.assert_allclose(inference['features'], dygraph['features'][[0, 2]], atol=1e-4)
    with pytest.raises(SystemExit):
        main(['-cfg', str(cfg), '-pretrained', weights, str(setup['images'] / 'a.jpg')])
    assert 'gives features, not classes: write them with -output FILE.npz' in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(['-cfg', str(cfg), '-pretrained', weights, '-class_names', setup['names'], '-output', str(out),
              str(setup['images'] / 'a.jpg')])
    assert 'a model without classifier head has no classes to name' in capsys.readouterr().err


def test_a_model_with_fewer_than_five_classes_ranks_them_all(setup, tmp_path):
    cfg = tmp_path / 'three.yaml'
    cfg.write_text(yaml.safe_dump({**TINY, 'MODEL': {**TINY['MODEL'], 'NUM_CLASSES': 3}}))
    model = build_xcit(get_config(str(cfg)))
    paddle.save(model.state_dict(), str(tmp_path / 'three.pdparams'))
    out = tmp_path / 'new' / 'folder' / 'top.csv'  # the folder is created
    main(['-cfg', str(cfg), '-pretrained', str(tmp_path / 'three.pdparams'), '-output', str(out),
          str(setup['images'] / 'a.jpg')])
    rows = list(csv.reader(io.StringIO(out.read_text(encoding='utf-8'))))
    assert rows[0] == ['path', 'index_1', 'index_2', 'index_3', 'name_1', 'name_2', 'name_3',
                       'prob_1', 'prob_2', 'prob_3']
    assert len(rows) == 2 and len(rows[1]) == 10
    assert sorted(rows[1][1:4]) == ['0', '1', '2'] and rows[1][4:7] == rows[1][1:4]
    assert sum(float(p) for p in rows[1][7:]) == pytest.approx(1.0, abs=1e-5)


def test_symlinked_folders_are_searched(setup, tmp_path, capsys):
    (tmp_path / 'linked').symlink_to(setup['images'] / 'sub', target_is_directory=True)
    main(['-cfg', setup['cfg'], '-pretrained', setup['weights'], str(tmp_path)])
    rows = list(csv.reader(io.StringIO(capsys.readouterr().out)))
    assert [row[0] for row in rows[1:]] == [str(tmp_path / 'linked' / 'c.png')]


def test_names_that_are_not_utf8_are_written_as_their_bytes(setup, tmp_path, capsys):
    """A file named in Latin-1 (e.g. from a Windows archive), and hidden files, which are left out:
    the CSV holds the name's own bytes (it was a UnicodeEncodeError and no file)."""
    name = b'photo_\xe9t\xe9.jpg'
    shutil.copy(setup['images'] / 'a.jpg', os.path.join(os.fsencode(tmp_path), name))
    shutil.copy(setup['images'] / 'b.jpg', tmp_path / '._b.jpg')
    out = tmp_path / 'top5.csv'
    main(['-cfg', setup['cfg'], '-pretrained', setup['weights'], '-output', str(out), str(tmp_path)])
    rows = out.read_bytes().splitlines()
    assert len(rows) == 2 and rows[1].startswith(os.fsencode(tmp_path) + b'/' + name + b',')


def test_missing_model_dir_is_a_usage_error(setup, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(['-model_dir', str(tmp_path / 'nowhere'), str(setup['images'])])
    assert exit_info.value.code == 2
    assert f'-model_dir {tmp_path / "nowhere"}: no such folder' in capsys.readouterr().err
    (tmp_path / 'model.json').write_text('{}')
    with pytest.raises(SystemExit):
        main(['-model_dir', str(tmp_path / 'model.json'), str(setup['images'])])
    assert (f'-model_dir {tmp_path / "model.json"}: a file, not the folder export_model.py writes'
            in capsys.readouterr().err)


def test_a_missing_class_names_file_is_named_with_its_flag(setup, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(['-cfg', setup['cfg'], '-pretrained', setup['weights'], '-class_names', str(tmp_path / 'no.txt'),
              str(setup['images'] / 'a.jpg')])
    assert capsys.readouterr().err == f'error: -class_names {tmp_path / "no.txt"}: cannot read: No such file or directory\n'


def test_class_names_of_an_image_folder_dataset_follow_its_labels(setup, tmp_path, capsys):
    """-class_names DIR names each class as training on the image folder DIR labelled it: by
    the class folders of DIR/train in code-point order ('Bee' before 'ant'), whatever the order
    a file listing would give; a split folder gives the same names."""
    folders = ['ant', 'Bee', 'cat', 'dog', 'eel']
    for split in ('train', 'val'):
        for name in folders:
            (tmp_path / 'data' / split / name).mkdir(parents=True)
            shutil.copy(setup['images'] / 'a.jpg', tmp_path / 'data' / split / name / 'x.jpg')
    config = get_config(setup['cfg'])
    config.defrost()
    config.DATA.DATASET, config.DATA.DATA_PATH = 'imagefolder', str(tmp_path / 'data')
    dataset = build_dataset(config, 'train')
    labels = {os.path.basename(os.path.dirname(path)): int(label) for path, label in zip(dataset.paths, dataset.labels)}
    expected = sorted(labels, key=labels.get)
    assert read_class_names(str(tmp_path / 'data'), 5) == expected == ['Bee', 'ant', 'cat', 'dog', 'eel']
    assert read_class_names(str(tmp_path / 'data' / 'val'), 5) == expected
    a = str(setup['images'] / 'a.jpg')
    main(['-cfg', setup['cfg'], '-pretrained', setup['weights'], '-class_names', str(tmp_path / 'data'), a])
    (best, *_), _ = (row[0] for row in setup['expected'][a])
    assert capsys.readouterr().out.splitlines()[1].startswith(f'  1. {expected[best]} ({best}): ')
    with pytest.raises(SystemExit) as exit_info:
        main(['-cfg', setup['cfg'], '-pretrained', setup['weights'], '-class_names',
              str(tmp_path / 'data' / 'val' / 'ant'), a])
    assert exit_info.value.code == 1
    assert f'error: -class_names {tmp_path / "data" / "val" / "ant"}: ' in capsys.readouterr().err


def test_wrong_number_of_class_names_is_an_error(setup, tmp_path, capsys):
    names = tmp_path / 'three.txt'
    names.write_text('a\nb\nc\n')
    with pytest.raises(SystemExit):
        main(['-cfg', setup['cfg'], '-pretrained', setup['weights'], '-class_names', str(names),
              str(setup['images'] / 'a.jpg')])
    assert f'error: {names}: 3 class names, but the model has 5 classes' in capsys.readouterr().err


def test_class_names_that_are_not_utf8_text_are_named(setup, tmp_path, capsys):
    """A UTF-16 list or a weights file given as -class_names: one error naming the file (it was a
    UnicodeDecodeError traceback without it)."""
    utf16 = tmp_path / 'names16.txt'
    utf16.write_text('\n'.join(NAMES) + '\n', encoding='utf-16')
    for path in (str(utf16), setup['weights']):
        with pytest.raises(SystemExit) as exit_info:
            main(['-cfg', setup['cfg'], '-pretrained', setup['weights'], '-class_names', path,
                  str(setup['images'] / 'a.jpg')])
        assert exit_info.value.code == 1
        assert capsys.readouterr().err == (f'error: -class_names {path}: not UTF-8 text (invalid start byte at '
                                           f'byte 0); give a text file of class names, one per line\n')


def test_output_that_is_a_folder_is_refused_before_the_model_is_built(setup, tmp_path, monkeypatch, capsys):
    """-output naming a folder (it was an IsADirectoryError traceback once the model was built), or a
    path below a file, is one error line; nothing is built or read."""
    monkeypatch.setattr(predict, 'build_predictor', lambda args: pytest.fail('the model was built'))
    (tmp_path / 'file').write_text('')
    for output, message in (
            (str(tmp_path), f'-output {tmp_path} is a folder, not a file'),
            (str(tmp_path / 'file' / 'top5.csv'),
             f'-output {tmp_path / "file" / "top5.csv"}: its folder {tmp_path / "file"} is a file, not a folder')):
        with pytest.raises(SystemExit) as exit_info:
            main(['-cfg', setup['cfg'], '-pretrained', setup['weights'], '-output', output, str(setup['images'])])
        assert exit_info.value.code == 1
        assert capsys.readouterr().err == f'error: {message}\n'


@pytest.fixture
def two_gpus(monkeypatch):
    """Paddle appears to see two GPUs (only the device check is fooled; nothing runs on them)."""
    monkeypatch.setattr(utils, 'visible_gpus', lambda: 2)


@pytest.mark.parametrize('name, gpus, expected', [
    (None, 0, 'cpu'), (None, 2, 'gpu:0'), ('cpu', 2, 'cpu'), ('gpu', 2, 'gpu:0'), ('gpu:1', 2, 'gpu:1')])
def test_device_names(name, gpus, expected, monkeypatch):
    monkeypatch.setattr(utils, 'visible_gpus', lambda: gpus)
    assert utils.resolve_device(name) == expected


@pytest.mark.parametrize('name, message', [
    ('gpu:2', 'gpu:2: Paddle sees 2 GPUs'), ('tpu', "unknown device 'tpu': use cpu, gpu or gpu:N"),
    ('gpu:x', "unknown device 'gpu:x'")])
def test_unavailable_or_unknown_device_is_named(name, message, two_gpus):
    with pytest.raises(ValueError, match=message):
        utils.resolve_device(name)


@pytest.mark.skipif(paddle.is_compiled_with_cuda(), reason='this Paddle has CUDA')
def test_gpu_without_cuda_is_a_usage_error(setup, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(['-cfg', setup['cfg'], '-pretrained', setup['weights'], '-device', 'gpu',
              str(setup['images'] / 'a.jpg')])
    assert exit_info.value.code == 2
    assert ('argument -device: gpu: this Paddle has no CUDA support (install paddlepaddle-gpu)'
            in capsys.readouterr().err)


def test_exported_model_on_a_gpu_asks_paddle_inference_for_that_gpu(setup, two_gpus, monkeypatch, capsys):
    """The predictor's configuration gets the GPU and its index (the call is recorded, not made,
    so that the model still runs here, on the CPU)."""
    calls = []

    class RecordingConfig(inference.Config):
        def enable_use_gpu(self, memory_pool_mb, device_id):
            calls.append((memory_pool_mb, device_id))

        def enable_mkldnn(self):
            calls.append('enable_mkldnn')

    monkeypatch.setattr(inference, 'Config', RecordingConfig)
    model_dir = setup['root'] / 'exported_gpu'
    export(setup['model'], str(model_dir))
    a = str(setup['images'] / 'a.jpg')
    main(['-cfg', setup['cfg'], '-model_dir', str(model_dir), '-class_names', setup['names'],
          '-device', 'gpu:1', a])
    assert calls == [(GPU_MEMORY_POOL_MB, 1)]
    indices, _ = setup['expected'][a]
    assert capsys.readouterr().out.splitlines()[1].startswith(f'  1. {NAMES[indices[0][0]]} ')


def test_top_k_gives_softmax_probabilities_of_the_best_classes_in_order():
    """Probabilities are the softmax over all classes (not over the k kept), ranked best first,
    ties by class index; logits in the thousands (a float16 model's) stay finite."""
    logits = np.array([[0.0, 3.0, 1.0, 3.0, -2.0, 2.0, 0.5]], np.float32)
    expected = np.exp(logits[0].astype(np.float64)) / np.exp(logits[0].astype(np.float64)).sum()
    indices, probs = top_k(logits)
    assert indices.tolist() == [[1, 3, 5, 2, 6]]
    np.testing.assert_allclose(probs[0], expected[[1, 3, 5, 2, 6]], rtol=1e-6)
    indices, probs = top_k(np.array([[1000.0, 1002.0, 990.0]], np.float32), k=2)
    assert indices.tolist() == [[1, 0]]
    np.testing.assert_allclose(probs[0], [1 / (1 + np.exp(-2) + np.exp(-12)), np.exp(-2) / (1 + np.exp(-2) + np.exp(-12))],
                               rtol=1e-6)


def test_class_names_file_lines_are_stripped_and_blank_lines_skipped(tmp_path):
    """A names file written on Windows, with padding and blank lines (e.g. a trailing one), gives
    one name per non-blank line; a file with a name too many or too few is named."""
    names = tmp_path / 'names.txt'
    names.write_bytes(b'great white shark\r\n\r\n  tiger cat \r\nzebra\r\n\r\n')
    assert read_class_names(str(names), 3) == ['great white shark', 'tiger cat', 'zebra']
    with pytest.raises(ConfigError, match=re.escape(f'{names}: 3 class names, but the model has 4 classes')):
        read_class_names(str(names), 4)


@pytest.mark.parametrize('fmt', ['JPEG', 'PNG'])
def test_photos_are_turned_upright_by_their_exif_orientation(tmp_path, fmt):
    """A camera stores a portrait photo as landscape pixels with EXIF orientation 6 ("rotate 90
    degrees clockwise to view"); predict (and the attention maps) see it upright, as photo
    viewers and OpenCV's imread show it. Without the tag the pixels are taken as stored."""
    upright = np.zeros((48, 32, 3), dtype=np.uint8)
    upright[:8] = 255  # a white band at the top of the upright image
    stored = np.rot90(upright, k=1)  # what the camera writes: the band on the left, 32 x 48
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation
    tagged, plain = tmp_path / f'tagged.{fmt.lower()}', tmp_path / f'plain.{fmt.lower()}'
    Image.fromarray(stored).save(tagged, fmt, exif=exif, quality=95)
    Image.fromarray(stored).save(plain, fmt, quality=95)
    seen = predict.load_image(str(tagged), np.asarray)
    assert seen.shape == (48, 32, 3)
    assert seen[:8].mean() > 200 and seen[8:].mean() < 50
    assert predict.load_image(str(plain), np.asarray).shape == (32, 48, 3)
