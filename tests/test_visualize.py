"""Class-attention maps (``XCiT.class_attention_maps``) and ``visualize_attention.py``."""
import numpy as np
import paddle
import pytest
from PIL import Image

import visualize_attention
from conftest import random_model_files
from xcit import XCiT

TINY_YAML = """\
DATA:
  IMAGE_SIZE: 64
MODEL:
  NUM_CLASSES: 10
  PATCH_SIZE: 16
  EMBED_DIM: 32
  DEPTH: 1
  NUM_HEADS: 4
"""


def layer_norm(x, weight, bias, eps=1e-6):
    mean = x.mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + eps) * weight + bias


def test_class_attention_maps_are_the_class_tokens_softmax_over_the_patches():
    """One class-attention block, computed as the official code does: LayerNorm of [class token,
    patches], q from the class token, k from all tokens, a softmax per head over all tokens."""
    paddle.seed(0)
    model = XCiT(patch_size=16, embed_dim=32, depth=1, num_heads=4, num_classes=5, cls_attn_layers=1)
    model.eval()
    images = paddle.randn([2, 3, 48, 80])
    maps = model.class_attention_maps(images).numpy()
    assert maps.shape == (2, 4, 3, 5)
    with paddle.no_grad():
        tokens, (Hp, Wp) = model.patch_embed(images)
        tokens = model.blocks[0](tokens + model.pos_embeder(Hp, Wp), Hp, Wp).numpy()
    block = model.cls_attn_blocks[0]
    cls = np.broadcast_to(model.cls_token.numpy(), (2, 1, 32))
    normed = layer_norm(np.concatenate([cls, tokens], axis=1), block.norm1.weight.numpy(), block.norm1.bias.numpy())
    qkv = normed @ block.attn.qkv.weight.numpy() + block.attn.qkv.bias.numpy()  # (B, 1 + N, 3C)
    q = qkv[:, 0, :32].reshape(2, 4, 8)
    k = qkv[:, :, 32:64].reshape(2, -1, 4, 8)
    scores = np.einsum('bhd,bnhd->bhn', q, k) * 8 ** -0.5
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    np.testing.assert_allclose(maps, weights[:, :, 1:].reshape(2, 4, Hp, Wp), atol=1e-6)


def test_class_attention_maps_of_the_default_two_blocks_are_distributions():
    model = XCiT(patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=5)
    model.eval()
    images = paddle.randn([2, 3, 40, 24])
    maps = model.class_attention_maps(images).numpy()
    assert maps.shape == (2, 2, 5, 3)
    assert np.all(maps >= 0) and np.all(maps.sum(axis=(2, 3)) <= 1 + 1e-6)
    same_maps, logits = model.class_attention_maps(images, return_outputs=True)  # one pass for both
    np.testing.assert_array_equal(same_maps.numpy(), maps)
    np.testing.assert_array_equal(logits.numpy(), model(images).numpy())


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    return random_model_files(tmp_path_factory.mktemp('visualize'), TINY_YAML)


def test_script_draws_one_png_per_image_and_names_unreadable_files(tiny, tmp_path, capsys):
    cfg, weights = tiny
    images = tmp_path / 'images'
    (images / 'sub').mkdir(parents=True)
    Image.new('RGB', (120, 90), (200, 40, 40)).save(images / 'cat.jpg')
    Image.new('RGB', (90, 120), (40, 40, 200)).save(images / 'sub' / 'cat.png')
    (images / 'broken.jpg').write_bytes(b'not an image')
    names = tmp_path / 'names.txt'
    names.write_text(''.join(f'digit {i}\n' for i in range(10)), encoding='utf-8')
    with pytest.raises(SystemExit) as exit_info:
        visualize_attention.main(['-cfg', cfg, '-pretrained', weights, '-image_size', '96', '-class_names',
                                  str(names), '-output', str(tmp_path / 'out'), str(images)])
    assert exit_info.value.code == 1
    out, err = capsys.readouterr()
    assert f'{images / "broken.jpg"}: cannot read the image' in err
    assert 'error: 1 of 3 files could not be read' in err
    assert '4 heads on a 6 x 6 token grid' in out and f'{images / "cat.jpg"}: digit ' in out
    pngs = sorted(p.name for p in (tmp_path / 'out').iterdir())
    assert pngs == ['cat_attention.png', 'cat_attention_2.png']  # same name, not overwritten
    with Image.open(tmp_path / 'out' / 'cat_attention.png') as figure:
        # image, mean and 4 heads: 6 tiles of 96 x 96 in one row, under the title line
        assert figure.size == (6 * 96, visualize_attention.TITLE_HEIGHT + 96)


