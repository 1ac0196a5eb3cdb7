"""Trains or evaluates XCiT in one process: on a GPU when Paddle has CUDA and sees one, else on the CPU.

    python main_single_gpu.py -cfg configs/xcit_nano_12_p16_224.yaml -dataset imagenet2012 \\
        -data_path /dataset/imagenet -batch_size 128
    python main_single_gpu.py -cfg configs/xcit_nano_12_p16_224.yaml -data_path /dataset/imagenet \\
        -eval -pretrained xcit_nano_12_p16_224.pdparams

See ``python main_single_gpu.py -h`` and ``engine.py``.
"""
import engine


def main(argv=None):
    """Runs with the command line ``argv`` (default ``sys.argv[1:]``); returns the summary dict."""
    return engine.run(engine.parse_config(argv))


if __name__ == '__main__':
    engine.exit_on_user_error(main)
