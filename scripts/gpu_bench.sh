#!/usr/bin/env bash
# EMC's GPU benchmarks in one call of the device tool (nvidia-h100-x1 or nvidia-h200), carry
# ['.whl']:
#   bash scripts/gpu_bench.sh
# .whl/ holds the wheels that shadow the image's newer transformers/tokenizers/hub with EMC's
# pins (cp312 manylinux; the image's own torch is used).
#
# Runs benchmarks/tracing_gpu.py (EMC's graphs against bare circuit-tracer attribute(), at
# TOKENS) for each of RUNS in order: Llama, Gemma 2 and Qwen 3 with per-layer transcoders, then
# Llama with a CLT. BUDGET (s, default 510) bounds the whole script: each run gets a share of
# what is left (WEIGHTS, Llama per-layer the most) as its --time-limit, inside which the
# benchmark skips token lengths and prompts that no longer fit and says so. A run whose share is
# under MIN_RUN_S gets MIN_RUN_S while that much is left (earlier runs first), else it is
# skipped, and said so; time a run leaves unused goes to the later ones. All runs share WORK,
# so the Llama model serves both kinds and a warm rerun reuses every set (the benchmark removes
# the least recently used other sets when the disk is short). Weights are generated on the GPU
# and written in bf16: about 2.5 + 17.3 GB (Llama, per-layer), 5.2 + 3.9 (Gemma 2), 3.4 + 15.3
# (Qwen 3) and 20.4 GB (Llama CLT).
#
# Results land in $OUT (the device tool brings back at most 8 files): env.txt, tracing_gpu.log
# (every run's output, in order) and tracing_<family>_<kind>.json per run that measured
# anything (its last length-by-length state if the run was cut off).
set -o pipefail
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
BUDGET=${BUDGET:-510} PROMPTS=${PROMPTS:-2} TOKENS=${TOKENS:-32,128,512}
WORK=${WORK:-/tmp/bench-gpu} MIN_RUN_S=${MIN_RUN_S:-75} RESERVE_S=${RESERVE_S:-10}
RUNS=${RUNS:-"llama:per_layer gemma2:per_layer qwen3:per_layer llama:clt"}
WEIGHTS=${WEIGHTS:-"3 2 2 2"}  # shares of the time, one per run
LOG="$OUT/tracing_gpu.log"
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

read -r -a runs <<<"$RUNS"
read -r -a weights <<<"$WEIGHTS"
: >"$LOG"
for i in "${!runs[@]}"; do
  family=${runs[$i]%%:*} kind=${runs[$i]#*:}
  rest=0
  for w in "${weights[@]:$i}"; do rest=$((rest + w)); done
  avail=$(( $(left) - RESERVE_S ))
  share=$(( avail * ${weights[$i]:-1} / (rest > 0 ? rest : 1) ))
  (( share < MIN_RUN_S )) && share=$(( avail < MIN_RUN_S ? avail : MIN_RUN_S ))  # order first
  if (( share < MIN_RUN_S )); then
    echo "== SKIPPED $family $kind: ${avail} s left, under MIN_RUN_S (${MIN_RUN_S} s)" \
      | tee -a "$LOG"
    continue
  fi
  json="$OUT/tracing_${family}_${kind}.json"
  echo "== tracing_gpu $family $kind (tokens $TOKENS, prompts $PROMPTS, limit ${share} s," \
    "$(left) s of the budget left)" | tee -a "$LOG"
  # --time-limit leaves the benchmark 15 s to print and exit before the hard limit.
  timeout -k 10 "$share" python3 benchmarks/tracing_gpu.py --device cuda --family "$family" \
    --kind "$kind" --tokens "$TOKENS" --prompts "$PROMPTS" --work-dir "$WORK" \
    --time-limit $((share - 15)) --json "$json" 2>&1 | tee -a "$LOG"
  rc=$?
  echo "== $family $kind exit: $rc (0 ok, 1 L0 out of range, 3 disk, 4 nothing measured," \
    "124 timed out: its JSON holds the lengths it finished)" | tee -a "$LOG"
done

df -h "$WORK" 2>/dev/null | tail -1
ls -la "$OUT"
