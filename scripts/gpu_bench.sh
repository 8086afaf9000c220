#!/usr/bin/env bash
# EMC's GPU benchmarks in one call of the device tool (nvidia-h200), carry ['.whl']:
#   bash scripts/gpu_bench.sh
# .whl/ holds the wheels that shadow the image's newer transformers/tokenizers/hub with EMC's
# pins (cp312 manylinux; the image's own torch is used). Results land in $OUT: env.txt,
# tracing_gpu.{log,json}. BUDGET (s, default 510) bounds the whole script.
set -o pipefail
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
BUDGET=${BUDGET:-510} TRACE_S=${TRACE_S:-420} PROMPTS=${PROMPTS:-3}
left() { echo $((BUDGET - SECONDS)); }

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || { echo "wheel install failed"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1

{
  nvidia-smi -L; df -h /tmp | tail -1; free -g | sed -n 2p; nproc
  python3 - <<'EOF'
import sys, importlib.metadata as md
print("python", sys.version.split()[0])
for n in ("torch", "transformers", "tokenizers", "huggingface_hub", "circuit-tracer", "nnsight",
          "pydantic", "duckdb", "peft", "accelerate", "numpy", "typing_extensions"):
    try:
        print(n, md.version(n))
    except md.PackageNotFoundError:
        print(n, "MISSING")
import torch, circuit_tracer  # import check
print("cuda", torch.version.cuda, torch.cuda.is_available(), torch.cuda.get_device_name(0))
EOF
} 2>&1 | tee "$OUT/env.txt"

t=$(( $(left) - 30 < TRACE_S ? $(left) - 30 : TRACE_S ))
echo "== tracing_gpu (prompts $PROMPTS, limit ${t}s)"
timeout -k 15 "$t" python3 benchmarks/tracing_gpu.py --device cuda --work-dir /tmp/bench-gpu \
  --prompts "$PROMPTS" --json "$OUT/tracing_gpu.json" 2>&1 | tee "$OUT/tracing_gpu.log"
echo "tracing_gpu exit: $? (124: timed out; a warm rerun reuses /tmp/bench-gpu's weights)"

ls -la "$OUT"
