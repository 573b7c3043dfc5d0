#!/usr/bin/env bash
# The prepared check for a GPU machine (about 6 minutes on one H200): train.py and evaluate.py with --device cuda
# at coreset 1% and 10% on one category, timed; the steady-state inspection throughput (benchmarks/throughput.py);
# then the test suite: tests/test_gpu.py compares every CUDA path with the CPU one; the other tests check the CPU
# paths, as on any machine (tests/conftest.py hides the GPU from them).
#   bash benchmarks/gpu.sh DATA_ROOT CATEGORY WEIGHTS [OUT]
# e.g. bash benchmarks/gpu.sh ../shared/data/mvtec_ad bottle ../shared/weights/resnet50_imagenet_upto_layer3.pth
# WEIGHTS is a state-dict file for ResNet-50, or 'none': random weights, whose timings hold and AUROCs mean nothing.
# OUT (default results/gpu) gets the logs and the JSON results, six files; checkpoints and maps go to a temporary
# folder. DEVICE=cpu runs the same steps on the CPU (a dry run of this script); TESTS=0 skips the test suite.
# Needs torch with CUDA and faiss (faiss-gpu for faiss's GPU index; with faiss-cpu the k-NN runs in torch on the GPU).
set -euo pipefail
usage="usage: gpu.sh DATA_ROOT CATEGORY WEIGHTS [OUT]"
data=$(cd "${1:?$usage}" && pwd)
category=${2:?$usage}
weights=${3:?$usage}
[ "$weights" = none ] || weights=$(realpath "$weights")
out=${4:-results/gpu}
mkdir -p "$out" && out=$(cd "$out" && pwd)
device=${DEVICE:-cuda}
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1  # the logs keep the summary lines, not the progress bars
log="$out/gpu.log"
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || echo "no nvidia-smi"
    nproc
    python3 -c "import faiss, torch; print('torch', torch.__version__, 'faiss', faiss.__version__, 'faiss GPUs',
faiss.get_num_gpus() if hasattr(faiss, 'get_num_gpus') else 0)"
} 2>&1 | tee "$log"
workers=$(( $(nproc) > 16 ? 16 : $(nproc) ))
for ratio in 0.01 0.1; do
    python3 train.py --device "$device" --data_path "$data" --category "$category" --backbone resnet50 \
        --weights "$weights" --coreset_ratio "$ratio" --checkpoint_dir "$work/checkpoints_$ratio" \
        --num_workers "$workers" 2>&1 | tee -a "$log"
    python3 evaluate.py --device "$device" --category "$category" --checkpoint_dir "$work/checkpoints_$ratio" \
        --results_dir "$work/results_$ratio" --batch_size 64 --num_workers "$workers" --no_plots 2>&1 | tee -a "$log"
    cp "$work/results_$ratio/summary.json" "$out/summary_$ratio.json"
    python3 benchmarks/throughput.py --device "$device" --category "$category" \
        --checkpoint_dir "$work/checkpoints_$ratio" --results_dir "$work/results_$ratio" --batch_size 64 \
        --num_workers "$workers" --passes "${PASSES:-20}" 2>&1 | tee -a "$log"
    cp "$work/results_$ratio/throughput_$category.json" "$out/throughput_$ratio.json"
done
if [ "${TESTS:-1}" != 0 ]; then
    # xdist spreads the suite over processes where it is installed; the notebook's test needs Jupyter's packages.
    parallel=$(python3 -c "import xdist" 2>/dev/null && echo "-n 8" || true)
    skip=$(python3 -c "import nbclient, nbformat" 2>/dev/null || echo "--ignore tests/test_notebook.py")
    # shellcheck disable=SC2086
    python3 -m pytest tests -q -p no:cacheprovider $parallel $skip -rs >"$out/tests.log" 2>&1 \
        || { tail -n 60 "$out/tests.log"; exit 1; }
    tail -n 12 "$out/tests.log"
fi
