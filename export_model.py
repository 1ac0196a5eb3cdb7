"""Exports an XCiT to a Paddle inference model and checks it against the dygraph model.

    python export_model.py -cfg configs/xcit_nano_12_p16_224.yaml \\
        -pretrained xcit_nano_12_p16_224.pdparams -output export/xcit_nano_12_p16_224 [-image_size 224]

writes ``<output>/model.json`` (the program; Paddle 3) and ``<output>/model.pdiparams`` (the
weights). The batch size is always dynamic; height and width are dynamic too, unless
``-image_size S`` fixes the input to S x S. Paddle 2.x writes its own format,
``model.pdmodel``, which Paddle Lite and Paddle2ONNX read; ``--legacy-format`` asks for that
format and needs Paddle 2.x (see ``--help``).

``-onnx`` also converts the export to ``<output>/model.onnx`` (opset ``ONNX_OPSET``, the same
dynamic axes) with Paddle2ONNX, for ONNX-based runtimes (checked with ONNX Runtime); it needs
``pip install paddle2onnx onnxruntime`` (``paddle2onnx<2`` with Paddle 2.6).

The script then runs the exported model with ``paddle.inference`` (plain CPU kernels, and
oneDNN when Paddle has it), and with ONNX Runtime for ``-onnx``, and the dygraph model on the
same random images, prints the largest logit difference and exits with status 1 when it
exceeds ``TOLERANCE``. When the check passes, the model's config (with the export's
``-image_size``) goes to ``<output>/config.yaml``: ``predict.py -model_dir`` takes its
transform and classes from there.
"""
import argparse
import contextlib
import importlib.util
import logging
import os
import shutil
import sys
import tempfile

import numpy as np
import paddle

from config import ConfigError, get_config, with_setting
from utils import CheckpointError, load_every_weight, write_config
from xcit import build_xcit

TOLERANCE = 1e-4  # max abs logit difference between the exported and the dygraph model
ONNX_OPSET = 17  # the first with LayerNormalization
ONNX_PACKAGES = 'pip install paddle2onnx onnxruntime (paddle2onnx<2 with Paddle 2.6)'
PADDLE_MAJOR = int(paddle.__version__.split('.')[0])
PROGRAM_SUFFIXES = ('.json', '.pdmodel') if PADDLE_MAJOR >= 3 else ('.pdmodel',)  # Paddle 2 cannot read .json
EXPORT_CONFIG = 'config.yaml'  # the exported model's config, written once the check has passed
EXPORT_FILES = ('model.json', 'model.pdmodel', 'model.pdiparams', 'model.pdiparams.info', 'model.onnx',
                EXPORT_CONFIG)  # what an export writes: removed from the folder when a new one replaces it
HAS_ONEDNN = paddle.base.core.is_compiled_with_mkldnn()
# Paddle 2.6's oneDNN passes miscompute a fixed-size export of trained weights (nano logits off by
# up to 0.8) when this pass adds the bias into a matmul whose reshape and transpose another pass
# has already fused into it; without it the results are right and no slower. Paddle 3 is right.
ONEDNN_PASSES_OFF = ('matmul_elementwise_add_mkldnn_fuse_pass',) if PADDLE_MAJOR < 3 else ()
GPU_MEMORY_POOL_MB = 512  # Paddle Inference's initial GPU memory pool; it grows when needed


class ExportError(RuntimeError):
    """The export cannot be written, or it does not reproduce the dygraph model."""


def config_at_size(cfg_path, image_size=None):
    """The config of ``cfg_path``, with DATA.IMAGE_SIZE ``image_size`` when given (``-image_size``:
    a value out of range raises ``ConfigError`` naming it)."""
    config = get_config(cfg_path)
    return config if image_size is None else with_setting(config, 'DATA.IMAGE_SIZE', image_size, '-image_size')


def load_model(cfg_path, pretrained, image_size=None, use_ema=False):
    """(config, eval-mode XCiT) of ``cfg_path`` with every weight of ``pretrained``.

    ``pretrained`` is a converted ``.pdparams`` or a training checkpoint (its 'model' entry, or
    with ``use_ema`` its 'model_ema'). Unlike training, nothing may be missing: a missing,
    unexpected or differently shaped key raises ``CheckpointError`` with a table of them.
    """
    config = config_at_size(cfg_path, image_size)
    model = build_xcit(config)
    load_every_weight(model, pretrained, f'the model of {cfg_path}', use_ema)
    model.eval()
    return config, model


