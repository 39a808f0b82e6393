#!/usr/bin/env bash
# The paper's table in one command: index MVTec AD and VisA, train both cross-dataset heads, run the protocol
# (k = 1 2 4, several seeds) on both, and write our numbers beside the paper's (results/reproduce/paper_table.md).
#
#   bash reproduce.sh --dry-run             # the plan: every step, the files it needs, a time estimate; exits 0
#   bash reproduce.sh [--device 0|cpu|auto] # run it; rerun the same command to resume after a stop
#
# Dataset roots: MVTEC_ROOT (default data/mvtec), VISA_ROOT (default data/visa), as in trainAndTest.sh.
# PYTHON: the interpreter (default .venv/bin/python when present, else python); it must import fdsl and torch.
# Settings through the environment: FDSL_PRETRAINED (openai, or a weights file when offline), FDSL_SEEDS
# (default "10 11 12 13 14"), FDSL_TRAIN_SEED (14), FDSL_PRECISION (auto = fp32), FDSL_REPRO_OUT
# (results/reproduce); for the dry run's estimate FDSL_CPU_GFLOPS / FDSL_GPU_TFLOPS (your machine's fp32 rates). Every step resumes by itself: indexing is skipped when meta.json exists, train.py
# continues from its newest epoch, test.py reuses every finished (k, seed, class).
#
# Setting: FDSL with NAM and LFE (winmode mul, windows 13 / stride 2 / weight 0.5), ViT-L-14-336 @ 518 px, fp32.
# Epochs: both heads train 5 epochs and are tested at epoch 5. The released scripts train the VisA head for
# 11 epochs but test epoch 5 as well (test_few_shot.sh; trainAndTest.sh's VisA test asks for epoch 11 of the
# 5-epoch MVTec model, a file that run never writes). Training has no schedule that depends on the number
# of epochs (Adam, constant lr, per-epoch seeds), so epoch 5 of an 11-epoch run is epoch 5 of a 5-epoch run,
# and the 6 extra epochs would only cost time (tests/cli/test_reproduce.py checks it on the tiny model).
# Seeds: the paper reports mean ± std over seeds without naming them; we use 10-14 (the released example
# is seed 14) and train each head once, with seed 14.
#
# Expected (paper, mean over seeds; AUROC / AUROC_p image / pixel):
#   MVTec AD 1-shot 94.4 / 96.8, 2-shot 95.0 / 97.0, 4-shot 96.3 / 97.2
#   VisA     1-shot 90.7 / 97.8, 2-shot 93.0 / 98.1, 4-shot 93.8 / 98.3   (all columns: docs/method.md)
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
dry=0
device=auto
while [ "$#" -gt 0 ]; do
  case "$1" in
    --dry-run) dry=1 ;;
    --device) [ "$#" -ge 2 ] || { echo "error: --device needs a value (cpu, a CUDA index, auto)" >&2; exit 2; }
              device=$2; shift ;;
    --device=*) device=${1#--device=} ;;
    -h|--help) sed -n '2,26p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "error: unknown option $1 (use --dry-run, --device D)" >&2; exit 2 ;;
  esac
  shift
done

if [ -z "${PYTHON:-}" ] && [ -x "$here/.venv/bin/python" ]; then PYTHON=$here/.venv/bin/python; fi
PY=${PYTHON:-python}
if ! (cd "$here" && "$PY" -c "import importlib.util as u, sys, fdsl; sys.exit(0 if u.find_spec('torch') else 3)") \
    2>/dev/null; then
  echo "error: PYTHON=$PY cannot import fdsl and torch; install them (pip install -e . in $here) or set PYTHON to" \
       "the interpreter that has them, e.g. PYTHON=$here/.venv/bin/python" >&2
  exit 2
