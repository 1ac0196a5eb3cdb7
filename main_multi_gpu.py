"""Trains or evaluates XCiT with several processes: one per GPU (NCCL), or on a CPU-only machine
``-ngpus N`` CPU processes (gloo, default 2). Gradients and metrics are all-reduced.

    CUDA_VISIBLE_DEVICES=0,1,2,3 python main_multi_gpu.py -cfg configs/xcit_nano_12_p16_224.yaml \\
        -dataset imagenet2012 -data_path /dataset/imagenet -batch_size 128
    python main_multi_gpu.py -ngpus 2 -cfg configs/demo/xcit_nano_12_p8_digits.yaml   # CPU

Processes are started with ``paddle.distributed.spawn``; under ``python -m
paddle.distributed.launch`` (which starts them itself) each process runs directly.
See ``python main_multi_gpu.py -h`` and ``engine.py``.
"""
import os
import sys

import numpy  # noqa: F401  before paddle: with PaddlePaddle 2.6, gloo processes that import
# paddle first fail to decode PNG images in DataLoader threads ("codec configuration error")
import paddle.distributed as dist

import engine
from config import ConfigError
from utils import visible_gpus

CPU_PROCESSES = 2  # default process count without a GPU


def num_processes(config):
    """NGPUS, or when -1: every visible GPU, else ``CPU_PROCESSES``."""
    if config.NGPUS == 0 or config.NGPUS < -1:
        raise ConfigError(f'NGPUS (-ngpus) must be -1 or positive, got {config.NGPUS}')
    if config.NGPUS > 0:
        return config.NGPUS
    return visible_gpus() or CPU_PROCESSES


def worker(config):
    """Body of each spawned (or launched) process."""
    dist.init_parallel_env()
    return engine.exit_on_user_error(engine.run, config)


def main(argv=None):
    """Runs with the command line ``argv``; returns rank 0's summary when run in this process."""
    config = engine.parse_config(argv, multi_process=True)
    if int(os.environ.get('PADDLE_TRAINERS_NUM', '1')) > 1:  # started by paddle.distributed.launch
        return worker(config)
    engine.check_inputs(config)  # before any process starts: each would report the same error
    nprocs = num_processes(config)
    gpus = visible_gpus()
    if gpus and nprocs > gpus:
        raise ConfigError(f'NGPUS={nprocs} but only {gpus} GPUs are visible')
    if nprocs == 1:
        return engine.run(config)
    backend = 'nccl' if gpus else 'gloo'
    print(f'starting {nprocs} processes ({backend})', flush=True)
    try:
        dist.spawn(worker, args=(config,), nprocs=nprocs, backend=backend)
    except Exception as e:  # spawn re-raises a worker's failure; the worker printed the reason
        print(f'error: a worker process failed: {str(e).strip().splitlines()[-1]}', file=sys.stderr, flush=True)
        sys.exit(1)
    return None


if __name__ == '__main__':
    engine.exit_on_user_error(main)