def test_a_figure_that_cannot_be_written_is_named_and_the_others_drawn(tiny, tmp_path, capsys):
    """A folder in the way of one PNG: one error line naming it (it was a traceback that left the
    remaining images undrawn), and no temporary file."""
    cfg, weights = tiny
    for name in ('a', 'b'):
        Image.new('RGB', (64, 64), (20, 160, 40)).save(tmp_path / f'{name}.jpg')
    (tmp_path / 'out' / 'a_attention.png').mkdir(parents=True)
    with pytest.raises(SystemExit) as exit_info:
        visualize_attention.main(['-cfg', cfg, '-pretrained', weights, '-output', str(tmp_path / 'out'),
                                  str(tmp_path / 'a.jpg'), str(tmp_path / 'b.jpg')])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err == (f'error: cannot write {tmp_path / "out" / "a_attention.png"} (Is a directory); the file is as '
                   f'it was before\n'
                   f'error: 1 of 2 figures could not be written\n')
    assert sorted(p.name for p in (tmp_path / 'out').iterdir()) == ['a_attention.png', 'b_attention.png']
    assert (tmp_path / 'out' / 'b_attention.png').is_file()


def test_backbone_without_head_draws_maps_without_a_class(tmp_path, capsys):
    """Self-supervised backbones (DINO) have no classifier: the maps, no top-1 class."""
    cfg, weights = random_model_files(tmp_path, TINY_YAML.replace('NUM_CLASSES: 10', 'NUM_CLASSES: 0'))
    Image.new('RGB', (64, 64), (20, 160, 40)).save(tmp_path / 'leaf.jpg')
    visualize_attention.main(['-cfg', cfg, '-pretrained', weights, '-output', str(tmp_path / 'out'),
                              str(tmp_path / 'leaf.jpg')])
    out = capsys.readouterr().out
    assert f'{tmp_path / "leaf.jpg"}: 4 heads on a 4 x 4 token grid -> {tmp_path / "out" / "leaf_attention.png"}' in out
    with Image.open(tmp_path / 'out' / 'leaf_attention.png') as figure:
        assert figure.size == (6 * 64, visualize_attention.TITLE_HEIGHT + 64)


def test_script_without_images_is_one_error_line(tiny, tmp_path, capsys):
    cfg, weights = tiny
    (tmp_path / 'empty').mkdir()
    with pytest.raises(SystemExit) as exit_info:
        visualize_attention.main(['-cfg', cfg, '-pretrained', weights, str(tmp_path / 'empty')])
    assert exit_info.value.code == 1
    assert capsys.readouterr().err.startswith('error: no image files (')


def test_ema_asks_for_the_checkpoints_ema_weights(tiny, tmp_path, capsys):
    cfg, weights = tiny
    with pytest.raises(SystemExit) as exit_info:
        visualize_attention.main(['-cfg', cfg, '-pretrained', weights, '-ema', str(tmp_path)])
    assert exit_info.value.code == 1
    assert ("its EMA weights ('model_ema') were asked for (-ema; use_ema in Python), but this "
            "plain state dict has none") in capsys.readouterr().err