fi
MVTEC_ROOT=${MVTEC_ROOT:-$here/data/mvtec}
VISA_ROOT=${VISA_ROOT:-$here/data/visa}
out=${FDSL_REPRO_OUT:-$here/results/reproduce}
pretrained=${FDSL_PRETRAINED:-openai}
seeds=${FDSL_SEEDS:-10 11 12 13 14}
train_seed=${FDSL_TRAIN_SEED:-14}
precision=${FDSL_PRECISION:-auto}
epochs=5
read -r -a seed_list <<< "$seeds"

model=(--model ViT-L-14-336 --pretrained "$pretrained" --image_size 518 --features_list 6 12 18 24
       --few_shot_features 6 12 18 24 --use_nam 1 --device "$device" --precision "$precision")
lfe=(--winmode mul --win_size 13 --win_stride 2 --win_weight 0.5 --cal_image_size 240)

# ----------------------------------------------------------------------------------------------- inputs
missing=0   # lines saying what is missing
blocking=0  # of those, the ones a run cannot start without
check_dataset() {  # name root glob url variable what-it-holds
  local name=$1 root=$2 marker=$3 url=$4
  if [ -f "$root/meta.json" ]; then
    echo "  $name: $root (indexed: meta.json present)"
  elif compgen -G "$root/$marker" > /dev/null; then
    echo "  $name: $root (found; the index step writes meta.json)"
  else
    echo "  missing: $name at $root; download it from $url, unpack it and set $5=<the folder holding $6>"
    missing=$((missing + 1)); blocking=$((blocking + 1))
  fi
}
check_weights() {
  if [ "$pretrained" = none ]; then
    echo "  weights: none = RANDOM backbone weights; the table would be a smoke test, not a reproduction"
  elif [ "$pretrained" = openai ]; then
    local hub=${HF_HOME:-$HOME/.cache/huggingface}/hub
    if compgen -G "$hub/models--timm--vit_large_patch14_clip_336.openai*" > /dev/null \
        || [ -f "$HOME/.cache/clip/ViT-L-14-336px.pt" ]; then
      echo "  weights: openai (ViT-L-14-336 found in the local model cache)"
    else
      echo "  missing: weights openai (ViT-L-14-336, ~1.7 GB) are not in the local cache; they download on first" \
           "use when the model hub is reachable; offline, set FDSL_PRETRAINED=/path/to/ViT-L-14-336px.pt" \
           "(OpenAI's file or an open_clip state dict)"
      missing=$((missing + 1))  # not blocking: a reachable hub downloads them
    fi
  elif [ -f "$pretrained" ]; then
    echo "  weights: $pretrained (a local file)"
  else
    echo "  missing: weights file FDSL_PRETRAINED=$pretrained does not exist; point it at ViT-L-14-336px.pt" \
         "or use FDSL_PRETRAINED=openai with a reachable model hub"
    missing=$((missing + 1)); blocking=$((blocking + 1))
  fi
}

# ----------------------------------------------------------------------------------------------- steps
n=0
step() {  # description done_file command...: run unless done_file exists (empty: always run, it resumes)
  local what=$1 done_file=$2
  shift 2
  n=$((n + 1))
  local state="to do"
  if [ -n "$done_file" ] && [ -e "$done_file" ]; then state="done"; fi
  if [ "$dry" = 1 ]; then
    echo "  $n. $what [$state]"
    echo "       $(printf '%q ' "$@")"
    return 0
  fi
  if [ "$state" = done ]; then
    echo "== $n. $what: done ($done_file exists)"
    return 0
  fi
  echo "== $n. $what"
  "$@"
}

