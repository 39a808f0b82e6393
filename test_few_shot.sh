#!/usr/bin/env bash
# k-shot evaluation with the checkpoints trainAndTest.sh wrote (epoch 5 of each model).
#
#   bash test_few_shot.sh {model_name} {device} {useNAM} {winmode} {win-size} {win-stride} {win-weight} {seed} {kshots}
#
# Paper (mean over seeds, image / pixel), with NAM and LFE (winmode mul 13 2 0.5):
#   MVTec 1-shot: AUROC 94.4  AUROC_p 96.8  F1-max 95.1  F1_p-max 58.6  AP 97.2  AP_p 60.3
#   MVTec 2-shot: AUROC 95.0  AUROC_p 97.0  F1-max 95.5  F1_p-max 59.4  AP 97.6  AP_p 61.4
#   MVTec 4-shot: AUROC 96.3  AUROC_p 97.2  F1-max 96.0  F1_p-max 61.0  AP 98.2  AP_p 62.9
#   VisA  1-shot: AUROC 90.7  AUROC_p 97.8  F1-max 87.0  F1_p-max 46.5  AP 92.3  AP_p 42.8
#   VisA  2-shot: AUROC 93.0  AUROC_p 98.1  F1-max 89.5  F1_p-max 47.5  AP 94.1  AP_p 43.6
#   VisA  4-shot: AUROC 93.8  AUROC_p 98.3  F1-max 90.3  F1_p-max 48.5  AP 94.8  AP_p 44.7
# Offline smoke mode (FDSL_SMOKE=1, the checkpoints of FDSL_SMOKE=1 bash trainAndTest.sh ...): see trainAndTest.sh.
set -euo pipefail
source "$(cd "$(dirname "$0")" && pwd)/fdsl_args.sh"
tag="nam${use_nam}_${winmode}_w${win_size}s${win_stride}x${win_weight}_seed${seed}_${kshots}shot"
common=("${model_args[@]}" "${run_args[@]}" --calImage_size 240 --device "$device"
        --precision "${FDSL_PRECISION:-auto}" --align_precision "${FDSL_ALIGN_PRECISION:-fp32}"
        --useNAM "$use_nam" --winmode "$winmode" --winsize "$win_size"
        --winstride "$win_stride" --winwight "$win_weight" --seed "$seed" --k_shot "$kshots")

# VisA, model trained on MVTec AD (paper, 1-shot: AUROC 90.7 / AUROC_p 97.8; see the table above).
$PY "$here/test.py" --dataset visa --data_path "$VISA_ROOT" \
    --checkpoint_path "$ckpt/trained_on_mvtec/epoch_$test_epoch.pth" --save_path "$results/visa_$tag" "${common[@]}"
# MVTec AD, model trained on VisA (paper, 1-shot: AUROC 94.4 / AUROC_p 96.8; see the table above).
$PY "$here/test.py" --dataset mvtec --data_path "$MVTEC_ROOT" \
    --checkpoint_path "$ckpt/trained_on_visa/epoch_$test_epoch.pth" --save_path "$results/mvtec_$tag" "${common[@]}"
