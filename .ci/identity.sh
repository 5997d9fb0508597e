#!/usr/bin/env bash
# .ci/identity.sh OUT: a SHORT deterministic tiny chain (vision -> warmup -> Stage I -> Stage II with DVE
# -> eval -> summary) whose numbers must not move when code is only MOVED (issue 14: "no behaviour
# change"). Run it once on the old commit and once on the new one, on the same machine and thread count,
# then compare the two folders:   python .ci/identity_compare.py OLD_OUT NEW_OUT
# About 5-8 minutes on one shared CPU core.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: .ci/identity.sh OUT}
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
export OMP_NUM_THREADS=1   # one thread: float summation order (and so every sampled token) is fixed
IMG="--image-size 112 --max-pixels 12544"
$PY rl.py vision --init tiny --out "$OUT" --seed 0 $IMG --steps 8 --prompts 16 --n-data 64 --eval-n 32
$PY rl.py warmup --init "$OUT/vision/model" --out "$OUT" --seed 0 $IMG --steps 8 --prompts 4 --eval-n 0
$PY rl.py stage1 --init "$OUT/warmup/model" --out "$OUT" --seed 0 $IMG --steps 2 --prompts 2 --G 4 \
    --max-new-tokens 32 --eval-n 0
$PY rl.py stage2 --init "$OUT/stage1/model" --out "$OUT" --seed 0 $IMG --steps 2 --prompts 2 --G 4 \
    --max-new-tokens 32 --eval-n 0 --train lora,dve --dve
$PY eval.py --model "$OUT/stage2/model" --data synthderm --n 40 --out "$OUT/eval/stage2" $IMG \
    --max-new-tokens 32 --batch-size 20
$PY eval.py --model "$OUT/warmup/model" --data synthderm --n 40 --out "$OUT/eval/warmup" $IMG \
    --max-new-tokens 32 --batch-size 20
$PY eval.py summary "$OUT"
