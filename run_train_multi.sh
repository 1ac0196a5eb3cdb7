#!/bin/sh
# Trains XCiT on ImageNet-1k with several GPUs (the official recipe of the config).
# Each setting below can be overridden from the environment; on a machine without a GPU,
# NGPUS is the number of CPU processes, e.g. the digits demo on 2 CPU processes:
#   NGPUS=2 DATASET=digits CONFIG=configs/demo/xcit_nano_12_p8_digits.yaml \
#       OUTPUT=output/digits sh run_train_multi.sh
# PRETRAINED (optional) starts from converted weights (fine-tuning); RESUME continues a run:
# a checkpoint, or auto for OUTPUT's last.pdparams when there is one (relaunch-safe).
# Further arguments are passed on, e.g. `sh run_train_multi.sh -amp -opts TRAIN.NUM_EPOCHS 300`.
CONFIG=${CONFIG:-./configs/xcit_nano_12_p16_224.yaml}
DATASET=${DATASET:-}  # empty: the config's DATA.DATASET (imagenet2012 unless it says otherwise)
DATA_PATH=${DATA_PATH:-/dataset/imagenet}
BATCH_SIZE=${BATCH_SIZE:-}  # per process; empty: the config's; the learning rate scales with the global batch
PRETRAINED=${PRETRAINED:-}
RESUME=${RESUME:-}
CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0,1,2,3}
NGPUS=${NGPUS:-}  # processes; empty: the config's NGPUS (-1 unless it says otherwise: every visible GPU, 2 on CPU)
OUTPUT=${OUTPUT:-./output/train}
PYTHON=${PYTHON:-python}
export CUDA_VISIBLE_DEVICES

if [ -n "$RESUME" ]; then set -- -resume="$RESUME" "$@"; fi
if [ -n "$PRETRAINED" ]; then set -- -pretrained="$PRETRAINED" "$@"; fi
if [ -n "$DATASET" ]; then set -- -dataset="$DATASET" "$@"; fi
if [ -n "$NGPUS" ]; then set -- -ngpus="$NGPUS" "$@"; fi
if [ -n "$BATCH_SIZE" ]; then set -- -batch_size="$BATCH_SIZE" "$@"; fi
exec "$PYTHON" "$(dirname "$0")/main_multi_gpu.py" \
    -cfg="$CONFIG" \
    -data_path="$DATA_PATH" \
    -output="$OUTPUT" \
    "$@"
