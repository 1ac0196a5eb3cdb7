#!/usr/bin/env bash
# Offline demo: trains XCiT nano_12 (patch 8) from scratch on the bundled 8x8 digits with 2 CPU
# processes (or every GPU), evaluates the best checkpoint and prints its top-1 accuracy.
# A few minutes on 2 CPU cores; the output goes to output/demo (OUTPUT=... to change). Run
# again, it continues an interrupted demo (-resume auto) or re-evaluates a finished one; remove
# the output folder to train afresh.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh" requirements.txt  # ./.venv, and cd to the repository

CONFIG=configs/demo/xcit_nano_12_p8_digits.yaml
OUTPUT=${OUTPUT:-output/demo}
NGPUS=${NGPUS:--1}  # -1: every visible GPU, or 2 CPU processes

continued=$([ -f "$OUTPUT/last.pdparams" ] && echo " (continued the run in $OUTPUT)" || true)
start=$(date +%s)
python main_multi_gpu.py -cfg "$CONFIG" -ngpus "$NGPUS" -output "$OUTPUT" -resume auto
trained=$(date +%s)
python main_single_gpu.py -cfg "$CONFIG" -eval -pretrained "$OUTPUT/best.pdparams" -output "$OUTPUT/eval"
done=$(date +%s)
python - "$OUTPUT/eval/eval_summary.json" "$((trained - start))" "$((done - trained))" "$continued" <<'PY'
import json, sys
summary = json.load(open(sys.argv[1]))
print(f"demo: Acc@1 {summary['acc1']:.2f}% (Acc@5 {summary['acc5']:.2f}%) on the {summary['images']} digits "
      f"validation images; training {sys.argv[2]} s{sys.argv[4]}, evaluation {sys.argv[3]} s")
PY
