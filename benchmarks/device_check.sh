#!/usr/bin/env bash
# The CUDA check, run from the repository root on a GPU machine with no network (the device tool):
#   1. the batched pruned evaluation against one pruning at a time (float32: equality; bfloat16: speed);
#   2. the default study on CUDA in float32 with 64 prompts per batch (the CPU run's estimand, other floats);
#   3. peak GPU memory of the read-out and of attribution for a Llama-3-8B-shaped model (random weights).
# Needs: the wheels of .whl/ and .gpu/w2/ (transformer-lens, plotly, ...; the machine's own torch), and the
# default model's GGUF assembled from /tmp/part0 (an earlier call) and .gpu/b/part1. Results go to $OUT.
set -uo pipefail
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 WORKBENCH_CACHE=/tmp/wbcache
OUT=${OUT:-/tmp/device_out}
mkdir -p "$OUT" "$WORKBENCH_CACHE/gguf"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .gpu/w2/*.whl
cat /tmp/part0 .gpu/b/part1 > "$WORKBENCH_CACHE/gguf/SmolLM2-135M-Instruct.Q4_1.gguf"
sha256sum "$WORKBENCH_CACHE/gguf/SmolLM2-135M-Instruct.Q4_1.gguf"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, transformer_lens; print(torch.__version__, transformers.__version__)"

step() { local limit=$1; shift; local started=$SECONDS; timeout "$limit" "$@"; echo "rc=$? after $((SECONDS - started)) s: $*"; }

step 150 python3 benchmarks/pruned_evaluation.py --device cuda --dtype float32 --prunings 16 --names-per-group 2 \
    --batch-sizes 8 128 --out "$OUT/pruned_evaluation_cuda_float32.json" 2>&1 | grep -v "Loading weights"
step 60 python3 benchmarks/pruned_evaluation.py --device cuda --dtype bfloat16 --prunings 16 --names-per-group 2 \
    --batch-sizes 128 --out "$OUT/pruned_evaluation_cuda_bfloat16.json" 2>&1 | grep -v "Loading weights"
sed -e 's/^seed = 0$/seed = 0\ndevice = "cuda"/' -e 's/^batch_size = 8$/batch_size = 64/' \
    configs/study.toml > /tmp/study_cuda.toml
step 240 python3 -m workbench.cli study --config /tmp/study_cuda.toml --out /tmp/study_cuda 2>&1 \
    | tr '\r' '\n' | grep -v "it/s\]\|s/it\]\|batch/s\]\|s/batch\]" | tail -20
cp /tmp/study_cuda/report.md /tmp/study_cuda/manifest.json "$OUT/" 2>/dev/null
step 100 python3 benchmarks/model_memory.py --out "$OUT/model_memory.json" 2>&1 | grep -v "Loading weights"
