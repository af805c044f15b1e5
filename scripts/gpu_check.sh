#!/usr/bin/env bash
# The checks that need a GPU, for a person to run on a machine with NVIDIA GPUs,
# from the repository root, after `make install` (and `.venv/bin/pip install -e '.[bench]'`
# for the comparison with IBM ART):
#
#   scripts/gpu_check.sh [RESULTS_DIR]
#
# 1. nvidia-smi and the torch/CUDA versions;
# 2. the test suite with CUDA visible;
# 3. `ucan bench --device cuda` on the MNIST CNN and ResNet-110: raw forward and certify at
#    batch sizes 16..4096, float32 and `--amp bf16` (one run each, rounds alternating),
#    with the peak-memory probe on the MNIST CNN;
# 4. `ucan certify` end to end on a freshly trained MNIST run, fixed n (float32, bf16)
#    and, when `ucan certify` has `--radii`, the grid mode;
# 5. with two GPUs or more: a two-process `torchrun` certify (nccl), compared row by row
#    with the one-process result.
#
# Everything goes under RESULTS_DIR (default gpu_results/<date>-<host>): one log per step,
# the bench JSON files and summary.txt (status and seconds of each step). A failing step
# does not stop the others; the script exits 1 if any failed.
set -euo pipefail

cd "$(dirname "$0")/.."
PY=.venv/bin/python
UCAN=.venv/bin/ucan
RESULTS=${1:-gpu_results/$(date +%Y%m%d-%H%M%S)-$(hostname -s)}
mkdir -p "$RESULTS"
SUMMARY=$RESULTS/summary.txt
: > "$SUMMARY"
FAILED=0

# step NAME COMMAND...: run COMMAND with its output in RESULTS/NAME.log; status and time to the summary
step() {
    local name=$1 start=$SECONDS status=0
    shift
    echo "== $name: $*"
    "$@" > "$RESULTS/$name.log" 2>&1 || status=$?
    printf '%-26s status %3d %6d s   %s\n' "$name" "$status" "$((SECONDS - start))" "$*" | tee -a "$SUMMARY"
    if [ "$status" -ne 0 ]; then
        FAILED=1
        tail -n 20 "$RESULTS/$name.log"
    fi
}

note() {
    echo "$*" | tee -a "$SUMMARY"
}

if [ ! -x "$PY" ]; then
    echo "no $PY: run \`make install\` first" >&2
    exit 1
fi
step nvidia-smi nvidia-smi
step environment "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'devices', [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]); \
assert torch.cuda.is_available(), 'torch sees no CUDA device'"
if ! "$PY" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
    echo "torch sees no CUDA device: nothing to check here (see $RESULTS/environment.log)" >&2
    exit 1
fi
GPUS=$(nvidia-smi -L | wc -l)
note "GPUs: $GPUS"

step tests "$PY" -m pytest -q

step bench_mnist_cnn "$UCAN" bench --device cuda --model mnist_cnn --amp bf16 --memory-probe \
    --json "$RESULTS/bench_mnist_cnn.json"
step bench_resnet110 "$UCAN" bench --device cuda --model resnet110 --n 10000 --amp bf16 \
    --json "$RESULTS/bench_resnet110.json"

RUN=$RESULTS/mnist_run
step train "$UCAN" train classifier --model mnist_cnn --epochs 1 --device cuda --out "$RUN" --no-progress
CERTIFY=(certify "$RUN" --max 100 --device cuda --no-progress)
step certify_fixed_fp32 "$UCAN" "${CERTIFY[@]}" --out "$RESULTS/certify_fixed_fp32.tsv"
step certify_fixed_bf16 "$UCAN" "${CERTIFY[@]}" --amp bf16 --out "$RESULTS/certify_fixed_bf16.tsv"
if "$UCAN" certify --help | grep -q -- --radii; then
    step certify_grid_fp32 "$UCAN" "${CERTIFY[@]}" --radii 0.25 0.5 0.75 1.0 --out "$RESULTS/certify_grid_fp32.tsv"
    step certify_grid_bf16 "$UCAN" "${CERTIFY[@]}" --radii 0.25 0.5 0.75 1.0 --amp bf16 \
        --out "$RESULTS/certify_grid_bf16.tsv"
else
    note "grid mode: skipped (ucan certify has no --radii option yet)"
fi

if [ "$GPUS" -ge 2 ]; then
    step certify_torchrun_nccl .venv/bin/torchrun --standalone --nproc_per_node=2 -m -- ucan_smoothing.cli \
        certify "$RUN" --max 100 --no-progress --out "$RESULTS/certify_torchrun.tsv"
    # the noise of image i depends only on (seed, i): two processes must certify what one does
    step torchrun_matches_one_process "$PY" - "$RESULTS/certify_fixed_fp32.tsv" "$RESULTS/certify_torchrun.tsv" <<'EOF'
import csv, sys

def rows(path):
    with open(path, newline="") as handle:
        return {row["idx"]: {k: v for k, v in row.items() if k != "time"}
                for row in csv.DictReader(handle, delimiter="\t")}

one, two = rows(sys.argv[1]), rows(sys.argv[2])
differ = sorted((idx for idx in one if one[idx] != two.get(idx)), key=int)
print(f"{len(one)} rows in one process, {len(two)} with torchrun; differing rows: {differ or 'none'}")
sys.exit(1 if differ or set(one) != set(two) else 0)
EOF
else
    note "torchrun with nccl: skipped ($GPUS GPU)"
fi

note "results in $RESULTS"
exit "$FAILED"
