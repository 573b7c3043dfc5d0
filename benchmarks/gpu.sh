#!/usr/bin/env bash
# The prepared check for a GPU machine (about 10 minutes): the test suite, whose tests/test_gpu.py runs only
# there, then train.py and evaluate.py with --device cuda at coreset 1% and 10% on one category, timed.
#   bash benchmarks/gpu.sh DATA_ROOT CATEGORY WEIGHTS [OUT]
# e.g. bash benchmarks/gpu.sh ../shared/data/mvtec_ad bottle ../shared/weights/resnet50_imagenet_upto_layer3.pth
# Needs torch with CUDA, faiss (faiss-gpu for the faiss GPU index; else the search runs in torch on the GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
data=${1:?usage: gpu.sh DATA_ROOT CATEGORY WEIGHTS [OUT]}
category=${2:?usage: gpu.sh DATA_ROOT CATEGORY WEIGHTS [OUT]}
weights=${3:?usage: gpu.sh DATA_ROOT CATEGORY WEIGHTS [OUT]}
out=${4:-results/gpu}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import faiss, torch; print('torch', torch.__version__, 'faiss', faiss.__version__, 'faiss GPUs',
faiss.get_num_gpus() if hasattr(faiss, 'get_num_gpus') else 0)" | tee -a "$out/gpu.txt"
python3 -m pytest tests -q -x -p no:cacheprovider 2>&1 | tail -n 30 | tee "$out/tests.txt"
workers=$(( $(nproc) > 16 ? 16 : $(nproc) ))
for ratio in 0.01 0.1; do
    python3 train.py --device cuda --data_path "$data" --category "$category" --backbone resnet50 \
        --weights "$weights" --coreset_ratio "$ratio" --checkpoint_dir "$out/checkpoints_$ratio" \
        --num_workers "$workers" 2>/dev/null | tee "$out/train_$ratio.txt"
    python3 evaluate.py --device cuda --category "$category" --checkpoint_dir "$out/checkpoints_$ratio" \
        --results_dir "$out/results_$ratio" --batch_size 64 --num_workers "$workers" --no_plots 2>/dev/null \
        | tee "$out/evaluate_$ratio.txt"
done