def test_a_model_without_class_attention_is_one_error_line(tmp_path, capsys):
    """MODEL.CLS_ATTN_LAYERS 0: no class attention to draw, said in one line naming the key
    before any image is read (it was a ValueError traceback)."""
    cfg, weights = random_model_files(tmp_path, TINY_YAML + '  CLS_ATTN_LAYERS: 0\n')
    Image.new('RGB', (64, 64), (20, 160, 40)).save(tmp_path / 'leaf.jpg')
    with pytest.raises(SystemExit) as exit_info:
        visualize_attention.main(['-cfg', cfg, '-pretrained', weights, '-output', str(tmp_path / 'out'),
                                  str(tmp_path / 'leaf.jpg')])
    assert exit_info.value.code == 1
    assert capsys.readouterr().err == (f'error: {cfg}: MODEL.CLS_ATTN_LAYERS is 0: the model has no class '
                                       f'attention to draw\n')
    assert not (tmp_path / 'out').exists()


def test_class_names_that_are_not_utf8_text_are_named(tiny, tmp_path, capsys):
    """A UTF-16 list of names: one error naming the file (it was a UnicodeDecodeError traceback)."""
    cfg, weights = tiny
    names = tmp_path / 'names16.txt'
    names.write_text(''.join(f'digit {i}\n' for i in range(10)), encoding='utf-16')
    with pytest.raises(SystemExit) as exit_info:
        visualize_attention.main(['-cfg', cfg, '-pretrained', weights, '-class_names', str(names), '-output',
                                  str(tmp_path / 'out'), str(tmp_path)])
    assert exit_info.value.code == 1
    assert capsys.readouterr().err == (f'error: -class_names {names}: not UTF-8 text (invalid start byte at byte 0); '
                                       f'give a text file of class names, one per line\n')


def test_output_that_is_a_file_is_one_error_line_before_any_image(tiny, tmp_path, capsys):
    """It was a FileExistsError traceback."""
    cfg, weights = tiny
    Image.new('RGB', (64, 64), (20, 160, 40)).save(tmp_path / 'leaf.jpg')
    (tmp_path / 'out').write_text('')
    with pytest.raises(SystemExit) as exit_info:
        visualize_attention.main(['-cfg', cfg, '-pretrained', weights, '-output', str(tmp_path / 'out'),
                                  str(tmp_path / 'leaf.jpg')])
    assert exit_info.value.code == 1
    out, err = capsys.readouterr()
    assert (out, err) == ('', f'error: -output {tmp_path / "out"} is a file, not a folder\n')


def test_tiles_undo_the_normalisation_and_blend_the_map_scaled_to_its_maximum():
    """to_rgb inverts the evaluation normalisation to the original pixels; overlay enlarges each
    token to a block, scales the map so that its maximum is 1 (the colour map's yellow end) and
    blends it in with weight 0.6."""
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    pixels = np.random.default_rng(0).integers(0, 256, (8, 12, 3)).astype(np.uint8)
    normalised = (pixels.transpose(2, 0, 1) / np.float32(255) - np.reshape(mean, (3, 1, 1))) / np.reshape(std, (3, 1, 1))
    np.testing.assert_array_equal(visualize_attention.to_rgb(normalised.astype(np.float32), mean, std), pixels)
    heat = np.array([[0.0, 0.1, 0.2], [0.0, 0.0, 0.0]])  # 2 x 3 tokens of 4 x 4 pixels
    tile = visualize_attention.overlay(pixels, heat).astype(np.float64)
    yellow, blue = visualize_attention.COLOURS[-1], visualize_attention.COLOURS[0]
    np.testing.assert_array_equal(tile[:4, 8:], np.clip(np.rint(0.4 * pixels[:4, 8:] + 0.6 * yellow), 0, 255))
    np.testing.assert_array_equal(tile[4:], np.clip(np.rint(0.4 * pixels[4:] + 0.6 * blue), 0, 255))
    assert visualize_attention.colourise(np.array([0.5]))[0].tolist() == visualize_attention.COLOURS[2].tolist()
