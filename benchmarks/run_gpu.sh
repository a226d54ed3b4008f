#!/usr/bin/env bash
# One call on a lent GPU machine (the `device` tool's `run`), from the repo root:
#   bash benchmarks/run_gpu.sh                      # GPU kernel tests + bench grid slice
#   BENCH_ARGS="--dtype bfloat16 --shapes 2304x65536,4096x131072" bash benchmarks/run_gpu.sh
# Writes logs, JSON and PNG under $OUT (the device tool brings $OUT back).
#
# The GPU image has python3 with torch, triton, pytest, pytest-benchmark and matplotlib,
# but not transformer-lens / sae-lens: the kernel tests and the fastsae-triton /
# fastsae-torch / dense-torch rows run without them (fastsae.ops needs neither); the
# sae_lens / sparsify rows and the module parity tests are skipped with a reason unless
# their wheels are carried in .whl (`bash benchmarks/fetch_gpu_wheels.sh` here first,
# then carry [".whl"]), in which case they are installed first. The full grid takes
# longer than one 10-minute call: split it with BENCH_ARGS, and pick parts with
# SECTIONS (any of "tests bench train"; default all three), e.g.
#   SECTIONS="tests train" bash benchmarks/run_gpu.sh   # kernel tests + training step
#   SECTIONS=bench BENCH_ARGS="--dtype bfloat16" bash benchmarks/run_gpu.sh
set -uo pipefail
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
# the 1M-latent step leaves ~6 GiB of an 80 GB GPU free: no fragmentation to spare
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 \
    || { echo "fastsae install failed (see install.log)"; exit 1; }
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())" \
    | tee "$OUT/versions.txt"
SECTIONS=" ${SECTIONS:-tests bench train} "
tests_rc=0 bench_rc=0 train_rc=0
if [[ $SECTIONS == *" tests "* ]]; then
    python3 -m pytest -q tests/kernels 2>&1 | tee "$OUT/gpu-tests.log"
    tests_rc=${PIPESTATUS[0]}
fi
if [[ $SECTIONS == *" bench "* ]]; then
    # shellcheck disable=SC2086
    python3 -m fastsae bench --device cuda --out "$OUT" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log"
    bench_rc=${PIPESTATUS[0]}
fi
if [[ $SECTIONS == *" train "* ]]; then
    # the TopK training step (fastsae vs sae-lens and EleutherAI sparsify when their wheels
    # are carried in .whl, bf16 autocast) and the 1M-latent width check
    python3 -m pytest -q benchmarks/test_bench_train_step.py \
        --benchmark-json="$OUT/train-step.json" 2>&1 | tee "$OUT/train-step.log"
    train_rc=${PIPESTATUS[0]}
fi
echo "gpu tests rc=$tests_rc, bench rc=$bench_rc, train-step rc=$train_rc"
exit $(( tests_rc || bench_rc || train_rc ))
