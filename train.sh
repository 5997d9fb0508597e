#!/usr/bin/env bash
# train.sh: SkinFlow end to end (arXiv 2601.09136): warm start -> Stage I -> Stage II -> evaluation.
#
#   bash train.sh                      # picks a preset from the hardware (no CUDA -> tiny, on CPU)
#   PRESET=3b OUT=runs/my3b bash train.sh
#   ABLATION=1 bash train.sh           # + the paper's three ablation rows on SynthDerm
#   ABLATION=1 ROWS=stage2_only bash train.sh   # + only "no Stage I" (Stage I's effect, one Stage II more)
#   DRY_RUN=1 PRESET=7b bash train.sh  # print every command and check every flag, run nothing
#   DATA=fitzpatrick17k DATA_DIR=data  # real photos (default for 3b/7b): data.py fetch -> base -> Stage I
#                                      # (SkinCAP) -> Stage II (Fitzpatrick17k train) -> 1,000 held-out photos
#   SEED=1 bash train.sh               # another seed: init, sampling and data order of every stage
#
# Everything goes into one run folder ($OUT, default runs/<preset>):
#   $OUT/<stage>/log.jsonl        one JSON line per optimizer step (reward, KL, clip, lengths, lr, ...)
#   $OUT/<stage>/model/           the stage's checkpoint (safetensors, Hub layout, + tokenizer)
#   $OUT/eval/<stage>/            eval.py's report: metrics.json, cases.jsonl, report.md, chart
#   $OUT/results.md, curves.png   `python eval.py summary`: the table with paired-bootstrap deltas
#   $OUT/ablation/<row>/...       the same layout per ablation row (ABLATION=1)
set -euo pipefail
cd "$(dirname "$0")"

# The project's venv when there is one, else whatever python is on PATH.
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}   # the tiny preset is measured on 2 CPU cores
DRY_RUN=${DRY_RUN:-0}
# SEED: passed to every rl.py stage as --seed (the tiny init, the sampler, the ORDER of the training
# stream). The images themselves (rl.py --data-seed, eval.py --seed) stay fixed, so every seed is
# scored on the same 500 test images and seeds can be compared. Same machine + same SEED + same thread
# count -> the same numbers; another CPU or OMP_NUM_THREADS changes float summation order, and a
# sampled token can flip, so the run diverges from there (docs/tiny-run.md, "Determinism").
SEED=${SEED:-0}
ABLATION=${ABLATION:-0}
# ROWS: which ablation rows ABLATION=1 runs (comma list). ROWS=stage2_only alone is "Stage II with vs
# without Stage I" for the price of one Stage II: the main run is the "with" side.
ROWS=${ROWS:-stage2_only,stage1_stage2,stage1_stage2_dve}
for r in ${ROWS//,/ }; do   # a misspelt row would otherwise run nothing, silently
    case "$r" in stage2_only | stage1_stage2 | stage1_stage2_dve) ;;
    *) echo "[train.sh] unknown ablation row in ROWS: $r (use stage2_only, stage1_stage2, stage1_stage2_dve)" >&2; exit 2 ;;
    esac
done
T_START=$(date +%s)

# -----------------------------------------------------------------------------------------------
# 1. Preset from the hardware. CPU -> tiny (random init + a supervised warm start, minutes);
#    a GPU with < 48 GB -> 3b (LoRA + DVE, ~24 GB estimated); >= 48 GB -> 7b with LoRA + DVE (~38 GB
#    estimated). 48, not 40: the memory table asks a 48-80 GB card for 7b, since ~38 GB on a 40 GB card
#    leaves ~2 GB for fragmentation and longer completions. PRESET=7b overrides it on a 40-47 GB card.
#    Estimates from the shapes, not measured on a GPU: the table is docs/rl.md, "Memory per preset".
# -----------------------------------------------------------------------------------------------
if [ -z "${PRESET:-}" ]; then
    GPU_GB=$($PY -c "import torch; print(torch.cuda.get_device_properties(0).total_memory // 2**30 if torch.cuda.is_available() else 0)")
    if [ "$GPU_GB" -eq 0 ]; then
        PRESET=tiny; WHY="no CUDA device: the tiny preset runs on the CPU"
    elif [ "$GPU_GB" -lt 48 ]; then
        PRESET=3b; WHY="GPU with ${GPU_GB} GB (< 48 GB): Qwen2.5-VL-3B, LoRA + DVE, bf16"
    else
        PRESET=7b; WHY="GPU with ${GPU_GB} GB (>= 48 GB): Qwen2.5-VL-7B, LoRA + DVE, bf16"
    fi