def export(model, output, image_size=None):
    """Writes ``model`` to ``output``/model.{json or pdmodel, pdiparams}; returns the program path.

    Input spec [None, 3, H, W] float32 with H = W = ``image_size``, or dynamic H and W.
    ``model`` stays a dygraph model (``paddle.jit.to_static(model)`` would replace its forward
    by the static function, and what is compared with the export afterwards would no longer
    be the dygraph model).
    """
    spec = [paddle.static.InputSpec([None, 3, image_size, image_size], 'float32', name='image')]
    paddle.jit.save(model, os.path.join(output, 'model'), input_spec=spec)
    return program_path(output)


@contextlib.contextmanager
def staging_folder(output):
    """A new empty folder beside ``output`` (on the same file system) for an export to be written
    and checked in before ``publish`` moves it there; removed on leaving, whatever happened.
    Raises ``ExportError`` when ``output`` is a file or its parent folder cannot be written to."""
    if os.path.exists(output) and not os.path.isdir(output):
        raise ExportError(f'-output {output} is a file, not a folder')
    parent = os.path.dirname(os.path.abspath(output))
    try:
        os.makedirs(parent, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=f'.{os.path.basename(os.path.abspath(output))}.', dir=parent)
    except OSError as e:
        raise ExportError(f'-output {output}: cannot write to {parent} ({e.strerror or e})') from e
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def publish(staging, output):
    """Moves the checked export in ``staging`` into ``output``, whose files of an earlier export
    (``EXPORT_FILES``) are removed first: none may outlive the new one. ``config.yaml``, the mark
    of a usable export, goes last. Returns the program path; raises ``ExportError`` when the
    system refuses a step (the folder then holds no ``config.yaml``)."""
    try:
        os.makedirs(output, exist_ok=True)
        for name in reversed(EXPORT_FILES):  # config.yaml first
            if os.path.isfile(os.path.join(output, name)):
                os.remove(os.path.join(output, name))
        names = sorted(os.listdir(staging), key=lambda name: name == EXPORT_CONFIG)
        for name in names:
            os.replace(os.path.join(staging, name), os.path.join(output, name))
    except OSError as e:
        raise ExportError(f'-output {output}: cannot put the checked export there ({e.strerror or e}: '
                          f'{e.filename2 or e.filename}); it holds no usable export now (no {EXPORT_CONFIG})') from e
    return program_path(output)


def in_memory_predictor(model, image_size=None, threads=None, onnx=False):
    """An ``InferenceModel`` (with ``onnx``, an ``OnnxModel``) of ``model``'s current weights,
    exported (``export``) to a temporary folder that is gone once the predictor has read it;
    later changes to ``model`` do not reach the predictor."""
    with tempfile.TemporaryDirectory(prefix='xcit_export_') as folder:
        export(model, folder, image_size)
        if onnx:
            return OnnxModel(export_onnx(folder), threads=threads)
        return InferenceModel(folder, threads=threads)


def program_path(model_dir):
    """The program file of an exported model folder: model.json (Paddle 3) or model.pdmodel."""
    if not os.path.isdir(model_dir):
        raise ExportError(f'{model_dir}: no such folder')
    for suffix in PROGRAM_SUFFIXES:
        path = os.path.join(model_dir, 'model' + suffix)
        if os.path.isfile(path):
            return path
    if os.path.isfile(os.path.join(model_dir, 'model.json')):
        raise ExportError(f'{model_dir}: model.json is a Paddle 3 export, which Paddle {paddle.__version__} '
                          f'cannot read; export the model again with this Paddle (it writes model.pdmodel)')
    raise ExportError(f'{model_dir}: no exported model (model.json or model.pdmodel) found')


