#!/bin/sh
# Evaluates converted XCiT weights on the ImageNet-1k validation set with several GPUs.
# Each setting below can be overridden from the environment; on a machine without a GPU,
# NGPUS is the number of CPU processes, e.g. the digits demo model on 2 CPU processes:
#   NGPUS=2 DATASET=digits CONFIG=configs/demo/xcit_nano_12_p8_digits.yaml \
#       PRETRAINED=output/demo/best.pdparams sh run_eval_multi.sh
# Further arguments are passed on, e.g. `sh run_eval_multi.sh -ema` or `-opts KEY VALUE`.
CONFIG=${CONFIG:-./configs/xcit_nano_12_p16_224.yaml}
DATASET=${DATASET:-}  # empty: the config's DATA.DATASET (imagenet2012 unless it says otherwise)
DATA_PATH=${DATA_PATH:-/dataset/imagenet}
BATCH_SIZE=${BATCH_SIZE:-}  # per process; empty: the config's
PRETRAINED=${PRETRAINED:-./xcit_nano_12_p16_224.pdparams}
CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0,1,2,3}
NGPUS=${NGPUS:-}  # processes; empty: the config's NGPUS (-1 unless it says otherwise: every visible GPU, 2 on CPU)
OUTPUT=${OUTPUT:-./output/eval}
PYTHON=${PYTHON:-python}
export CUDA_VISIBLE_DEVICES

if [ -n "$DATASET" ]; then set -- -dataset="$DATASET" "$@"; fi
if [ -n "$NGPUS" ]; then set -- -ngpus="$NGPUS" "$@"; fi
if [ -n "$BATCH_SIZE" ]; then set -- -batch_size_eval="$BATCH_SIZE" "$@"; fi
exec "$PYTHON" "$(dirname "$0")/main_multi_gpu.py" \
    -cfg="$CONFIG" \
    -data_path="$DATA_PATH" \
    -pretrained="$PRETRAINED" \
    -output="$OUTPUT" \
    -eval \
    "$@"
