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

import engine
import launch
from utils import visible_gpus


def job(config):
    """The work of each process: ``engine.run``, ending with one error line on bad input."""
    return engine.exit_on_user_error(engine.run, config)


def main(argv=None):
    """Runs with the command line ``argv``; returns rank 0's summary when run in this process."""
    config = engine.parse_config(argv, multi_process=True)
    return launch.run_job(job, config, config.NGPUS, visible_gpus(), 'NGPUS (-ngpus)', engine.check_inputs)


if __name__ == '__main__':
    engine.exit_on_user_error(main)