else
    WHY="PRESET=$PRESET set by the caller"
fi
OUT=${OUT:-runs/$PRESET}
# Data (issue 12): real photos by default on a GPU, SynthDerm on the CPU (no download, same chain).
DATA=${DATA:-$([ "$PRESET" = tiny ] && echo synthderm || echo fitzpatrick17k)}
DATA_DIR=${DATA_DIR:-data}                                  # what `python data.py fetch --out DIR` fills
SKINCAP=${SKINCAP:-$DATA_DIR/skincap/skincap_v240623.csv}
echo "[train.sh] preset $PRESET ($WHY); data $DATA; run folder $OUT; SEED=$SEED"

# -----------------------------------------------------------------------------------------------
# 2. Per-preset settings.
#    3b / 7b: G = 8, bf16 weights with fp32 master copies, LoRA on the LLM + DVE gates in the vision tower,
#    448 px images. Learning rates: 10x the paper's (Stage I 1e-6, Stage II 5e-7), which are FULL fine-tuning
#    rates; the optimal LoRA lr is ~10x the full fine-tuning one ("LoRA Without Regret", Schulman et al.,
#    Thinking Machines 2025), and at the paper's rates bf16 activations round much of the update away
#    (docs/gpu.md: a tiny bf16 model learns 0.34x what fp32 does at 5e-7, 0.90x at 5e-6).
#    tiny: a 1 M-parameter model trained from scratch on 2 CPU cores (goal < 10 minutes; the wall times
#    measured on two machines are in docs/tiny-run.md). It needs lrs ~1000x larger than the paper's (a
#    random-init model with minutes of compute, not a converged 3B that must not drift) and shorter
#    stages; every number below was measured (docs/training.md: learning rates per preset;
#    docs/tiny-run.md: what was tried).
# -----------------------------------------------------------------------------------------------
case "$PRESET" in
tiny)
    INIT=tiny
    IMG="--image-size 112 --max-pixels 12544"
    # two supervised stand-ins for what tiny lacks: a pretrained ViT (vision: the ViT alone + a probe,
    # 64 images per step) and a pretrained instruct LLM (warmup: SFT of the whole model)
    VISION="--steps 300 --prompts 64 --n-data 2048 --lr 3e-3 --lr-schedule cosine --lr-warmup 20"
    # --sft-order mixed: the warm start names the right GROUP of diagnoses but ranks it without clinical
    # sense (half its SFT lists alphabetical, half shuffled), so ranking is what Stage II must teach
    # (docs/tiny-run.md, "Why the mixed order")
    WARMUP="--steps 800 --prompts 8 --lr 2e-3 --lr-schedule cosine --lr-warmup 20 --aux-weight 1.0 --sft-order mixed"
    # Stage I: 60 steps x 8 prompts at lr 1e-3: each step's reward averages 8 images, not 4, and the
    # smaller lr lets 60 steps climb steadily (measured from the same three warm starts: first 10 -> last 10
    # steps +0.05 / +0.08 / +0.10; 40 x 4 at 2e-3 rose +0.07 / +0.03 / +0.00; docs/tiny-run.md)
    STAGE1="--steps 60 --prompts 8 --G 8 --lr 1e-3 --max-new-tokens 96 --micro-prompts 8"
    # Stage II: 12 prompts per step (was 8): each step's mean reward averages 12 images, not 8, so the
    # curve's rise is not buried under which images a step drew (measured on seed 2: with 8 prompts the
    # last-20 mean fell below the first-20 mean while Top-1 rose; lr 1e-3 instead spiked the KL to 0.5)
    STAGE2="--steps 80 --prompts 12 --G 8 --lr 6e-4 --beta 0.04 --temperature 0.7 --max-new-tokens 56 --micro-prompts 8"
    MAIN_TRAIN="--train lora"           # the main tiny run: LoRA only (DVE is the ablation's third row)
    EVAL_N=${EVAL_N:-500}
    EVAL="--image-size 112 --max-pixels 12544 --max-new-tokens 56 --batch-size 50"
    ;;
