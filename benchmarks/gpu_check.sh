#!/usr/bin/env bash
# bash benchmarks/gpu_check.sh WHEELS_DIR
#
# The one script to run on a lent GPU machine, from the repository root. It installs the carried
# wheels (no dependencies resolved, into a private folder: the machine's own torch,
# transformers and peft stay as they are), runs the CUDA-marked tests, then the GPU preset of
# the benchmark (1B-shaped LoRA / full / QLoRA contenders and the 7B QLoRA memory check).
# Everything it produces lands under $OUT (default ./gpu-out). How to prepare WHEELS_DIR:
# benchmarks/RESULTS.md, "Running the GPU preset". Budget: about 10 minutes on one H100/H200.
# PARTS (default "tests bench") picks the parts; "fractional" (issue 10, about 3 minutes, a run of
# its own) is a search of 2 trials sharing one GPU (benchmarks/gpu_fractional.yaml), with the
# GPU's per-process memory sampled every second while it runs.
set -uo pipefail

WHEELS=${1:?usage: bash benchmarks/gpu_check.sh WHEELS_DIR}
OUT=${OUT:-$PWD/gpu-out}
PY=${PYTHON:-python3}
SITE=${SITE:-/tmp/raysft-site}          # carried packages; not under $OUT (that comes back)
WORK=${WORK:-/tmp/raysft-bench}         # random-init models (the 7B one is ~13 GB) and logs
mkdir -p "$OUT" "$SITE" "$WORK"
exec > >(tee "$OUT/gpu_check.log") 2>&1

echo "== machine"
nvidia-smi || echo "nvidia-smi not found"
date -u +"%Y-%m-%dT%H:%M:%SZ"

echo "== install carried wheels into $SITE"
shopt -s nullglob
wheels=("$WHEELS"/*.whl)
if ((${#wheels[@]})); then
    "$PY" -m pip install -q --no-deps --no-index --target "$SITE" "${wheels[@]}" \
        || echo "WARNING: some wheels did not install"
else
    echo "WARNING: no wheels in $WHEELS"
fi
# The repository first (raysft itself), then the carried packages, then the machine's own.
export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false

echo "== versions"
"$PY" - <<'EOF' | tee "$OUT/versions.txt"
import importlib
for name in ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "trl", "datasets",
             "pydantic", "yaml", "pytest"):
    try:
        mod = importlib.import_module(name)
        print(f"{name:14s} {getattr(mod, '__version__', '?')}")
    except Exception as err:  # report and go on: the benchmark skips what it cannot run
        print(f"{name:14s} MISSING ({type(err).__name__}: {err})")
import torch
print("cuda", torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else "")
EOF

PARTS=${PARTS:-tests bench}
has_part() { [[ " $PARTS " == *" $1 "* ]]; }

if has_part tests; then
echo "== CUDA-marked tests"
# Only the files that hold CUDA tests: the rest may import packages this machine lacks.
mapfile -t cuda_files < <(grep -l "mark.cuda" tests/unit/*.py tests/integration/*.py 2>/dev/null)
if ((${#cuda_files[@]})); then
    timeout 150 "$PY" -m pytest -q -m cuda -p no:cacheprovider "${cuda_files[@]}" \
        2>&1 | tee "$OUT/pytest-cuda.txt"
    echo "pytest exit: ${PIPESTATUS[0]}"
else
    echo "no CUDA-marked tests found"
fi
fi

if has_part bench; then
echo "== benchmark: GPU preset"
# BENCH_ARGS, e.g. "--contenders raysft-qlora-7b", splits the preset over two runs if needed.
# shellcheck disable=SC2086
timeout 420 "$PY" -m raysft.bench --preset gpu --workdir "$WORK" --timeout 200 \
    --out "$OUT/results-gpu.json" --results-md "$OUT/RESULTS-gpu.md" \
    --note "run by benchmarks/gpu_check.sh" ${BENCH_ARGS:-}
echo "bench exit: $?"
mkdir -p "$OUT/logs"
cp "$WORK"/*.log "$WORK"/*.out.json "$OUT/logs/" 2>/dev/null || true
fi

if has_part fractional; then
echo "== fractional GPUs: 2 trials on one GPU (benchmarks/gpu_fractional.yaml)"
rm -rf runs/gpu-fractional runs/gpu-fractional-mlflow.db
nvidia-smi --query-compute-apps=timestamp,pid,used_memory --format=csv,noheader -l 1 \
    > "$OUT/fractional-smi.csv" 2>&1 &
smi=$!
timeout 240 "$PY" -m raysft.tune benchmarks/gpu_fractional.yaml 2>&1 | tee "$OUT/fractional.log"
echo "tune exit: ${PIPESTATUS[0]}"
kill "$smi" 2>/dev/null
cp runs/gpu-fractional/summary.json "$OUT/fractional-summary.json" 2>/dev/null || true
"$PY" - "$OUT/fractional-smi.csv" <<'EOF' | tee "$OUT/fractional.txt"
import collections, sys
at = collections.defaultdict(dict)  # timestamp -> pid -> MiB
for line in open(sys.argv[1]):
    parts = [p.strip() for p in line.split(",")]
    if len(parts) == 3 and parts[2].endswith("MiB"):
        at[parts[0]][parts[1]] = int(parts[2].split()[0])
most = max((len(p) for p in at.values()), default=0)
peaks = collections.Counter()
for pids in at.values():
    for pid, mib in pids.items():
        peaks[pid] = max(peaks[pid], mib)
print(f"most processes on the GPU at once: {most}")
print("peak MiB per process (nvidia-smi, CUDA context included):", dict(peaks))
EOF
fi
echo "== done; outputs in $OUT"
