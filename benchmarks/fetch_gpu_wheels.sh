#!/usr/bin/env bash
# Here (with network), before a GPU run: download the wheels the GPU image lacks for the
# sae-lens and EleutherAI sparsify comparison rows into .whl/ (git-ignored, ~40 MB), for
# python 3.12 on x86-64. Then carry .whl in the device call; benchmarks/run_gpu.sh
# installs them first:
#   bash benchmarks/fetch_gpu_wheels.sh
#   (device run, carry [".whl"]) bash benchmarks/run_gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
           --platform manylinux1_x86_64)
sdist_only=()
while read -r req; do
    [[ -z "$req" || "$req" == \#* ]] && continue
    if ! python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
            --implementation cp "${platforms[@]}" -d .whl "$req" 2>/dev/null; then
        sdist_only+=("$req")
    fi
done < benchmarks/gpu_wheels.txt
# the few published only as source (pure Python): build their wheels here
if ((${#sdist_only[@]})); then
    python3 -m pip wheel -q --no-deps -w .whl "${sdist_only[@]}"
fi
n=$(grep -cv '^\s*\(#\|$\)' benchmarks/gpu_wheels.txt)
got=$(find .whl -maxdepth 1 -type f -name '*.whl' | wc -l)
echo "$got wheels in .whl ($(du -sh .whl | cut -f1)) for $n requirements"
if ((got < n)); then
    echo "some requirements got no wheel: compare .whl with benchmarks/gpu_wheels.txt" >&2
    exit 1
fi
