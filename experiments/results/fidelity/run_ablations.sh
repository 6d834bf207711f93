#!/usr/bin/env bash
# The ablation runs of issue 13, one after another (each writes $OUT/NAME.json, .log).
# From the repo root:  bash experiments/results/fidelity/run_ablations.sh NAME ...
# Names: paper code paper_std03 code_std01 paper_std03_sat code_inverted
#        code_paper_lrn code_no_cnorm2 code_paper_bias code_paper_pca code_no_div paper_he
# (code_*: the 2012 code with one of its differences from the paper switched to the
# paper's value; paper_he: the paper with a fan-in (He) init, std sqrt(2 / fan_in) per
# tower for conv2-fc7, zero biases; conv1 and fc8 keep 0.01; paper_fanin: variance
# preserving from the pixels on: conv1 std 1 / sqrt(fan_in * 60^2) (mean-subtracted
# pixels have std ~60 on the 0-255 scale), He for conv2-fc7, fc8 1 / sqrt(fan_in), zero
# biases)
set -u
OUT=${OUT:-runs/fid}
STEPS=${STEPS:-60}
PY="${PYTHON:-.venv/bin/python} experiments/results/fidelity/curve.py"
P=experiments/alexnet.py
C=experiments/alexnet_2012_code.py
STD_PAPER='model.init_weight_std=(0.01,0.01,0.01,0.01,0.01,0.01,0.01,0.01)'
STD_CODE='model.init_weight_std=(0.01,0.01,0.03,0.03,0.03,0.01,0.01,0.01)'
# fan-ins per tower: conv2 5*5*48, conv3 3*3*256 (exchange), conv4/5 3*3*192, fc6 6*6*256
# (exchange), fc7 4096 (exchange)
STD_HE='model.init_weight_std=(0.01,0.0408,0.0295,0.0340,0.0340,0.0147,0.0221,0.01)'
STD_FANIN='model.init_weight_std=(0.00087,0.0408,0.0295,0.0340,0.0340,0.0147,0.0221,0.0156)'
BIAS_ZERO='model.init_bias=(0.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0)'
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
    code_paper_lrn) run $NAME $C --set model.lrn.alpha_over_n=False \
        --set model.lrn.before_relu_in_conv1=False ;;             # paper's alpha, after ReLU
    code_no_cnorm2) run $NAME $C --set model.cnorm2.enabled=False ;;
    code_paper_bias) run $NAME $C --set optim.bias_weight_decay=True \
        --set optim.bias_lr_multiplier=1.0 ;;                      # decay on, 1x rate
    code_paper_pca) run $NAME $C --set input.pca_scale=eigenvalues ;;
    code_no_div) run $NAME $C --set input.train_divisor=1.0 ;;
    paper_he) run $NAME $P --set "$STD_HE" --set "$BIAS_ZERO" ;;
    paper_fanin) run $NAME $P --set "$STD_FANIN" --set "$BIAS_ZERO" ;;
    paper_fanin_warmup) run $NAME $P --set "$STD_FANIN" --set "$BIAS_ZERO" \
        --set optim.warmup_epochs=0.5 ;;                           # lr 0 -> 0.01 over 33 steps
    *) echo "unknown $NAME"; exit 2 ;;
  esac
done