ck_mvtec=$out/checkpoints/trained_on_mvtec
ck_visa=$out/checkpoints/trained_on_visa
plan() {
  step "index MVTec AD (writes meta.json)" "$MVTEC_ROOT/meta.json" \
    "$PY" "$here/data/mvtec.py" --root "$MVTEC_ROOT"
  step "index VisA (writes meta.json)" "$VISA_ROOT/meta.json" \
    "$PY" "$here/data/visa.py" --root "$VISA_ROOT"
  step "train the head for VisA on the MVTec AD test split ($epochs epochs, 10-shot bank)" "$ck_mvtec/epoch_$epochs.pth" \
    "$PY" "$here/train.py" --dataset mvtec --train_data_path "$MVTEC_ROOT" --save_path "$ck_mvtec" \
    --epoch "$epochs" --k_shot 10 --batch_size 8 --learning_rate 0.001 --seed "$train_seed" "${model[@]}"
  step "train the head for MVTec AD on the VisA test split ($epochs epochs, 10-shot bank)" "$ck_visa/epoch_$epochs.pth" \
    "$PY" "$here/train.py" --dataset visa --train_data_path "$VISA_ROOT" --save_path "$ck_visa" \
    --epoch "$epochs" --k_shot 10 --batch_size 8 --learning_rate 0.001 --seed "$train_seed" "${model[@]}"
  step "protocol on VisA (k 1 2 4 x seeds $seeds; resumes per class)" "" \
    "$PY" "$here/test.py" --dataset visa --data_path "$VISA_ROOT" --checkpoint_path "$ck_mvtec/epoch_$epochs.pth" \
    --save_path "$out/visa" --k_shot 1 2 4 --seeds "${seed_list[@]}" "${model[@]}" "${lfe[@]}"
  step "protocol on MVTec AD (k 1 2 4 x seeds $seeds; resumes per class)" "" \
    "$PY" "$here/test.py" --dataset mvtec --data_path "$MVTEC_ROOT" --checkpoint_path "$ck_visa/epoch_$epochs.pth" \
    --save_path "$out/mvtec" --k_shot 1 2 4 --seeds "${seed_list[@]}" "${model[@]}" "${lfe[@]}"
  step "the table: ours beside the paper" "" \
    env PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}" "$PY" -m fdsl.cli.reproduce table \
    --mvtec "$out/mvtec" --visa "$out/visa" --out "$out/paper_table"
}

echo "reproduce.sh: FDSL (NAM + LFE mul 13/2/0.5), ViT-L-14-336 @518, k 1 2 4 x seeds $seeds, device $device, out $out"
echo "inputs:"
check_dataset "MVTec AD" "$MVTEC_ROOT" "*/test" "https://www.mvtec.com/company/research/datasets/mvtec-ad" \
  MVTEC_ROOT "bottle/, cable/, ..."
check_dataset "VisA" "$VISA_ROOT" split_csv/1cls.csv "https://github.com/amazon-science/spot-diff" \
  VISA_ROOT "split_csv/1cls.csv and candle/, capsules/, ... (the 1cls split of that repository)"
check_weights

if [ "$dry" = 1 ]; then
  echo "steps (dry run: nothing is run or written):"
  plan
  rates=()
  if [ -n "${FDSL_CPU_GFLOPS:-}" ]; then rates+=(--cpu_gflops "$FDSL_CPU_GFLOPS"); fi
  if [ -n "${FDSL_GPU_TFLOPS:-}" ]; then rates+=(--gpu_tflops "$FDSL_GPU_TFLOPS"); fi
  if ! PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}" "$PY" -m fdsl.cli.reproduce plan --mvtec_root "$MVTEC_ROOT" \
      --visa_root "$VISA_ROOT" --seeds "${seed_list[@]}" --winmode mul --epochs "$epochs" ${rates[@]+"${rates[@]}"}; then
    echo "time estimate: unavailable (the line above says why; if $PY cannot import fdsl, install first: README.md)"
  fi
  if [ "$missing" -gt 0 ]; then echo "$missing input(s) missing: see the lines above"; fi
  echo "outputs: $out/paper_table.md (.csv, .json), $out/{mvtec,visa}/summary.md, $out/checkpoints/"
  exit 0
fi

if [ "$blocking" -gt 0 ]; then
  echo "error: $blocking input(s) missing (see above); bash reproduce.sh --dry-run shows the plan" >&2
  exit 2
fi
plan
echo "done: $out/paper_table.md"
