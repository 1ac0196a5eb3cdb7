"""Class-attention maps of an XCiT: where its class token looks in an image, head by head.

    python visualize_attention.py -cfg configs/xcit_small_12_p8_224.yaml \\
        -pretrained xcit_small_12_p8_224.pdparams cat.jpg -image_size 448 -output attention/

For each image, the last class-attention block's softmax weights over the patches (one map per
head, ``XCiT.class_attention_maps``) are drawn over the image as it enters the model (the
evaluation transform of ``-cfg``, at ``-image_size`` if given: XCiT takes any size, and larger
inputs give finer maps). Each map is scaled to its own maximum; a head's label gives the share
of its attention on the patches (the rest is on the class token). The PNG,
``<output>/<image name>_attention.png``, has the image, the mean of the heads' maps and each
head's map, with the model's top-1 class as the title line (none for a backbone without
classifier head, such as the self-supervised DINO models). The model runs on the CPU. A file
that cannot be read as an image is reported on stderr and skipped; the exit status is then 1.
"""
import argparse
import os
import sys

import numpy as np
import paddle
from PIL import Image, ImageDraw

from config import ConfigError
from export_model import load_model
from predict import image_paths, read_class_names, readable_batches
from transforms import build_eval_transform
from utils import CheckpointError, OutputWriteError, check_output_folder, save_png

COLUMNS = 6  # tiles per row of the PNG
TITLE_HEIGHT = 16  # pixels
# colour map anchors from 0 (dark blue) to 1 (yellow), interpolated linearly
COLOURS = np.array([[48, 18, 59], [40, 120, 235], [30, 200, 160], [160, 230, 60], [250, 230, 35]], dtype=np.float32)


def colourise(heat):
    """Map (H, W) in [0, 1] -> RGB (H, W, 3) float32 in [0, 255]."""
    position = heat * (len(COLOURS) - 1)
    low = np.clip(np.floor(position).astype(int), 0, len(COLOURS) - 2)
    frac = (position - low)[..., None]
    return COLOURS[low] * (1 - frac) + COLOURS[low + 1] * frac


def overlay(image, heat, alpha=0.6):
    """``image`` (H, W, 3) uint8 and a map on the token grid (Hp, Wp) -> RGB uint8 tile: the map,
    scaled to its maximum and enlarged to the image (each token a block of pixels), blended in."""
    heat = heat / max(float(heat.max()), 1e-12)
    rows = np.linspace(0, heat.shape[0], image.shape[0], endpoint=False).astype(int)
    cols = np.linspace(0, heat.shape[1], image.shape[1], endpoint=False).astype(int)
    tile = (1 - alpha) * image + alpha * colourise(heat[rows][:, cols])
    return np.clip(np.rint(tile), 0, 255).astype(np.uint8)


def to_rgb(tensor, mean, std):
    """A normalised (3, H, W) float32 image -> (H, W, 3) uint8."""
    image = tensor.transpose(1, 2, 0) * np.asarray(std, np.float32) + np.asarray(mean, np.float32)
    return np.clip(np.rint(image * 255), 0, 255).astype(np.uint8)