class InferenceModel:
    """An exported model run by ``paddle.inference``: images (B, 3, H, W) -> logits.

    ``device`` is ``'cpu'`` or ``'gpu:N'`` (see ``utils.resolve_device``). On the CPU, ``mkldnn``
    selects the oneDNN kernels (when Paddle has them) and ``threads`` is the math library's
    thread count (default: all CPUs); on a GPU, Paddle Inference's GPU kernels run in float32.
    """

    def __init__(self, model_dir, mkldnn=True, threads=None, device='cpu'):
        from paddle import inference
        program, params = program_path(model_dir), os.path.join(model_dir, 'model.pdiparams')
        if not os.path.isfile(params):
            raise ExportError(f'{model_dir}: the weights of the exported model, model.pdiparams, are missing')
        config = inference.Config(program, params)
        config.disable_glog_info()
        self.model_dir, self.device = model_dir, device
        self.mkldnn = False
        if device.startswith('gpu'):
            config.enable_use_gpu(GPU_MEMORY_POOL_MB, int(device.partition(':')[2] or 0))
        else:
            config.disable_gpu()
            config.set_cpu_math_library_num_threads(threads or os.cpu_count() or 1)
            self.mkldnn = mkldnn and HAS_ONEDNN
            if self.mkldnn:
                config.enable_mkldnn()
                for name in ONEDNN_PASSES_OFF:
                    config.delete_pass(name)
            else:  # a new Config has oneDNN on (Paddle 2.6 and 3)
                config.disable_mkldnn()
        try:
            self.predictor = inference.create_predictor(config)
        except (RuntimeError, ValueError) as e:  # e.g. a truncated model.pdiparams or model.json
            raise ExportError(f'{model_dir}: Paddle Inference cannot load the exported model '
                              f'({" ".join(str(e).split())[:200]}); export it again') from e
        self.input = self.predictor.get_input_handle(self.predictor.get_input_names()[0])
        self.output = self.predictor.get_output_handle(self.predictor.get_output_names()[0])

    @property
    def name(self):
        if self.device.startswith('gpu'):
            return f'paddle.inference {self.device}'
        return 'paddle.inference ' + ('oneDNN' if self.mkldnn else 'CPU')

    def __call__(self, images):
        images = np.ascontiguousarray(images, dtype='float32')
        self.input.reshape(list(images.shape))
        self.input.copy_from_cpu(images)
        try:
            self.predictor.run()
        except (RuntimeError, ValueError) as e:  # Paddle 3 often says only 'std::exception'
            raise ExportError(f'{self.model_dir}: {self.name} failed on images of shape {list(images.shape)} '
                              f'({" ".join(str(e).split())[:200]}); a model exported with -image_size takes only '
                              f'that size') from e
        outputs = self.output.copy_to_cpu()
        if outputs.shape[0] != images.shape[0]:  # a fixed-size graph folds other token counts into the batch
            raise ExportError(f'{self.model_dir}: {self.name} gave {outputs.shape[0]} rows of outputs for '
                              f'{images.shape[0]} images of {images.shape[2]} x {images.shape[3]} pixels: it was '
                              f'exported with -image_size for another size, and takes only that size')
        return outputs


def check_onnx_packages(what='-onnx'):
    """Raises ``ExportError`` naming Paddle2ONNX or ONNX Runtime when one is not installed."""
    missing = [name for name in ('paddle2onnx', 'onnxruntime') if importlib.util.find_spec(name) is None]
    if missing:
        raise ExportError(f'{what} needs {" and ".join(missing)}: {ONNX_PACKAGES}')


def export_onnx(model_dir):
    """Converts the export in ``model_dir`` to ``model_dir``/model.onnx; returns its path."""
    import paddle2onnx
    path = os.path.join(model_dir, 'model.onnx')
    options = {}
    if int(paddle2onnx.__version__.split('.')[0]) >= 2:
        options['optimize_tool'] = 'None'  # its default, Polygraphy, pip-installs packages it lacks
    try:
        paddle2onnx.export(program_path(model_dir), os.path.join(model_dir, 'model.pdiparams'), path,
                           opset_version=ONNX_OPSET, auto_upgrade_opset=False, verbose=False, **options)
    except Exception as e:  # whatever the converter raises, the user gets one line naming it
        raise ExportError(f'Paddle2ONNX {paddle2onnx.__version__} could not convert the exported model: {e}') from e
    if not os.path.isfile(path):
        raise ExportError(f'Paddle2ONNX {paddle2onnx.__version__} did not write model.onnx (see its log above)')
    return path


class OnnxModel:
    """A model.onnx run by ONNX Runtime on the CPU: images (B, 3, H, W) -> logits."""

    name = 'onnxruntime'

    def __init__(self, path, threads=None):
        import onnxruntime
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads or os.cpu_count() or 1
        options.log_severity_level = 3  # errors only: not the unused constants Paddle2ONNX leaves
        self.session = onnxruntime.InferenceSession(path, options, providers=['CPUExecutionProvider'])
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, images):
        return self.session.run(None, {self.input_name: np.ascontiguousarray(images, dtype='float32')})[0]


