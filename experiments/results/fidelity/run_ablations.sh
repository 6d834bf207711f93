#!/usr/bin/env bash
# The ablation runs of issue 13, one after another (each writes $OUT/NAME.json, .log).
# From the repo root:  bash experiments/results/fidelity/run_ablations.sh NAME ...
# Names: paper code paper_std03 code_std01 paper_std03_sat code_inverted
set -u
OUT=${OUT:-runs/fid}
STEPS=${STEPS:-60}
PY="nice -n 19 ${PYTHON:-.venv/bin/python} experiments/results/fidelity/curve.py"
P=experiments/alexnet.py
C=experiments/alexnet_2012_code.py
STD_PAPER='model.init_weight_std=(0.01,0.01,0.01,0.01,0.01,0.01,0.01,0.01)'
STD_CODE='model.init_weight_std=(0.01,0.01,0.03,0.03,0.03,0.01,0.01,0.01)'
mkdir -p "$OUT"
run() {  # name config [--set ...]
  local name=$1 cfg=$2; shift 2
  [[ -f $OUT/$name.done ]] && { echo "skip $name"; return; }
  $PY --config=$cfg --steps=$STEPS --eval_at=$STEPS --out=$OUT/$name.json "$@" \
      > $OUT/$name.log 2>&1 && touch $OUT/$name.done
}
for NAME in "$@"; do
  case $NAME in
    paper) run $NAME $P ;;
    code) run $NAME $C ;;
    paper_std03) run $NAME $P --set "$STD_CODE" ;;                 # paper + conv3-5 std 0.03
    code_std01) run $NAME $C --set "$STD_PAPER" ;;                 # 2012 code, std 0.01
    paper_std03_sat) run $NAME $P --set "$STD_CODE" \
        --set model.dropout_style=scale_at_test ;;                 # + the paper's test-time 0.5
    code_inverted) run $NAME $C --set model.dropout_style=inverted ;;
    *) echo "unknown $NAME"; exit 2 ;;
  esac
done