def attention_figure(image, maps, title):
    """The PNG of one image: ``image`` (H, W, 3) uint8 and ``maps`` (heads, Hp, Wp) -> PIL image
    with the image, the heads' mean map and each head's map (labelled with the share of the
    head's attention on the patches; the rest is on the class token), ``COLUMNS`` tiles a row,
    under a title line."""
    tiles = [image, overlay(image, maps.mean(axis=0))] + [overlay(image, m) for m in maps]
    labels = ['', 'mean'] + [f'head {i + 1}: {m.sum():.0%}' for i, m in enumerate(maps)]
    height, width = image.shape[:2]
    rows = -(-len(tiles) // COLUMNS)
    figure = Image.new('RGB', (min(len(tiles), COLUMNS) * width, TITLE_HEIGHT + rows * height), 'white')
    draw = ImageDraw.Draw(figure)
    draw.text((2, 2), title, fill='black')
    for i, (tile, label) in enumerate(zip(tiles, labels)):
        left, top = (i % COLUMNS) * width, TITLE_HEIGHT + (i // COLUMNS) * height
        figure.paste(Image.fromarray(tile), (left, top))
        if label:
            draw.rectangle([left, top, left + 6 * len(label) + 4, top + 12], fill='white')
            draw.text((left + 2, top), label, fill='black')
    return figure


def top1_label(logits, names):
    """``'<name> (<index>); '`` of the top-1 class of ``logits`` (num_classes,), or ``''`` when
    ``names`` is None (a backbone without classifier head: the outputs are features)."""
    if names is None:
        return ''
    top1 = int(logits.argmax())
    return f'{names[top1]} ({top1}); '


def output_path(folder, image_path, written):
    """``folder``/<image name>_attention.png, numbered (_2, _3, ...) when an image of the same
    name was written before in this run; the path is added to ``written``."""
    stem = os.path.join(folder, os.path.splitext(os.path.basename(image_path))[0] + '_attention')
    path, n = stem + '.png', 1
    while path in written:
        n += 1
        path = f'{stem}_{n}.png'
    written.add(path)
    return path


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('inputs', nargs='+', metavar='IMAGE_OR_FOLDER',
                        help='image files, or folders: every image file below them, sorted')
    parser.add_argument('-cfg', required=True, help='model YAML config (its DATA section sets the transform)')
    parser.add_argument('-pretrained', required=True, help='weights (.pdparams or training checkpoint)')
    parser.add_argument('-ema', action='store_true', help="the training checkpoint's EMA weights ('model_ema')")
    parser.add_argument('-image_size', type=int, default=None, help='input side in pixels (default: the config\'s)')
    parser.add_argument('-output', default='attention', help='folder for the PNGs (default: ./attention)')
    parser.add_argument('-class_names', default=None,
                        help='class names, one per line, or the image folder dataset the model was trained on '
                             '(its train/ class folders, in label order) (default: the config\'s DATA.CLASS_NAMES, '
                             'which a run on an image folder writes in its config.yaml, else ImageNet-1k names '
                             'for 1000 classes)')
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    paddle.set_device('cpu')
    try:
        config, model = load_model(args.cfg, args.pretrained, args.image_size, args.ema)
        if config.MODEL.CLS_ATTN_LAYERS == 0:
            raise ConfigError(f'{args.cfg}: MODEL.CLS_ATTN_LAYERS is 0: the model has no class attention to draw')
        names = read_class_names(args.class_names, config.MODEL.NUM_CLASSES, config.DATA.CLASS_NAMES)
        paths = [path for path, _ in image_paths(args.inputs)]
        check_output_folder(args.output)  # created after the checks above, before any image is drawn
    except (ConfigError, CheckpointError, OSError) as e:
        print(f'error: {e}', file=sys.stderr)
        sys.exit(1)
    transform = build_eval_transform(config)
    written = set()
    failed, unwritten = [], 0
    for (path,), (image,) in readable_batches(paths, transform, 1, failed, workers=1):
        with paddle.no_grad():
            maps, outputs = model.class_attention_maps(paddle.to_tensor(image[None]), return_outputs=True)
        maps = maps[0].numpy()
        prediction = top1_label(outputs[0].numpy(), names)
        title = f'{os.path.basename(path)}: {prediction}mean and {len(maps)} heads'
        figure = attention_figure(to_rgb(image, config.DATA.IMAGENET_MEAN, config.DATA.IMAGENET_STD), maps, title)
        target = output_path(args.output, path, written)
        try:
            save_png(figure, target)
        except OutputWriteError as e:
            print(f'error: {e}', file=sys.stderr)
            unwritten += 1
            continue
        print(f'{path}: {prediction}{len(maps)} heads on a {maps.shape[1]} x {maps.shape[2]} token grid -> {target}')
    if failed:
        print(f'error: {len(failed)} of {len(paths)} files could not be read', file=sys.stderr)
    if unwritten:
        print(f'error: {unwritten} of {len(paths)} figures could not be written', file=sys.stderr)
    if failed or unwritten:
        sys.exit(1)


if __name__ == '__main__':
    main()
