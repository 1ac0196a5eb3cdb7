#!/bin/sh
# Trains XCiT in one process (one GPU, or the CPU). Settings can be overridden from the
# environment, as in run_train_multi.sh.
CONFIG=${CONFIG:-./configs/xcit_nano_12_p16_224.yaml}
DATASET=${DATASET:-}  # empty: the config's DATA.DATASET (imagenet2012 unless it says otherwise)
DATA_PATH=${DATA_PATH:-/dataset/imagenet}
BATCH_SIZE=${BATCH_SIZE:-}  # per process; empty: the config's
PRETRAINED=${PRETRAINED:-}
RESUME=${RESUME:-}
CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
OUTPUT=${OUTPUT:-./output/train}
PYTHON=${PYTHON:-python}
export CUDA_VISIBLE_DEVICES

if [ -n "$RESUME" ]; then set -- -resume="$RESUME" "$@"; fi
if [ -n "$PRETRAINED" ]; then set -- -pretrained="$PRETRAINED" "$@"; fi
if [ -n "$DATASET" ]; then set -- -dataset="$DATASET" "$@"; fi
if [ -n "$BATCH_SIZE" ]; then set -- -batch_size="$BATCH_SIZE" "$@"; fi
exec "$PYTHON" "$(dirname "$0")/main_single_gpu.py" \
    -cfg="$CONFIG" \
    -data_path="$DATA_PATH" \
    -output="$OUTPUT" \
    "$@"
