#!/bin/sh
# Evaluates converted XCiT weights on the ImageNet-1k validation set in one process (one GPU,
# or the CPU). Settings can be overridden from the environment, as in run_eval_multi.sh.
CONFIG=${CONFIG:-./configs/xcit_nano_12_p16_224.yaml}
DATASET=${DATASET:-}  # empty: the config's DATA.DATASET (imagenet2012 unless it says otherwise)
DATA_PATH=${DATA_PATH:-/dataset/imagenet}
BATCH_SIZE=${BATCH_SIZE:-}  # per process; empty: the config's
PRETRAINED=${PRETRAINED:-./xcit_nano_12_p16_224.pdparams}
CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
OUTPUT=${OUTPUT:-./output/eval}
PYTHON=${PYTHON:-python}
export CUDA_VISIBLE_DEVICES

if [ -n "$DATASET" ]; then set -- -dataset="$DATASET" "$@"; fi
if [ -n "$BATCH_SIZE" ]; then set -- -batch_size_eval="$BATCH_SIZE" "$@"; fi
exec "$PYTHON" "$(dirname "$0")/main_single_gpu.py" \
    -cfg="$CONFIG" \
    -data_path="$DATA_PATH" \
    -pretrained="$PRETRAINED" \
    -output="$OUTPUT" \
    -eval \
    "$@"
