#!/usr/bin/env bash
# The whole GPU check of kdcache in one script, for the first minutes on a fresh CUDA machine.
#
#   bash bench/gpu_check.sh             # from the checkout: install, gpu tests, benchmarks, table
#   bash bench/gpu_check.sh --dry-run   # the same stages on the CPU at tiny sizes (no install);
#                                       # also KDCACHE_GPU_CHECK_DRY_RUN=1; tests/test_gpu_check.py
#
# Stages (each under its own timeout, all inside an 8-minute budget; results print as they come):
#   1. install: pip install -e ".[test]" (a CUDA torch already present is kept; none: pip's torch)
#   2. which GPU, torch and CUDA it runs on
#   3. python -m pytest -m gpu tests/test_gpu.py (bf16 build, CUDA fused loss, nccl, round trip)
#   4. build throughput / bare forward (bench/bench_build.py): a 12-layer hidden-768 Llama
#      teacher (~110M parameters at vocab 32k, ~180M at 128k), top-64 and the default mode
#   5. KD step / CE step, tokens/s and peak memory (bench/gpu_step.py), vocab 32k and 128k
#   6. kdcache.hf.KDTrainer on CUDA: its loss equals kdcache train's, bf16 steps (tests/test_hf.py)
#   7. train smoke (bench/gpu_train_smoke.py): 100 steps of a ~0.5B vocab-152k student, SIGKILL
#      during a save, --resume, final/ loaded; DDP vs --fsdp tokens/s + peak memory on >= 2 GPUs
#   8. train step of a ~0.5B student at vocab 152k: fp32 vs bf16 head, checkpointing, compile,
#      tokens/s, peak memory, the head's share of the step (bench/gpu_train_check.py)
#   9. build / bare forward with the device-sized head (bench/gpu_build_scale.py): auto vs the
#      old CPU chunking, top-64 and the default mode, vocab 32k and 152k
# Logs and RESULT lines go to $KDCACHE_GPU_CHECK_OUT (default: a new temp dir); PYTHON picks the
# interpreter (default python3).
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
DRY=${KDCACHE_GPU_CHECK_DRY_RUN:-0}
[[ "${1:-}" == "--dry-run" ]] && DRY=1
OUT=${KDCACHE_GPU_CHECK_OUT:-$(mktemp -d -t kdcache-gpu-check-XXXXXX)}
mkdir -p "$OUT"
BUDGET=${KDCACHE_GPU_CHECK_BUDGET:-465}  # seconds for all stages (8 minutes with margin)
START=$SECONDS

stage() {  # stage NAME LIMIT_S COMMAND...: run under min(LIMIT, what is left), log, show as it goes
    local name=$1 limit=$2 left=$((BUDGET - (SECONDS - START)))
    shift 2
    ((left < limit)) && limit=$left
    if ((limit < 5)); then
        echo "=== $name: skipped, the ${BUDGET}s budget is spent"
        return 1
    fi
    echo "=== $name (timeout ${limit}s)"
    timeout --kill-after=10 "$limit" "$@" 2>&1 | grep --line-buffered -v -e "it/s\]" -e "^Loading" \
        | tee "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc after $((SECONDS - START))s in all"
    return "$rc"
}

if ((DRY)); then
    echo "kdcache GPU check: DRY RUN on the CPU at tiny sizes (no install)"
else
    echo "kdcache GPU check"
    if "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null
    then
        stage install 100 "$PYTHON" -m pip install -q -e ".[test]"  # keeps the CUDA torch
    else
        stage install 180 "$PYTHON" -m pip install -q torch -e ".[test]"
    fi
fi
"$PYTHON" - <<'PY' | tee "$OUT/environment.log"
import platform, torch
cuda = torch.cuda.is_available()
name = torch.cuda.get_device_name(0) if cuda else "none (CPU)"
print(f"GPU: {name} x {torch.cuda.device_count()}; torch {torch.__version__}, CUDA "
      f"{torch.version.cuda}, Python {platform.python_version()}")
PY

