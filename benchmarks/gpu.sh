#!/usr/bin/env bash
# The prepared check for a GPU machine: the CUDA tests, the benchmark against the reference code on the same GPU,
# then train.py and evaluate.py as whole processes and the steady-state inspection throughput, on one category.
#   bash benchmarks/gpu.sh DATA_ROOT CATEGORY WEIGHTS [OUT]
# e.g. bash benchmarks/gpu.sh ../shared/data/mvtec_ad bottle ../shared/weights/resnet50_imagenet_upto_layer3.pth
# WEIGHTS is a state-dict file for ResNet-50, or 'none': random weights, whose timings hold and AUROCs mean nothing.
# Steps, each switched off by setting its variable to 0:
#   TESTS   tests/test_gpu.py: every CUDA path against the CPU one (TESTS=all: the whole suite after it; the other
#           tests check the CPU paths, as on any machine: tests/conftest.py hides the GPU from them)
#   BENCH   benchmarks/bench.py --device cuda at coreset 1% and 10%, and wide_resnet50_2 (random weights) at 1%,
#           against the reference run by ANCHOR (default ../shared/anchors/run_official.py) on the same GPU
#   CLI     train.py and evaluate.py at 1% and 10%, then benchmarks/throughput.py (PASSES copies of the test set),
#           its profile of the model alone appended to the log
# OUT (default results/gpu) gets the log and JSON results, at most seven files; checkpoints and maps go to a
# temporary folder. DEVICE=cpu runs the same steps on the CPU (a dry run of this script).
# Needs torch with CUDA and faiss (faiss-gpu for faiss's GPU index; with faiss-cpu the k-NN runs in torch on the GPU).
set -euo pipefail
usage="usage: gpu.sh DATA_ROOT CATEGORY WEIGHTS [OUT]"
data=$(cd "${1:?$usage}" && pwd)
category=${2:?$usage}
weights=${3:?$usage}
[ "$weights" = none ] || weights=$(realpath "$weights")
out=${4:-results/gpu}
mkdir -p "$out" && out=$(cd "$out" && pwd)
anchor=$(realpath "${ANCHOR:-$(dirname "$0")/../../shared/anchors/run_official.py}")
device=${DEVICE:-cuda}
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1  # the logs keep the summary lines, not the progress bars
log="$out/gpu.log"
failed=0
timed() {  # timed NAME COMMAND...: run it into the log, then its wall seconds; a failure is counted, not fatal
    local start=$EPOCHREALTIME
    "${@:2}" 2>&1 | tee -a "$log" || { failed=$((failed + 1)); echo "$1 FAILED" | tee -a "$log"; }
    awk -v s="$start" -v e="$EPOCHREALTIME" -v n="$1" 'BEGIN { printf "%s: %.1f s wall\n", n, e - s }' | tee -a "$log"
}
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || echo "no nvidia-smi"
    echo "cores: $(nproc)"
    python3 -c "import faiss, torch; print('torch', torch.__version__, 'faiss', faiss.__version__, 'faiss GPUs',
faiss.get_num_gpus() if hasattr(faiss, 'get_num_gpus') else 0)"
} 2>&1 | tee "$log"
if [ "${TESTS:-1}" != 0 ]; then
    timed "CUDA tests" python3 -m pytest tests/test_gpu.py -q -p no:cacheprovider -rs
    if [ "${TESTS:-1}" = all ]; then
        # xdist spreads the suite over processes where it is installed; the notebook's test needs Jupyter's packages.
        parallel=$(python3 -c "import xdist" 2>/dev/null && echo "-n 8" || true)
        skip=$(python3 -c "import nbclient, nbformat" 2>/dev/null || echo "--ignore tests/test_notebook.py")
        # shellcheck disable=SC2086
        timed "test suite" python3 -m pytest tests -q -p no:cacheprovider $parallel $skip -rs
    fi
fi
ratios=(0.01 0.1)
if [ "${BENCH:-1}" != 0 ]; then
    if [ -f "$anchor" ]; then
        timed "benchmark" python3 benchmarks/bench.py --device "$device" --data_path "$data" --category "$category" \
            --backbone resnet50 --weights "$weights" --coreset_ratios "${ratios[@]}" \
            --timing_backbone wide_resnet50_2 --anchor "$anchor" --results_dir "$out"
    else
        echo "no reference runner at $anchor (set ANCHOR): benchmark skipped" | tee -a "$log"
    fi
fi
if [ "${CLI:-1}" != 0 ]; then
    workers=$(( $(nproc) > 16 ? 16 : $(nproc) ))
    for ratio in "${ratios[@]}"; do
        timed "train.py at $ratio" python3 train.py --device "$device" --data_path "$data" --category "$category" \
            --backbone resnet50 --weights "$weights" --coreset_ratio "$ratio" --checkpoint_dir "$work/checkpoints_$ratio"
        timed "evaluate.py at $ratio" python3 evaluate.py --device "$device" --category "$category" \
            --checkpoint_dir "$work/checkpoints_$ratio" --results_dir "$work/results_$ratio" --no_plots
        timed "throughput.py at $ratio" python3 benchmarks/throughput.py --device "$device" --category "$category" \
            --checkpoint_dir "$work/checkpoints_$ratio" --results_dir "$work/results_$ratio" --batch_size 64 \
            --num_workers "$workers" --passes "${PASSES:-20}" --profile
        cat "$work/results_$ratio/profile_$category.txt" >>"$log" 2>/dev/null || true
        cp "$work/results_$ratio/summary.json" "$out/summary_$ratio.json" 2>/dev/null || true
        cp "$work/results_$ratio/throughput_$category.json" "$out/throughput_$ratio.json" 2>/dev/null || true
    done
fi
echo "gpu.sh: $failed step(s) failed" | tee -a "$log"
exit $(( failed > 0 ))
