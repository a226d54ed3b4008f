#!/usr/bin/env bash
# The one GPU script: GPU time comes rarely and in short slots, so this does the most
# valuable measurements first, each section capped (the default caps add up to 8
# minutes), packing what it has into $OUT after every section (a cut-off run still
# brings back everything finished so far).
#
#   bash benchmarks/run_gpu.sh                     # from the repo root, on the GPU machine
#
# Sections, in order, each capped by `timeout` (seconds, override with the variables):
#   1. tests    GPU kernel tests at GPU shapes (tests/kernels)                 TESTS_S=120
#   2. headline bf16, 2304x65536, B=8192 (Gemma 2 2B width, 64k latents):     BENCH_S=180
#               TopK and JumpReLU forward vs sae-lens and the dense maths,
#               topk_encode vs the bare matmul, sparse_decode vs dense and the copy
#               ceiling
#   3. train    the TopK training step at 2304x65536 vs sae-lens (and sparsify)  TRAIN_S=120
#   4. tune     `fastsae tune` for the benchmark shapes (the dispatch decisions)  TUNE_S=60
#   5. grid     only with SECTIONS including it: the rest of `fastsae bench`'s grid
# SECTIONS picks some (default "tests headline train tune"); BENCH_ARGS is added to the
# grid section's `fastsae bench` call.
#
# $OUT gets few files (the device tool brings back at most 8): summary.txt (versions,
# each section's status and time) and results.tgz (every log, JSON and PNG).
#
# The GPU image has python3 with torch, triton, pytest, pytest-benchmark and matplotlib,
# but not transformer-lens / sae-lens: the sae_lens / sparsify rows are skipped with a
# reason unless their wheels are carried in .whl (`bash benchmarks/fetch_gpu_wheels.sh`
# here first, then carry [".whl"]), in which case they are installed first.
set -uo pipefail
OUT=${OUT:-benchmarks/results/gpu}
WORK=${WORK:-$(mktemp -d /tmp/fastsae-gpu.XXXXXX)}
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1
# the 1M-latent step nearly fills an 80 GB GPU: no fragmentation to spare
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
# the dispatch cache of `fastsae tune` goes with the results
export FASTSAE_CACHE_DIR="$WORK/cache"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"

flush() {  # pack everything so far into $OUT/results.tgz (replaced whole, never torn)
    tar czf "$OUT/.results.tgz.tmp" -C "$WORK" . && mv "$OUT/.results.tgz.tmp" "$OUT/results.tgz"
}

section() {  # section NAME SECONDS CMD...: run CMD under a time cap, log it, record, flush
    local name=$1 secs=$2
    shift 2
    local t0=$SECONDS
    timeout --signal=INT --kill-after=15 "$secs" "$@" > "$WORK/$name.log" 2>&1
    local rc=$?
    local status="rc=$rc"
    [[ $rc == 124 || $rc == 137 ]] && status="rc=$rc (cut off at ${secs}s)"
    echo "$name: $status, $((SECONDS - t0)) s" | tee -a "$SUMMARY"
    tail -n 3 "$WORK/$name.log" | sed "s/^/  $name| /" >> "$SUMMARY"
    flush
    return "$rc"
}

if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . > "$WORK/install.log" 2>&1 \
    || { echo "fastsae install failed" | tee -a "$SUMMARY"; tail "$WORK/install.log"; flush; exit 1; }
nvidia-smi > "$WORK/nvidia-smi.txt" 2>&1
python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())" \
    2>&1 | tee -a "$SUMMARY"
date -u +"date %Y-%m-%dT%H:%M:%SZ" >> "$SUMMARY"
flush

SECTIONS=" ${SECTIONS:-tests headline train tune} "
failed=0
run() { [[ $SECTIONS == *" $1 "* ]]; }

if run tests; then
    section tests "${TESTS_S:-120}" python3 -m pytest -q -x tests/kernels || failed=1
fi
if run headline; then
    section headline "${BENCH_S:-180}" python3 -m fastsae bench --device cuda --dtype bf16 \
        --shapes 2304x65536 --batch 8192 --arch topk,jumprelu \
        --ops forward,encode,decode,matmul,copy \
        --providers fastsae-triton,sae_lens,dense-torch --out "$WORK/headline" || failed=1
fi
if run train; then
    # the TopK training step (fastsae vs sae-lens and EleutherAI sparsify when their wheels
    # are carried in .whl, bf16 autocast) at the headline shape only
    section train "${TRAIN_S:-120}" python3 -m pytest -q benchmarks/test_bench_train_step.py \
        -k 2304x65536 --benchmark-json="$WORK/train-step.json" || failed=1
fi
if run tune; then
    section tune "${TUNE_S:-60}" python3 -m fastsae tune --shapes 2304x65536 \
        --rows 4096 8192 --dtype bf16 fp32 || failed=1
    [[ -f "$WORK/cache/dispatch.json" ]] && cp "$WORK/cache/dispatch.json" "$WORK/tune-dispatch.json"
    flush
fi
if run grid; then
    # shellcheck disable=SC2086
    section grid "${GRID_S:-540}" python3 -m fastsae bench --device cuda --out "$WORK/grid" \
        ${BENCH_ARGS:-} || failed=1
fi
echo "done: failed=$failed" | tee -a "$SUMMARY"
exit "$failed"
