#!/usr/bin/env bash
# Every GPU measurement in one call on a lent machine (device tool), results under $OUT:
#   deformable conv vs torchvision's CUDA kernel, the assigners, and the ATSS R50 training step
#   vs torchvision's RetinaNet in the same process. Needs ml_collections carried as a wheel
#   (see experiments/README.md); jax, flax, optax, torch and torchvision are on the machine.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:${PYTHONPATH:-}" XLA_PYTHON_CLIENT_PREALLOCATE=false
OUT=${OUT:-/tmp/jaxdet-gpu}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c 'import jax, torch; print("jax", jax.__version__, jax.devices(), "torch", torch.__version__)'
timeout 140 python3 experiments/bench_deform_conv.py --device cuda 2>&1 | tee "$OUT/dcn.txt"
timeout 50 python3 experiments/bench_assigners.py 2>&1 | tee "$OUT/assigners.txt"
timeout 160 python3 experiments/bench_train.py --size 800 1216 --batch 8 --dtype bfloat16 \
    --steps 10 --torchvision RetinaNet 2>&1 | tee "$OUT/train_b8_bf16.txt"
timeout 100 python3 experiments/bench_train.py --size 800 1216 --batch 2 --dtype float32 \
    --steps 10 --torchvision RetinaNet 2>&1 | tee "$OUT/train_b2_fp32.txt"
