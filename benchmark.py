"""Throughput, latency and peak memory of XCiT on the CPU, and how they scale with resolution.

    python benchmark.py -cfg configs/xcit_nano_12_p16_224.yaml --batch 1 16 --sizes 224 384
    python benchmark.py -cfg configs/xcit_nano_12_p16_224.yaml --scaling --plot docs/scaling.png
    python benchmark.py -cfg configs/xcit_nano_12_p16_224.yaml --scaling --paths dygraph --sizes 224 448 896

Paths: ``dygraph`` (the eager model under ``paddle.no_grad``), ``static``
(``paddle.jit.to_static``) and ``infer`` (``paddle.jit.save`` + ``paddle.inference`` with
oneDNN), and on request ``onnx`` (that export converted by ``export_model.py -onnx``'s
Paddle2ONNX and run by ONNX Runtime), ``train`` (one training step: forward in training mode,
cross-entropy, backward, AdamW update; of the head alone for a linear probe's config,
``TRAIN.FREEZE_BACKBONE``, as training runs it) and ``train_gc`` (the same with gradient checkpointing,
``TRAIN.GRAD_CHECKPOINTING``). Weights are random: speed does not depend on them.

Every measurement runs in a fresh subprocess (``--threads`` OpenMP/math threads), so that
memory figures do not mix: after one warm-up batch, the median over ``--reps`` timed batches
gives latency (ms per batch) and throughput (images/s). Peak memory is the process's resident
set high-water mark (``VmHWM`` of /proc/self/status) minus its resident size once the model is
built (``VmRSS`` before the first batch), with the high-water mark restarted at that point
(``/proc/self/clear_refs``), so that building the model (tracing, export, conversion) does not
count: the memory the forward passes need on top of the weights and the libraries. Where the
mark cannot be restarted (no /proc, Linux before 4.0, no glibc) it is not reported.

``--scaling`` runs one model and path at one batch size (default 1) from 224 up to 1024
pixels, or over ``--sizes`` (stopping at the first size that fails, e.g. out of memory), fits
time and memory per image against the number of tokens by least squares, prints the slopes
and the ratios (largest / smallest size) next to the token ratio, and draws both against the
tokens in a PNG.
"""
import argparse
import ctypes
import ctypes.util
import json
import math
import os
import statistics
import subprocess
import sys
import time

from config import ConfigError, get_config
from export_model import ExportError, check_onnx_packages
from utils import OutputWriteError, check_output_file, save_png, write_json

HERE = os.path.dirname(os.path.abspath(__file__))
PATHS = ('dygraph', 'static', 'infer', 'onnx', 'train', 'train_gc')
DEFAULT_PATHS = ('dygraph', 'static', 'infer')  # onnx needs packages outside requirements.txt
SCALING_SIZES = (224, 320, 448, 576, 704, 832, 1024)


# ---------------------------------------------------------------- one measurement (subprocess)


def memory_kb(field):
    """``field`` (VmRSS, VmHWM) of /proc/self/status in kB, or None without /proc."""
    try:
        with open('/proc/self/status', encoding='ascii') as f:
            for line in f:
                if line.startswith(field + ':'):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def restart_peak():
    """Hands the heap's free memory back to the system (glibc's ``malloc_trim``: the allocator
    keeps what the model's build freed, and the forward passes would reuse it unseen) and
    restarts the VmHWM high-water mark at the resident size left (Linux 4.0 and later); False
    where that is not possible."""
    try:
        ctypes.CDLL(ctypes.util.find_library('c')).malloc_trim(0)
    except (OSError, AttributeError):
        return False
    try:
        with open('/proc/self/clear_refs', 'w', encoding='ascii') as f:
            f.write('5')
        return True
    except OSError:
        return False


def peak_kb():
    """Resident set high-water mark of this process in kB."""
    peak = memory_kb('VmHWM')
    if peak is None:
        import resource
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        if sys.platform == 'darwin':  # bytes there, kB on Linux
            peak //= 1024
    return peak


def build_runner(cfg, path, batch, size, threads):
    """A callable running one batch of random images through ``path`` (for the training paths,
    one training step on them); the model is built."""
    import numpy as np
    import paddle
    from xcit import build_xcit

    paddle.set_device('cpu')
    config = get_config(cfg)
    model = build_xcit(config)
    rng = np.random.default_rng(0)
    images = rng.standard_normal((batch, 3, size, size)).astype('float32')
    if path in ('train', 'train_gc'):
        labels = rng.integers(0, config.MODEL.NUM_CLASSES, batch)
        if config.TRAIN.FREEZE_BACKBONE:
            model.freeze_backbone()
        return training_step(model, images, labels, grad_checkpointing=path == 'train_gc')
    model.eval()
    if path in ('infer', 'onnx'):
        from export_model import in_memory_predictor
        predictor = in_memory_predictor(model, size, threads=threads, onnx=path == 'onnx')
        return lambda: predictor(images)
    spec = [paddle.static.InputSpec([None, 3, size, size], 'float32')]
    net = paddle.jit.to_static(model, input_spec=spec, full_graph=True) if path == 'static' else model
    x = paddle.to_tensor(images)

    def run():
        with paddle.no_grad():
            return net(x).numpy()
    if path == 'static':
        run()  # to_static traces on the first call: part of the build, not of the measurement
    return run