def check_inputs(size, dynamic_size, patch_size, seed=0):
    """Random images for the check: batch 2 at size x size, and, when the exported height and
    width are dynamic, a non-square batch of 1 whose sides are not multiples of the patch."""
    rng = np.random.default_rng(seed)
    shapes = [(2, 3, size, size)]
    if dynamic_size:
        shapes.append((1, 3, size + patch_size // 2, max(size - patch_size - 3, patch_size + 1)))
    return [rng.standard_normal(shape).astype('float32') for shape in shapes]


def max_difference(model, runners, inputs):
    """Largest abs difference between the dygraph logits and each runner's: [(name, diff)]."""
    with paddle.no_grad():
        expected = [model(paddle.to_tensor(x)).numpy() for x in inputs]
    return [(run.name, max(float(np.abs(run(x) - y).max()) for x, y in zip(inputs, expected)))
            for run in runners]


def check_export(model, model_dir, config, image_size, onnx):
    """Runs the export in ``model_dir`` (with ``paddle.inference``, plain and oneDNN kernels, and
    converted to ONNX for ``onnx``) and ``model`` on the same random images, printing each
    largest logit difference; raises ``ExportError`` when one exceeds ``TOLERANCE``."""
    inputs = check_inputs(config.DATA.IMAGE_SIZE, not image_size, config.MODEL.PATCH_SIZE)
    runners = [InferenceModel(model_dir, mkldnn=False)]
    if HAS_ONEDNN:
        runners.append(InferenceModel(model_dir, mkldnn=True))
    if onnx:
        runners.append(OnnxModel(export_onnx(model_dir)))
    shapes = ', '.join(str(list(x.shape)) for x in inputs)
    failed = []
    outputs = 'logits' if config.MODEL.NUM_CLASSES else 'features'
    for name, diff in max_difference(model, runners, inputs):
        print(f'{name}: max |{outputs} - dygraph {outputs}| = {diff:.2e} on {shapes}')
        if not diff <= TOLERANCE:  # also catches NaN
            failed.append(f'{name} {diff:.2e}')
    if failed:
        raise ExportError(f'the exported model does not reproduce the dygraph model (tolerance {TOLERANCE:.0e}): '
                          f'{"; ".join(failed)}')


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('-cfg', required=True, help='model YAML config')
    parser.add_argument('-pretrained', required=True,
                        help='weights: a converted .pdparams or a training checkpoint')
    parser.add_argument('-ema', action='store_true', help="the training checkpoint's EMA weights ('model_ema')")
    parser.add_argument('-output', required=True,
                        help='folder for model.json / model.pdmodel, model.pdiparams and config.yaml '
                             '(and model.onnx with -onnx)')
    parser.add_argument('-image_size', type=int, default=None,
                        help='fix the input to S x S (default: dynamic height and width)')
    parser.add_argument('--legacy-format', action='store_true',
                        help='write the Paddle 2.x format (model.pdmodel) for Paddle Lite and Paddle2ONNX. '
                             'Only Paddle 2.x writes it: Paddle 3 cannot trace this model into its legacy '
                             'program IR, and a model.json cannot be converted to .pdmodel')
    parser.add_argument('-onnx', action='store_true',
                        help=f'also write model.onnx (opset {ONNX_OPSET}) and check it with ONNX Runtime; '
                             f'needs {ONNX_PACKAGES}')
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    logging.getLogger('paddle').setLevel(logging.WARNING)
    # The export is device-independent; the check compares CPU runs only: a GPU's float32 kernels
    # round differently (e.g. TF32 convolutions on Ampere), which is not what it is there to catch.
    paddle.set_device('cpu')
    try:
        if args.legacy_format and PADDLE_MAJOR >= 3:
            raise ExportError(f'--legacy-format: Paddle {paddle.__version__} cannot write model.pdmodel. '
                              f'Run this script with paddlepaddle 2.6 (bash scripts/test_paddle26.sh sets '
                              f'one up in ./.venv26), whose export is the .pdmodel format.')
        if args.onnx:
            check_onnx_packages()
        config, model = load_model(args.cfg, args.pretrained, args.image_size, args.ema)
        with staging_folder(args.output) as staging:
            try:
                export(model, staging, args.image_size)
                check_export(model, staging, config, args.image_size, args.onnx)
            except ExportError as e:
                raise ExportError(f'{e}. Nothing was written to {args.output}.') from e
            write_config(config, os.path.join(staging, EXPORT_CONFIG))
            path = publish(staging, args.output)
        size = f'{args.image_size}, {args.image_size}' if args.image_size else 'H, W'
        dynamic = 'batch' if args.image_size else 'batch, height and width'
        print(f'exported {config.MODEL.NAME} to {path} and model.pdiparams'
              + (f', model.onnx (ONNX opset {ONNX_OPSET})' if args.onnx else '')
              + f' (input [N, 3, {size}] float32; dynamic {dynamic})')
        print(f'OK: the exported model matches the dygraph model within {TOLERANCE:.0e}; its config (the '
              f'transform and classes predict.py uses) is {os.path.join(args.output, EXPORT_CONFIG)}')
    except (ConfigError, CheckpointError, ExportError) as e:
        print(f'error: {e}', file=sys.stderr)
        sys.exit(1)


if __name__ == '__main__':
    main()
