#!/usr/bin/env bash
# The paper's full design (configs/full.toml) on a CUDA machine with no network (the device tool), float32, 64
# prompts per batch: wall time per stage, peak memory (the manifest's peak_memory_gib: resident and GPU) and the
# report. Needs the wheels of .whl/ (gguf, transformers < 5.24, transformer-lens) in /tmp/whl and the first part of
# the default model's GGUF in /tmp/part0 (an earlier call copies both: the working tree that travels is limited to
# 64 MiB), and, carried, .gpu/b/part1 and the wheels of .gpu/w2/ (plotly, narwhals).
# Then the read-out in bfloat16 against float32 on CUDA (benchmarks/bfloat16_readout.py).
# Results go to $OUT: report.md, manifest.json, tables.tar.gz, bfloat16_readout_cuda.json.
set -uo pipefail
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 WORKBENCH_CACHE=/tmp/wbcache
OUT=${OUT:-/tmp/device_out}
mkdir -p "$OUT" "$WORKBENCH_CACHE/gguf"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site /tmp/whl/*.whl .gpu/w2/*.whl
cat /tmp/part0 .gpu/b/part1 > "$WORKBENCH_CACHE/gguf/SmolLM2-135M-Instruct.Q4_1.gguf"
sha256sum "$WORKBENCH_CACHE/gguf/SmolLM2-135M-Instruct.Q4_1.gguf"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
sed -e 's/^seed = 0$/seed = 0\ndevice = "cuda"/' -e 's/^batch_size = 8$/batch_size = 64/' \
    configs/full.toml > /tmp/full_cuda.toml
started=$SECONDS
timeout "${FULL_LIMIT_S:-520}" python3 -m workbench.cli study --config /tmp/full_cuda.toml --out /tmp/full_cuda \
    --figures /tmp/full_figures 2>&1 | tr '\r' '\n' | grep -v "it/s\]\|s/it\]\|batch/s\]\|s/batch\]" | tail -25
echo "rc=${PIPESTATUS[0]} after $((SECONDS - started)) s"
cp /tmp/full_cuda/report.md /tmp/full_cuda/manifest.json "$OUT/" 2>/dev/null
tar czf "$OUT/tables.tar.gz" -C /tmp/full_cuda tables 2>/dev/null
timeout "${BF16_LIMIT_S:-60}" python3 benchmarks/bfloat16_readout.py --device cuda --names-per-group 2 2>&1 \
    | grep -v "Loading weights"
cp benchmarks/results/bfloat16_readout_cuda.json "$OUT/" 2>/dev/null