def training_step(model, images, labels, grad_checkpointing):
    """A callable running one training step of ``model`` on ``images`` (B, 3, S, S) and
    ``labels`` (B,): forward, cross-entropy, backward and an AdamW update of the parameters that
    train (not those of a frozen backbone)."""
    import paddle
    import paddle.nn.functional as F

    model.train()
    model.set_grad_checkpointing(grad_checkpointing)
    trained = [p for p in model.parameters() if not p.stop_gradient]
    optimizer = paddle.optimizer.AdamW(learning_rate=1e-4, parameters=trained)
    x, y = paddle.to_tensor(images), paddle.to_tensor(labels)

    def step():
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.clear_grad()
        return float(loss)
    return step


def measure(cfg, path, batch, size, threads, reps):
    """Runs in the worker process: the dict of one measurement."""
    run = build_runner(cfg, path, batch, size, threads)
    base = memory_kb('VmRSS') if restart_peak() else None
    run()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    latency = statistics.median(times)
    peak = peak_kb()
    return {'cfg': os.path.basename(cfg), 'path': path, 'batch': batch, 'size': size, 'threads': threads,
            'ms_per_batch': latency * 1e3, 'images_per_s': batch / latency,
            'peak_mb': (peak - base) / 1024 if base is not None else None, 'total_peak_mb': peak / 1024}


