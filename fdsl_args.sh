# Sourced by trainAndTest.sh and test_few_shot.sh: their nine arguments, the interpreter, the dataset roots, the
# model and schedule (or, with FDSL_SMOKE=1, the offline smoke setting: fdsl/cli/smoke.py).
# Sets name device use_nam winmode win_size win_stride win_weight seed kshots, here, PY, MVTEC_ROOT, VISA_ROOT, ckpt,
# results, model_args, train_shots, epochs_mvtec, epochs_visa, test_epoch, run_args.
#
# PYTHON: the interpreter the scripts run (default: the repository's .venv/bin/python when present, else python);
# it must import fdsl (pip install -e . in this folder) and torch.
if [ "$#" -ne 9 ]; then
  echo "usage: bash $(basename "$0") model_name device useNAM winmode win_size win_stride win_weight seed kshots" >&2
  exit 2
fi
name=$1; device=$2; use_nam=$3; winmode=$4; win_size=$5; win_stride=$6; win_weight=$7; seed=$8; kshots=$9
here=$(cd "$(dirname "$0")" && pwd)
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
ckpt=$here/checkpoints/$name/nam${use_nam}_seed${seed}
results=$here/results/$name
model_args=(--model "${FDSL_MODEL:-ViT-L-14-336}" --pretrained "${FDSL_PRETRAINED:-openai}" --image_size 518
            --features_list 6 12 18 24 --few_shot_features 6 12 18 24)
train_shots=10; epochs_mvtec=5; epochs_visa=11; test_epoch=5; run_args=()

if [ "${FDSL_SMOKE:-0}" = 1 ]; then
  smoke_dir=${FDSL_SMOKE_DIR:-$here/smoke_runs}
  smoke_vars=$(cd "$here" && "$PY" -m fdsl.cli.smoke --out "$smoke_dir" --win_size "$win_size" \
               --win_stride "$win_stride") || exit 2
  eval "$smoke_vars"
  read -r -a model_args <<< "$SMOKE_MODEL_ARGS"
  train_shots=$SMOKE_TRAIN_SHOTS; epochs_mvtec=$SMOKE_EPOCHS; epochs_visa=$SMOKE_EPOCHS; test_epoch=$SMOKE_EPOCHS
  win_size=$SMOKE_WIN_SIZE; win_stride=$SMOKE_WIN_STRIDE
  run_args=(--num_workers 0)  # a handful of images: worker processes would only add start-up time
  ckpt=$smoke_dir/checkpoints/$name/nam${use_nam}_seed${seed}
  results=$smoke_dir/results/$name
fi

# A dataset root must hold meta.json; otherwise say where to get the data, or which indexer to run (as reproduce.sh).
need_dataset() {  # name root url variable what-it-holds indexer marker-glob
  if [ -f "$2/meta.json" ]; then return 0; fi
  if compgen -G "$2/$7" > /dev/null; then
    echo "error: $1 at $2 is not indexed yet: run $PY $here/$6 --root $2" >&2
  else
    echo "error: $1 not found at $2: download it from $3, unpack it and set $4=<the folder holding $5>, then run" \
         "$PY $here/$6 --root <that folder> (or FDSL_SMOKE=1 for an offline smoke run on synthetic data)" >&2
  fi
  exit 2
}
need_dataset "MVTec AD" "$MVTEC_ROOT" "https://www.mvtec.com/company/research/datasets/mvtec-ad" MVTEC_ROOT \
  "bottle/, cable/, ..." data/mvtec.py "*/train/good"
need_dataset "VisA" "$VISA_ROOT" "https://github.com/amazon-science/spot-diff" VISA_ROOT \
  "split_csv/1cls.csv and candle/, capsules/, ..." data/visa.py "split_csv/1cls.csv"