3b | 7b)
    INIT=$([ "$PRESET" = 3b ] && echo Qwen/Qwen2.5-VL-3B-Instruct || echo Qwen/Qwen2.5-VL-7B-Instruct)
    IMG="--image-size 448 --max-pixels 200704 --dtype bf16"
    VISION=""; WARMUP=""   # the real instruct model already sees and answers; no warm-up
    STAGE1="--steps 300 --prompts 8 --G 8 --lr 1e-5 --max-new-tokens 160 --micro-prompts 1"
    STAGE2="--steps 300 --prompts 8 --G 8 --lr 5e-6 --max-new-tokens 96 --micro-prompts 1"
    MAIN_TRAIN="--train lora,dve --dve"  # the main run is SkinFlow: LoRA on the LLM + DVE gates
    EVAL_N=${EVAL_N:-1000}
    EVAL="--image-size 448 --max-pixels 200704 --max-new-tokens 96 --batch-size 16 --dtype bfloat16 --device cuda"
    ;;
*)
    echo "[train.sh] unknown PRESET=$PRESET (use tiny, 3b or 7b)" >&2; exit 2 ;;
esac

# Data flags of every command. SynthDerm: none for rl.py (its default) and the unchanged eval flags.
# Fitzpatrick17k: images and captions from $DATA_DIR; Stage II trains on the near-duplicate-aware random
# 80 % ("train"), evaluation reads data.eval_sample's 1,000 held-out photos ("eval1000/test"), from which
# every SkinCAP-captioned image (and its near-duplicates) is removed.
case "$DATA" in
synthderm)
    RL_DATA=""; RL_STAGE1_DATA=""
    EVAL_DATA="--data synthderm --n $EVAL_N" ;;
fitzpatrick17k)
    RL_DATA="--data fitzpatrick17k --image-dir $DATA_DIR/images --split train"
    RL_STAGE1_DATA="$RL_DATA --skincap $SKINCAP"
    EVAL_DATA="--data fitzpatrick17k --image-dir $DATA_DIR/images --split eval1000/test --n $EVAL_N --skincap $SKINCAP" ;;
*)
    echo "[train.sh] unknown DATA=$DATA (use synthderm or fitzpatrick17k)" >&2; exit 2 ;;
esac

# run CMD...: print it, then run it (DRY_RUN=1: rl.py, eval.py and data.py only check their flags)
run() {
    echo "+ $*"
    if [ "$DRY_RUN" = 1 ]; then
        case "$2" in rl.py | eval.py | data.py) "$@" --dry-run > /dev/null ;; esac
        return 0
    fi
    "$@"
}

# Real data: fetch it (resumable; a no-op when everything is on disk), and decide on Stage I. Without
# the SkinCAP CSV (no token, terms not accepted) Stage I is skipped LOUDLY: on the console and as a
# NOTICE at the top of results.md, so no table is ever mistaken for the full SkinFlow chain.
STAGE1_ON=1
if [ "$DATA" = fitzpatrick17k ]; then
    run $PY data.py fetch --out "$DATA_DIR" --backbone "$([ "$PRESET" = tiny ] && echo none || echo "$PRESET")"
    if [ "$DRY_RUN" != 1 ] && [ ! -f "$SKINCAP" ]; then
        STAGE1_ON=0
        mkdir -p "$OUT"
        MSG="Stage I was SKIPPED: no SkinCAP CSV at $SKINCAP ($(head -n 1 "$DATA_DIR/SKINCAP_MISSING.txt" 2>/dev/null || echo "see data.py fetch")). This run is base -> Stage II only, not the full SkinFlow chain."
        echo "$MSG" > "$OUT/NOTICE.md"
        printf '%.0s!' {1..100}; echo; echo "!! NOTICE: $MSG"; printf '%.0s!' {1..100}; echo
    else
        rm -f "$OUT/NOTICE.md"
    fi
