#!/usr/bin/env bash
# Every measurement that issue 10's targets name, in one run on this machine, each command's
# output saved in its own file (the commands are those quoted in docs/performance.md):
#
#     bash benchmarks/targets.sh [OUT [CORPUS]]      # OUT default bench-out, CORPUS Tiny Shakespeare
#     DRY_RUN=1 bash benchmarks/targets.sh           # print the commands only
#
# About 12 minutes on 2 cores. Run it on a quiet machine: the figures are ratios of rounds run
# side by side, but a busy neighbour still moves them. Needs the bench extra (PyTorch).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-bench-out}
DATA=${2:-../shared/data/tinyshakespeare.txt}
mkdir -p "$OUT"

run() {  # run NAME COMMAND...: COMMAND's stdout and stderr into OUT/NAME.txt
    local name=$1
    shift
    echo "$*" >&2
    if [[ -z "${DRY_RUN:-}" ]]; then
        "$@" > "$OUT/$name.txt" 2>&1
    fi
}

if [[ -z "${DRY_RUN:-}" ]]; then
    { git log --oneline -1 2>/dev/null || true; lscpu | grep -E "Model name|CPU family|Model:"; } > "$OUT/machine.txt"
fi
run train_baby python benchmarks/train.py --data "$DATA" --engines tensorlite,torch,torch-compile --rounds 9 --iters 60
for i in 1 2 3 4 5 6 7; do
    run "profile_$i" python benchmarks/profile_step.py --data "$DATA" --steps 60
done
run train_larger python benchmarks/train.py --data "$DATA" --config larger --engines tensorlite,torch --rounds 3 --iters 8 --warmup 2
run profile_larger python benchmarks/profile_step.py --data "$DATA" --config larger --steps 4
run ops python benchmarks/ops.py --baby --threads 1 --paths numpy c
run start_warm python benchmarks/kernel_load.py --train --data "$DATA"
run start_cold python benchmarks/kernel_load.py --train --cold --paths c --data "$DATA"
run quality python -m gpt.train --preset baby --data "$DATA" --out-dir "$OUT/baby_run"
run sample python benchmarks/sample.py --cli "$OUT/baby_run" --tokens 2000 --rounds 5
echo "outputs in $OUT/" >&2