if ((DRY)); then
    stage gpu-tests 120 "$PYTHON" -m pytest -q -m gpu tests/test_gpu.py -rs -p no:cacheprovider
    stage build-bench 120 "$PYTHON" bench/bench_build.py --device cpu --hidden 64 --layers 1 \
        --heads 1 --vocab 2048 --docs 1 --doc-chars 1500 --max-length 64 --bare-batch 2 \
        --threads 1 --repeats 1
    stage step-bench 120 "$PYTHON" bench/gpu_step.py --device cpu --vocab 2048 --batch 1 \
        --seq 64 --hidden 64 --layers 1 --chunk 32 --reps 1 --threads 1
    stage train-check 120 "$PYTHON" bench/gpu_train_check.py --dry-run --threads 1
    stage build-scale 120 "$PYTHON" bench/gpu_build_scale.py --gpu-tests --device cpu --vocab 2048 --hidden 64 --layers 1 --heads 1 --docs 1 --doc-chars 1500 --max-length 64 --bare-batch 2 --threads 1 --chunkings auto
else
    stage gpu-tests 110 "$PYTHON" -m pytest -q -m gpu tests/test_gpu.py -rs -p no:cacheprovider
    for vocab in 32000 128000; do
        stage "build-bench-$vocab" 95 "$PYTHON" bench/bench_build.py --device cuda --hidden 768 \
            --layers 12 --heads 12 --vocab "$vocab" --docs 6 --max-length 1024 --bare-batch 16 \
            --threads 4 --repeats 1
    done
    stage step-bench 70 "$PYTHON" bench/gpu_step.py --device cuda --vocab 32000 128000 \
        --batch 8 --seq 1024 --hidden 768 --layers 4 --reps 5
    stage train-check 150 "$PYTHON" bench/gpu_train_check.py --batch 8 --seq 1024
    stage build-scale 90 "$PYTHON" bench/gpu_build_scale.py --gpu-tests --device cuda --vocab 32000 152064
fi
stage hf-trainer 60 "$PYTHON" -m pytest -q -m gpu tests/test_hf.py -rs -p no:cacheprovider  # KDTrainer
stage train-smoke 150 "$PYTHON" bench/gpu_train_smoke.py $( ((DRY)) && echo --dry-run )

echo "=== summary ($((SECONDS - START))s)"
cat "$OUT/environment.log"
"$PYTHON" - "$OUT" <<'PY'
import json, pathlib, sys
rows = [json.loads(line[len("RESULT "):]) for log in sorted(pathlib.Path(sys.argv[1]).glob("*.log"))
        for line in log.read_text().splitlines() if line.startswith("RESULT ")]
def num(value, digits=3):
    return "n/a" if value is None else f"{value:.{digits}f}"
print(f"| {'measure':<26} | {'vocab':>6} | {'mode':<10} | {'ratio':>6} | tokens/s |")
print(f"|{'-' * 28}|{'-' * 8}|{'-' * 12}|{'-' * 8}|----------|")
for r in rows:
    if r["bench"] == "build":
        print(f"| {'build / bare forward':<26} | {r['vocab']:>6} | {r['mode']:<10} | "
              f"{num(r['build_over_bare']):>6} | {num(r['build_tokens_per_s'], 0)} vs "
              f"{r['bare_tokens_per_s']:.0f} |")
for r in rows:
    if r["bench"] == "step":
        print(f"| {'KD step / CE step':<26} | {r['vocab']:>6} | {r['variant']:<10} | "
              f"{num(r['kd_over_ce_time']):>6} | {r['kd_tokens_per_s']:.0f} vs "
              f"{r['ce_tokens_per_s']:.0f} |")
        memory = "n/a" if r["kd_peak_mib"] is None else (
            f"{r['kd_peak_mib']:.0f} vs {r['ce_peak_mib']:.0f} MiB")
        print(f"| {'peak memory KD / CE':<26} | {r['vocab']:>6} | {r['variant']:<10} | "
              f"{num(r['kd_over_ce_memory']):>6} | {memory} |")
for r in rows:
    if r["bench"] == "train":
        memory = "n/a" if r["peak_gib"] is None else f"{r['peak_gib']:.1f} GiB"
        share = "" if r["head_share"] is None else f", head {r['head_share']:.0%}"
        print(f"| {'train step ' + r['variant']:<26} | {r['vocab']:>6} | {'vs fp32':<10} | "
              f"{num(r['speed_vs_fp32_head']):>6} | {r['tokens_per_s']:.0f}, {memory}{share} |")
if not rows:
    print("no results (see the stage logs above)")
    sys.exit(1)
PY
PY_RC=$?
echo "logs: $OUT"
exit "$PY_RC"
