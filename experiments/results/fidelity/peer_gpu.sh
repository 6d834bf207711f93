#!/bin/bash
# Issue 19: the PyTorch peer (benchmarks/torch_peer/train.py) trained with the imagenette
# preset's recipe, four seeds, and with the paper's init (std 0.01 in conv3-5), four
# seeds, on one GPU (float32, TF32 off), all eight at once. The learning curves depend on
# the recipe, not on the machine; the CPU time per step is measured separately, beside
# ours, on the 2-core machine (speed.md). Expects the hold-out split at $1 (made by
# `python -m alexnet_jax.data.holdout`); writes $2/<run>/log.jsonl and final.json.
set -u
D=$1; R=$2; P=benchmarks/torch_peer/train.py; C=/tmp/fid_cache.npz
mkdir -p "$R"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c 'import torch, PIL, numpy; print("torch", torch.__version__, "PIL", PIL.__version__, "numpy", numpy.__version__)'
python3 $P --data="$D" --out="$R/prep" --cache=$C --prepare_only
for init in preset paper; do
  for s in 0 1 2 3; do
    python3 $P --data="$D" --cache=$C --device=cuda --threads=2 --init_std=$init --seed=$s \
      --out="$R/${init}_s$s" > "$R/${init}_s$s.out" 2>&1 &
  done
done
wait
for f in "$R"/*_s?/final.json; do echo "$f $(tr -d '\n ' < "$f" | cut -c1-160)"; done