fi

# one_chain DIR STAGE1_ON STAGE2_EXTRA: warm start (tiny) -> [Stage I] -> Stage II, each evaluated
one_chain() {
    local dir=$1 with_stage1=$2 extra=$3 prev
    if [ -n "$WARMUP" ]; then
        if [ "$dir" != "$OUT" ] && [ -d "$OUT/warmup/model" ]; then
            prev=$OUT/warmup/model          # ablation rows share the main run's warm start
        else
            # 3. Warm start (tiny only), supervised, on SynthDerm's "val" split (RL uses "train", eval "test"):
            #    first the ViT alone learns to see (probe accuracy printed), then SFT of the whole model
            run $PY rl.py vision --init "$INIT" --out "$dir" --seed "$SEED" $IMG $VISION $RL_DATA --eval-n 500
            run $PY rl.py warmup --init "$dir/vision/model" --out "$dir" --seed "$SEED" $IMG $WARMUP $RL_DATA --eval-n 0
            prev=$dir/warmup/model
            run $PY eval.py --model "$prev" $EVAL_DATA --out "$dir/eval/warmup" $EVAL
        fi
    else
        prev=$INIT
        if [ "$dir" = "$OUT" ]; then    # the instruct model itself is the "before" row of the table
            run $PY eval.py --model "$prev" $EVAL_DATA --out "$dir/eval/base" $EVAL
        fi
    fi
    if [ "$with_stage1" = 1 ] && [ "$STAGE1_ON" = 1 ]; then
        # 4. Stage I: GRPO on structured captions (rl.reward_caption)
        run $PY rl.py stage1 --init "$prev" --out "$dir" --seed "$SEED" $IMG $STAGE1 $extra $RL_STAGE1_DATA --eval-n 0
        prev=$dir/stage1/model
        run $PY eval.py --model "$prev" $EVAL_DATA --out "$dir/eval/stage1" $EVAL
    fi
    # 5. Stage II: GRPO on the ranked differential (rl.reward_differential)
    run $PY rl.py stage2 --init "$prev" --out "$dir" --seed "$SEED" $IMG $STAGE2 $extra $RL_DATA --eval-n 0
    run $PY eval.py --model "$dir/stage2/model" $EVAL_DATA --out "$dir/eval/stage2" $EVAL
}

# -----------------------------------------------------------------------------------------------
# 6. The main run, then its summary (table + paired bootstrap of every stage against the warm start)
# -----------------------------------------------------------------------------------------------
one_chain "$OUT" 1 "$MAIN_TRAIN"
run $PY eval.py summary "$OUT"

# -----------------------------------------------------------------------------------------------
# 7. ABLATION=1: the paper's three rows on SynthDerm, each under $OUT/ablation/<row>/ (tiny, measured on
#    the 2-core machine of docs/tiny-run.md: the stage2_only row takes ~2.4 min; the rows with Stage I add
#    its ~1.7 min each, so all three add ~11 min: an estimate, the DVE row was not timed).
# -----------------------------------------------------------------------------------------------
if [ "$ABLATION" = 1 ]; then
    row() { case ",$ROWS," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }   # is row $1 in ROWS?
    if row stage2_only; then one_chain "$OUT/ablation/stage2_only" 0 "--train lora"; fi                 # no Stage I, no DVE
    if row stage1_stage2; then one_chain "$OUT/ablation/stage1_stage2" 1 "--train lora"; fi             # Stage I -> II, no DVE
    if row stage1_stage2_dve; then one_chain "$OUT/ablation/stage1_stage2_dve" 1 "--train lora,dve --dve"; fi  # + DVE (SkinFlow)
    run $PY eval.py summary "$OUT"
fi
if [ "$DRY_RUN" = 1 ]; then   # every flag was checked, nothing was trained or written: no results to point at
    echo "[train.sh] dry run: nothing was run (every command above was printed and its flags checked)"
else
    echo "[train.sh] done in $(( $(date +%s) - T_START )) s; results in $OUT/results.md"
fi
