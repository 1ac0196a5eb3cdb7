"""Trains or evaluates XCiT with several processes: one per GPU (NCCL), or on a CPU-only machine
``-ngpus N`` CPU processes (gloo, default 2). Gradients and metrics are all-reduced.

    CUDA_VISIBLE_DEVICES=0,1,2,3 python main_multi_gpu.py -cfg configs/xcit_nano_12_p16_224.yaml \\
        -dataset imagenet2012 -data_path /dataset/imagenet -batch_size 128
    python main_multi_gpu.py -ngpus 2 -cfg configs/demo/xcit_nano_12_p8_digits.yaml   # CPU

Processes are started with ``paddle.distributed.spawn``; under ``python -m
paddle.distributed.launch`` (which starts them itself) each process runs directly.
See ``python main_multi_gpu.py -h`` and ``engine.py``.
"""
import numpy  # noqa: F401  before paddle: with PaddlePaddle 2.6, gloo processes that import
# paddle first fail to decode PNG images in DataLoader threads ("codec configuration error")
import paddle.distributed as dist

import engine
import launch
from utils import visible_gpus


def worker(config):
    """Body of each spawned (or launched) process."""
    dist.init_parallel_env()
    return engine.exit_on_user_error(engine.run, config)


def main(argv=None):
    """Runs with the command line ``argv``; returns rank 0's summary when run in this process."""
    config = engine.parse_config(argv, multi_process=True)
    if launch.started_by_paddle_launch():
        launch.check_launched_processes(config.NGPUS, 'NGPUS (-ngpus)')
        return worker(config)
    engine.check_inputs(config)  # before any process starts: each would report the same error
    gpus = visible_gpus()
    nprocs = launch.num_processes(config.NGPUS, gpus, 'NGPUS (-ngpus)')
    if nprocs == 1:
        return engine.run(config)
    launch.spawn(worker, (config,), nprocs, on_gpus=bool(gpus))
    return None


if __name__ == '__main__':
    engine.exit_on_user_error(main)