def run_worker(cfg, path, batch, size, threads, reps):
    """One measurement in a fresh process: its dict, or {'error': ...}."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), GLOG_minloglevel='2')
    job = json.dumps([os.path.abspath(cfg), path, batch, size, threads, reps])  # the worker runs in HERE
    cmd = [sys.executable, os.path.abspath(__file__), '--worker', job]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=HERE)
    lines = [line for line in done.stdout.splitlines() if line.startswith('{')]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ['no output'])[-1]
        return {'cfg': os.path.basename(cfg), 'path': path, 'batch': batch, 'size': size,
                'error': f'exit {done.returncode}: {tail}'}
    return json.loads(lines[-1])


# ---------------------------------------------------------------- reporting


def machine():
    """'N CPUs, <model name>, paddle <version>'."""
    model = 'unknown CPU'
    try:
        with open('/proc/cpuinfo', encoding='utf-8') as f:
            model = next((line.split(':', 1)[1].strip() for line in f if line.startswith('model name')), model)
    except OSError:
        pass
    import paddle
    return f'{os.cpu_count()} CPUs, {model}, paddle {paddle.__version__}'


def format_table(rows):
    header = (f'{"config":32s} {"path":8s} {"batch":>5s} {"size":>5s} '
              f'{"img/s":>8s} {"ms/batch":>9s} {"peak MB":>8s}')
    lines = [header, '-' * len(header)]
    for r in rows:
        if 'error' in r:
            lines.append(f'{r["cfg"]:32s} {r["path"]:8s} {r["batch"]:5d} {r["size"]:5d}  failed: {r["error"]}')
        else:
            peak = f'{r["peak_mb"]:8.0f}' if r['peak_mb'] is not None else f'{"-":>8s}'
            lines.append(f'{r["cfg"]:32s} {r["path"]:8s} {r["batch"]:5d} {r["size"]:5d} '
                         f'{r["images_per_s"]:8.1f} {r["ms_per_batch"]:9.1f} {peak}')
    return '\n'.join(lines)


def tokens(size, patch):
    return math.ceil(size / patch) ** 2


def least_squares(xs, ys):
    """(intercept, slope) of the least-squares line y = a + b x."""
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - slope * mx, slope


def scaling_summary(rows, patch):
    """Per-image time/memory fits against tokens and the (largest / smallest size) ratios; the
    memory entries are None where peak memory was not measured (no restartable high-water mark)."""
    ok = [r for r in rows if 'error' not in r]
    n = [tokens(r['size'], patch) for r in ok]
    ms = [r['ms_per_batch'] / r['batch'] for r in ok]
    summary = {'sizes': [r['size'] for r in ok], 'tokens': n, 'ms_per_image': ms, 'time_fit': least_squares(n, ms),
               'token_ratio': n[-1] / n[0], 'time_ratio': ms[-1] / ms[0],
               'mb_per_image': None, 'memory_fit': None, 'memory_ratio': None}
    if all(r['peak_mb'] is not None for r in ok):
        mb = [r['peak_mb'] / r['batch'] for r in ok]
        summary.update(mb_per_image=mb, memory_fit=least_squares(n, mb),
                       memory_ratio=mb[-1] / mb[0] if mb[0] > 0 else None)
    return summary


def format_scaling(summary):
    """The fits and ratios of ``scaling_summary`` as printed lines."""
    (a, b), token_ratio, time_ratio = summary['time_fit'], summary['token_ratio'], summary['time_ratio']
    lines = [f'time per image   = {a:.3g} ms + {b * 1e3:.4g} us x tokens']
    memory = 'peak memory not measured on this system'
    if summary['memory_fit'] is not None:
        c, e = summary['memory_fit']
        lines.append(f'memory per image = {c:.3g} MB + {e * 1e3:.4g} kB x tokens')
        if summary['memory_ratio'] is not None:
            memory = (f'peak memory per image x{summary["memory_ratio"]:.1f} '
                      f'({summary["memory_ratio"] / token_ratio:.2f} of the token ratio)')
    lines.append(f'{summary["sizes"][-1]} / {summary["sizes"][0]} pixels: tokens x{token_ratio:.1f}, '
                 f'time per image x{time_ratio:.1f} ({time_ratio / token_ratio:.2f} of the token ratio), {memory}')
    return '\n'.join(lines)


def draw_scaling(summary, title, path):
    """PNG of ms/image and MB/image (where measured) against tokens: points, least-squares lines, axes."""
    from PIL import Image, ImageDraw
    width, height, pad = 1000, 430, 60
    img = Image.new('RGB', (width, height), 'white')
    draw = ImageDraw.Draw(img)
    draw.text((pad, 10), title, fill='black')
    panels = [('time per image (ms)', summary['ms_per_image'], summary['time_fit'], (31, 119, 180))]
    if summary['mb_per_image'] is None:
        draw.text((pad + width // 2, height // 2), 'peak memory: not measured on this system', fill='black')
    else:
        panels.append(('peak memory per image (MB)', summary['mb_per_image'], summary['memory_fit'], (214, 39, 40)))
    n = summary['tokens']
    for i, (label, ys, (a, b), colour) in enumerate(panels):
        left, right = pad + i * width // 2, (i + 1) * width // 2 - 20
        top, bottom = 50, height - 50
        x_max, y_max = max(n) * 1.05, max(max(ys), a + b * max(n)) * 1.1
        y_min = 0.0

        def px(x, y):
            return (left + (right - left) * x / x_max, bottom - (bottom - top) * (y - y_min) / (y_max - y_min))
        draw.line([(left, top), (left, bottom), (right, bottom)], fill='black')
        for k in range(5):
            xv, yv = x_max * k / 4, y_min + (y_max - y_min) * k / 4
            draw.text((px(xv, y_min)[0] - 10, bottom + 5), f'{xv:.0f}', fill='black')
            draw.text((left - 45, px(0, yv)[1] - 6), f'{yv:.0f}', fill='black')
        x_start = max(0.0, -a / b) if b > 0 else 0.0  # the fit line where it is above 0
        draw.line([px(x_start, a + b * x_start), px(x_max, a + b * x_max)], fill=(150, 150, 150), width=2)
        for x, y in zip(n, ys):
            cx, cy = px(x, y)
            draw.ellipse([cx - 4, cy - 4, cx + 4, cy + 4], fill=colour)
        draw.text((left + 10, top - 18), f'{label}: fit {a:.3g} + {b:.3g} x tokens', fill=colour)
        draw.text(((left + right) // 2 - 20, bottom + 22), 'tokens', fill='black')
    save_png(img, path)


# ---------------------------------------------------------------- command line


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('-cfg', nargs='+', action='extend', default=None,
                        help='model configs (default: xcit_nano_12_p16_224)')
    parser.add_argument('--batch', type=int, nargs='+', action='extend', default=None,
                        help='batch sizes (default: 1 16; with --scaling one size, default 1)')
    parser.add_argument('--sizes', type=int, nargs='+', action='extend', default=None,
                        help='input sides (default: the config\'s; with --scaling '
                             f'{" ".join(map(str, SCALING_SIZES))})')
    parser.add_argument('--paths', nargs='+', action='extend', choices=PATHS, default=None,
                        help=f'compute paths (default: {" ".join(DEFAULT_PATHS)}; with --scaling one path, '
                             f'default infer)')
    parser.add_argument('--threads', type=int, default=2,
                        help="CPU threads per measurement: OMP_NUM_THREADS and the predictor's (default 2)")
    parser.add_argument('--reps', type=int, default=5,
                        help='timed batches per measurement, after one warm-up batch; their median counts '
                             '(default 5)')
    parser.add_argument('--scaling', action='store_true',
                        help='time and memory per image against tokens for one config, path and batch size')
    parser.add_argument('--plot', default=None, help='PNG written by --scaling (default: scaling.png)')
    parser.add_argument('--json', default=None, help='also write the measurements to this JSON file')
    parser.add_argument('--worker', default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return args
    args.cfg = args.cfg or [os.path.join(HERE, 'configs', 'xcit_nano_12_p16_224.yaml')]
    for name in ('batch', 'sizes', 'threads', 'reps'):
        values = getattr(args, name)
        bad = [v for v in (values if isinstance(values, list) else [values]) if values is not None and v < 1]
        if bad:
            parser.error(f'--{name} must be > 0, got {bad[0]}')
    try:  # every config read up front: a bad one is one error line, before any measurement
        args.configs = {cfg: get_config(cfg) for cfg in args.cfg}
    except ConfigError as e:
        parser.error(str(e))
    headless = [cfg for cfg, config in args.configs.items() if config.MODEL.NUM_CLASSES == 0]
    if headless and {'train', 'train_gc'} & set(args.paths or ()):
        parser.error(f'{headless[0]}: a model without classifier head (MODEL.NUM_CLASSES 0) has no training step '
                     f'to time (--paths train, train_gc)')
    if 'onnx' in (args.paths or ()):
        try:
            check_onnx_packages('--paths onnx')
        except ExportError as e:
            parser.error(str(e))
    if args.plot and not args.scaling:
        parser.error('--plot names the figure of --scaling; the table has none')
    if args.scaling:
        args.plot = args.plot or 'scaling.png'
        for name, values in (('-cfg', args.cfg), ('--paths', args.paths), ('--batch', args.batch)):
            if values is not None and len(values) > 1:
                parser.error(f'--scaling takes one value of {name}, got {" ".join(map(str, values))}')
        args.batch, args.paths = args.batch or [1], args.paths or ['infer']
        args.sizes = args.sizes or list(SCALING_SIZES)
        patch = args.configs[args.cfg[0]].MODEL.PATCH_SIZE
        if len({tokens(size, patch) for size in args.sizes}) < 2:
            parser.error(f'--scaling needs sizes with at least two different numbers of tokens '
                         f'(patch {patch}), got --sizes {" ".join(map(str, args.sizes))}')
    else:
        args.batch, args.paths = args.batch or [1, 16], args.paths or list(DEFAULT_PATHS)
    try:  # written after every measurement: a folder or an unwritable place is found now
        for flag, path in (('--json', args.json), ('--plot', args.plot)):
            if path:
                check_output_file(path, flag)
    except ConfigError as e:
        parser.error(str(e))
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        sys.path.insert(0, HERE)
        print(json.dumps(measure(*json.loads(args.worker))))
        return
    print(f'machine: {machine()}; {args.threads} threads')
    rows = []
    if args.scaling:
        (cfg,), (path,), (batch,) = args.cfg, args.paths, args.batch
        for size in args.sizes:
            row = run_worker(cfg, path, batch, size, args.threads, args.reps)
            rows.append(row)
            print(format_table([row]).splitlines()[-1], flush=True)
            if 'error' in row:
                break
        if sum('error' not in r for r in rows) < 2:
            sys.exit('--scaling: fewer than two sizes could be measured; nothing to fit')
        summary = scaling_summary(rows, args.configs[cfg].MODEL.PATCH_SIZE)
        try:
            draw_scaling(summary, f'{os.path.basename(cfg)} ({path}, batch {batch}, {args.threads} threads): '
                                  f'{summary["sizes"][0]} to {summary["sizes"][-1]} pixels', args.plot)
        except OutputWriteError as e:
            sys.exit(f'error: {e}')
        print(format_scaling(summary) + f'; plot: {args.plot}')
    else:
        for cfg in args.cfg:
            for size in args.sizes or [args.configs[cfg].DATA.IMAGE_SIZE]:
                for batch in args.batch:
                    for path in args.paths:
                        rows.append(run_worker(cfg, path, batch, size, args.threads, args.reps))
        print(format_table(rows))
    if args.json:
        try:
            write_json(args.json, {'machine': machine(), 'threads': args.threads, 'rows': rows})
        except OutputWriteError as e:
            sys.exit(f'error: {e}')
    failed = sum('error' in r for r in rows)
    if failed and not args.scaling:  # --scaling stops at the first size that fails, by design
        sys.exit(f'{failed} of {len(rows)} measurements failed')


if __name__ == '__main__':
    main()
