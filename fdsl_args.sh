# Sourced by trainAndTest.sh and test_few_shot.sh: their nine arguments, the interpreter and the dataset roots.
# Sets name device use_nam winmode win_size win_stride win_weight seed kshots, here, PY, MVTEC_ROOT, VISA_ROOT, ckpt.
if [ "$#" -ne 9 ]; then
  echo "usage: bash $(basename "$0") model_name device useNAM winmode win_size win_stride win_weight seed kshots" >&2
  exit 2
fi
name=$1; device=$2; use_nam=$3; winmode=$4; win_size=$5; win_stride=$6; win_weight=$7; seed=$8; kshots=$9
here=$(cd "$(dirname "$0")" && pwd)
if [ -z "${PYTHON:-}" ] && [ -x "$here/.venv/bin/python" ]; then PYTHON=$here/.venv/bin/python; fi
PY=${PYTHON:-python}
MVTEC_ROOT=${MVTEC_ROOT:-$here/data/mvtec}
VISA_ROOT=${VISA_ROOT:-$here/data/visa}
ckpt=$here/checkpoints/$name/nam${use_nam}_seed${seed}
