#!/usr/bin/env bash
# One script for a short slot on one CUDA GPU: every figure issue 9 and issue 10 ask for, and smoke tests of every
# GPU-only path (nccl where there are 2+ GPUs, fp16 + GradScaler, bf16, CUDA graphs with checkpoints, resume and the profiler, torch.compile,
# memory snapshot). Order: issue 9's done-when runs, the smoke tests, issue 10's part (its table), --compile and the
# recipe sweep, then issue 9's table.
# Usage: bash launch/gpu_check.sh DATA_DIR OUT_DIR [CLASSIC_MAIN_PY]
#   DATA_DIR holds MNIST/raw/; CLASSIC_MAIN_PY is pytorch/examples' mnist/main.py for the "classic example" row
#   (skipped with a note when not given or absent). Set PYTHON to choose the interpreter.
# GPU_CHECK_PARTS picks the parts ("issue9 smoke issue10 sweep" by default; issue 9's table needs issue9). GPU_CHECK_BUDGET_S (default 560) caps the whole
# script below one 600 s device call: every run's time limit is cut to what is left of it, a run that no longer
# fits is skipped with a SKIP line, and the table is printed either way. The runs go in order of importance (the
# done-when figures first, --compile and the recipe sweep last), so a short budget loses the least.
# GPU_CHECK_BUNDLE (default OUT_DIR/gpu_check.tar.gz) receives every log, config, metrics and summary file (not
# checkpoints or memory snapshots), so one file carries the whole result off a machine that returns few files.
# The device machine's command (docs/benchmarks.md, "Running gpu_check.sh on a lent GPU"), one call of 540 s:
#   export GPU_CHECK_BUDGET_S=480 GPU_CHECK_BUNDLE=$OUT/gpu_check.tar.gz
#   bash launch/gpu_check.sh data /tmp/gc .device/main.py 2>&1 | tee $OUT/gpu_check.out
# Refused at once, with one `error:` line and exit 2: other than two or three arguments, a DATA_DIR without
# MNIST/raw/, a budget that is no whole number of seconds, a part it does not have, a bundle folder that does not
# exist, a PYTHON without torch, and a machine without a CUDA GPU (GPU_CHECK_ALLOW_CPU=1 runs its logic on CPU, as
# the tests do). An OUT_DIR that holds an earlier check is moved aside (OUT_DIR.<date>-<time>), never reused.
set -uo pipefail
# Everything a run needs is checked here, before the first import of torch: a mistake found minutes into a device
# call costs the call.
fail() { echo "error: $*" >&2; exit 2; }
(( $# == 2 || $# == 3 )) || fail "usage: gpu_check.sh DATA_DIR OUT_DIR [CLASSIC_MAIN_PY]"
[ -d "$1/MNIST/raw" ] || fail "DATA_DIR $1 holds no MNIST/raw/ (the folder that holds MNIST/raw/, e.g. a copy of ../shared/data)"
data_dir=$(cd "$1" && pwd)
budget=${GPU_CHECK_BUDGET_S:-560}
if ! [[ $budget =~ ^[0-9]+$ ]] || (( budget == 0 )); then
    fail "GPU_CHECK_BUDGET_S must be a whole number of seconds above 0, got '$budget'"
fi
known_parts="issue9 smoke issue10 sweep"
parts=${GPU_CHECK_PARTS:-$known_parts}
for part in $parts; do
    [[ " $known_parts " == *" $part "* ]] || fail "GPU_CHECK_PARTS: no part '$part' (the parts: $known_parts, separated by spaces)"
done
[ -n "${parts// /}" ] || fail "GPU_CHECK_PARTS names no part (the parts: $known_parts)"
# What the caller gave relative to where it stands, made absolute before the script moves to its checkout.
absolute() { case $1 in /*) echo "$1" ;; *) echo "$PWD/$1" ;; esac; }
python=${PYTHON:-python3}
[[ $python == */* ]] && python=$(absolute "$python")
bundle=${GPU_CHECK_BUNDLE:+$(absolute "$GPU_CHECK_BUNDLE")}
classic_main=${3:-}
[ -n "$classic_main" ] && [ -f "$classic_main" ] && classic_main=$(cd "$(dirname "$classic_main")" && pwd)/$(basename "$classic_main")
# An earlier check's OUT_DIR is moved aside, not reused: its finished runs would be "already complete" in a few
# seconds (read as the figures of this check) and its tables appended to.
if [ -e "$2" ] && [ -n "$(ls -A "$2" 2>/dev/null || echo file)" ]; then
    aside="${2%/}.$(date +%Y%m%d-%H%M%S)"
    mv "$2" "$aside" || fail "cannot move the earlier check in $2 aside"
    echo "OUT_DIR $2 held an earlier check: moved to $aside"
fi
mkdir -p "$2" || fail "cannot make OUT_DIR $2"
out=$(cd "$2" && pwd)
bundle=${bundle:-$out/gpu_check.tar.gz}
[ -d "$(dirname "$bundle")" ] || fail "GPU_CHECK_BUNDLE $bundle: no folder $(dirname "$bundle")"
cd "$(dirname "$0")/.." || exit 1
repo=$(pwd)
# The checkout's dist_mnist for every `python -m dist_mnist.*` below: the current directory is on the path only
# without PYTHONSAFEPATH (else an installed copy, or none, would answer).
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
# The caches our runs keep (Python's bytecode, --compile's inductor and Triton caches: dist_mnist/caches.py) in OUT_DIR,
# empty as on a fresh machine, whatever this user's ~/.cache holds: the first run's figures are a first run's.
export XDG_CACHE_HOME="$out/cache"
status=0
want() { [[ " $parts " == *" $1 "* ]]; }

if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi
# GPU_CHECK_ALLOW_CPU=1: the script's own logic on a machine without a GPU (the tests run it so); its figures then
# mean nothing.
"$python" -c 'import platform, sys, torch
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda, gpu or "no CUDA GPU")
sys.exit(0 if gpu else 3)'
gpu_found=$?
case $gpu_found in
    0) ;;
    3) [ "${GPU_CHECK_ALLOW_CPU:-}" = 1 ] || fail "no CUDA GPU here (torch.cuda.is_available() is False): this check measures one (GPU_CHECK_ALLOW_CPU=1 runs its logic on CPU, figures meaning nothing)" ;;
    *) fail "$python cannot import torch (above); set PYTHON to the interpreter that has it" ;;
esac

now() { date +%s.%N; }
since() { awk -v a="$(now)" -v b="$1" 'BEGIN { printf "%.2f\n", a - b }'; }

deadline=$(( $(date +%s) + budget ))
TABLE_RESERVE_S=15  # the table and the bundle, after the last run

# name, time limit (s), then the command; output in $out/NAME.log, whole-process wall seconds in $out/NAME.wall.
# The limit is cut to what is left of the budget; a run with less than a third of its limit left is skipped.
timed() {
    local name=$1 limit=$2; shift 2
    local left=$(( deadline - $(date +%s) - TABLE_RESERVE_S ))
    (( left < 0 )) && left=0
    if (( left * 3 < limit )); then
        echo "SKIP $name: ${left} s of the GPU_CHECK_BUDGET_S budget left, its limit is $limit s"; return
    fi
    local cut=0
    (( left < limit )) && limit=$left && cut=1
    local start rc; start=$(now)
    # -k: launch/train.py turns SIGTERM into one error line, which a process stuck in a C call (a hung GPU) never
    # reaches; SIGKILL 15 s later still ends it inside the device call, bundle and all.
    timeout -k 15 "$limit" "$@" >"$out/$name.log" 2>&1; rc=$?
    if (( rc == 0 )); then
        since "$start" > "$out/$name.wall"
        echo "PASS $name ($(cat "$out/$name.wall") s): $(grep -E '^eval' "$out/$name.log" | tail -1)"
    elif (( (rc == 124 || rc == 137) && cut )); then  # 137: killed after the -k grace
        echo "CUT $name: stopped when the budget ran out, after $limit s (its own limit was longer)"; status=1
    else
        echo "FAIL $name (exit $rc, limit $limit s)"; tail -20 "$out/$name.log"; status=1
    fi
}

# name, time limit, then flags for launch/train.py under torchrun (nccl), into $out/runs/NAME.
smoke() {
    local name=$1 limit=$2; shift 2
    timed "$name" "$limit" "$python" -m torch.distributed.run --standalone --nproc-per-node="${NPROC:-1}" launch/train.py \
        --data-dir "$data_dir" --no-download --output-dir "$out/runs" --run-name "$name" "$@"
}

if want issue9; then
# How long this host's name takes to resolve: gloo resolves it to find its address, unless GLOO_SOCKET_IFNAME names
# an interface (launch/slurm.sbatch and launch/pytorchjob.yaml show where to set it; train.py leaves it to the user).
timeout 30 "$python" -c 'import socket, time; t = time.perf_counter(); name = socket.gethostname()
try: found = socket.getaddrinfo(name, None)[0][4][0]
except OSError as exc: found = f"not resolved ({exc})"
print(f"hostname {name!r} -> {found} in {time.perf_counter() - t:.2f} s")'
# What `init_process_group` with nccl costs in a process of one (5.5-6.1 s on an H200 on 2026-11-27; runs of one
# use gloo since, 2+ GPUs still pay it): with the flight recorder's variables as train.py sets them, and without.
# Each probe under `timeout`: a hang here would cost the session its bundle. The recorder's dumps go in OUT_DIR, not a
# fixed name in /tmp another user could have made first (review_security 15). Without a GPU (GPU_CHECK_ALLOW_CPU) there
# is no nccl to time: two processes importing torch for a traceback each.
if [ "$gpu_found" = 0 ]; then
    for recorder in on off; do
        timeout 60 "$python" -c 'import os, sys, time, torch, torch.distributed as dist
from pathlib import Path
from dist_mnist.collectives import flight_recorder_env
if sys.argv[1] == "on":
    os.environ.update(flight_recorder_env(Path(sys.argv[2]), os.environ))
torch.cuda.set_device(0); torch.zeros(1, device="cuda")
t = time.perf_counter(); dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1)
print(f"init_process_group(nccl), world of one, flight recorder {sys.argv[1]}: {time.perf_counter() - t:.2f} s")
dist.destroy_process_group()' "$recorder" "$out/flight_recorder" ||
            echo "init_process_group(nccl) probe, flight recorder $recorder: failed or timed out"
    done
else
    echo "SKIP init_process_group(nccl) probes: no CUDA GPU"
fi
# --- issue 9: a bare `import torch` on this machine (the first one may be cold; the table takes the faster) ---
# From the command's start to the import's end, which the process writes down: not its exit, which a run's
# startup_s does not hold either (the interpreter's teardown with torch loaded, 0.35-0.45 s on the 2-core CPU, was
# subtracted from the own start-up before, 2026-11-30). Written only for an import that ended well. $1: the file,
# then the code to run before the import (empty, or the cache's choice as launch/train.py makes it).
time_import() {
    local start; start=$(now)
    timeout 60 "$python" -c "import sys, time
$2
import torch
print(f'{time.time():.6f}', file=open(sys.argv[1], 'w'))" "$out/import.at" &&
        awk -v a="$(cat "$out/import.at")" -v b="$start" 'BEGIN { printf "%.2f\n", a - b }' > "$1"
    rm -f "$out/import.at"
}
for i in 1 2; do
    time_import "$out/import_torch_$i.s" ""
done
# Our imports beyond torch's (train.py's `imports` phase less a bare `import torch`), and torch._dynamo, which the
# first optimizer imports (train.py imports it in a thread): how much of the start-up each is once a world of one
# no longer waits 6 s for nccl, where the thread's import hid.
# Then the interpreter's teardown with those loaded (0.7 s on the 2-core CPU), which launch/train.py skips after a
# run that ended well (dist_mnist/shutdown.py) and pytorch/examples' main.py pays.
# $1: what the probe's line starts with (how Python found its bytecode).
import_probe() {
    timeout 60 "$python" -c 'import sys, time; t = [time.perf_counter()]; import torch; t.append(time.perf_counter())
import dist_mnist.train; t.append(time.perf_counter()); import torch._dynamo; t.append(time.perf_counter())
print(sys.argv[2] + ": import torch {:.2f} s, then dist_mnist.train {:.2f} s, then torch._dynamo {:.2f} s".format(
    *(b - a for a, b in zip(t, t[1:]))))
print(f"{time.time():.3f}", file=open(sys.argv[1], "w"))' "$out/import_probe.exit_at" "$1"
    if [ -s "$out/import_probe.exit_at" ]; then
        echo "$1: interpreter teardown after those imports: $(since "$(cat "$out/import_probe.exit_at")") s"
    else
        echo "$1: import probe failed or timed out"
    fi
    rm -f "$out/import_probe.exit_at"
}
import_probe "as Python finds it"

# --- issue 9: the default command; one epoch, ours against pytorch/examples' mnist/main.py, whole-process wall ---
# Our first run on this machine comes first: where Python has no bytecode of torch (an image without __pycache__
# and PYTHONDONTWRITEBYTECODE=1, as the GPU machine's), it fills the bytecode cache that later runs read
# (dist_mnist/caches.py), in $XDG_CACHE_HOME, which is this check's own.
timed ours_1epoch_cold 120 "$python" launch/train.py --data-dir "$data_dir" --no-download --epochs 1 \
    --output-dir "$out/runs" --run-name ours_1epoch_cold
smoke default 120
# The bytecode cache our runs used (summary.json's bytecode_cache; empty where Python had bytecode of its own): a bare
# `import torch` that reads it as a run does (choosing it first, as launch/train.py does), for the own start-up's
# like-for-like subtraction, and the probe's breakdown with it.
bytecode_cache=$("$python" -c 'import json, sys; print(json.load(open(sys.argv[1])).get("bytecode_cache") or "")' \
    "$out/runs/default/summary.json" 2>/dev/null)
if [ -n "$bytecode_cache" ]; then
    for i in 1 2; do
        time_import "$out/import_torch_cached_$i.s" "from dist_mnist.caches import use_bytecode_cache; use_bytecode_cache()"
    done
    PYTHONPYCACHEPREFIX=$bytecode_cache import_probe "with our bytecode cache"
fi
timed ours_1epoch 120 "$python" launch/train.py --data-dir "$data_dir" --no-download --epochs 1 \
    --output-dir "$out/runs" --run-name ours_1epoch
if [ -n "$classic_main" ] && [ -f "$classic_main" ]; then
    # main.py reads ../data relative to its working directory (and downloads only what is missing there).
    mkdir -p "$out/classic/work" && ln -sfn "$data_dir" "$out/classic/data"
    # Not in a subshell: a failure must reach $status.
    cd "$out/classic/work" && timed classic_1epoch 150 "$python" "$classic_main" --epochs 1
    if [ -n "$bytecode_cache" ]; then
        # The classic example as it would run with the same cache (what it imports that ours does not, torchvision,
        # compiled into it first): the like-for-like figure beside the bar's. Their rows have no bar: a failure of
        # theirs is its FAIL line, and does not fail the check.
        kept_status=$status
        timed classic_cache_fill 60 env -u PYTHONDONTWRITEBYTECODE PYTHONPYCACHEPREFIX="$bytecode_cache" "$python" \
            -c 'import torch, torch._dynamo, torch.optim, torchvision'
        timed classic_1epoch_cached 150 env PYTHONPYCACHEPREFIX="$bytecode_cache" "$python" "$classic_main" --epochs 1
        status=$kept_status
    fi
    cd "$repo" || exit 1
else
    echo "SKIP classic_1epoch: pytorch/examples mnist/main.py not given (third argument) or not found"
fi

# --- issue 9: loop with graphs vs eager vs the bare captured step, per batch (the bench's graphs section) ---
# The graphs section alone: the table reads nothing else of the bench, and the throughput section (run before it in
# the same process) starts the classic pipeline's forked DataLoader worker in a process with a CUDA context and
# gloo's threads (docs/pitfalls.md: such a fork hung once), which could cost this section's figures.
timed bench 150 "$python" -m dist_mnist.bench --data-dir "$data_dir" --only graphs --seconds 3 \
    --output "$out/benchmarks.md" --json "$out/bench.json"
cat "$out/benchmarks.md" 2>/dev/null
fi

if want smoke; then
# --- issue 9: the default command with eager steps ---
smoke default_eager 150 --cuda-graphs off

# --- smoke tests of the GPU-only paths (about 1.5 minutes) ---
# name, then a fixed string its log must hold; a run that failed or was skipped is reported already.
expect() { [ ! -f "$out/$1.wall" ] || grep -qF "$2" "$out/$1.log" || { echo "FAIL $1: no \"$2\" in its log"; status=1; }; }
smoke fp16 90 --amp fp16 --max-steps 60 --grad-clip 1.0 --no-tensorboard  # eager, with a note: fp16 is not captured
expect fp16 "note: CUDA graphs off"
# CUDA graphs through a checkpoint and a resume: 60 steps, then on to 90, against 90 steps straight. In fp32 with
# --deterministic the two must end with the same parameters (README, "Checkpoints"; the graph replays continue the
# CUDA generator from the checkpoint's state).
exact=(--amp off --deterministic --max-steps 90 --checkpoint-every 30 --grad-clip 1.0 --no-tensorboard)
smoke graphs_ckpt 60 "${exact[@]}" --max-steps 60
smoke graphs_resume 60 "${exact[@]}" --run-name graphs_ckpt  # continues graphs_ckpt from step 60 (the later name wins)
expect graphs_resume "resumed from step 60"
smoke graphs_straight 60 "${exact[@]}"
# graphs_resume wrote into graphs_ckpt's folder, so its summary is the resumed process's: the first process's
# capture is checked in its log. A failed capture falls back to eager steps, which end with the same parameters.
"$python" -m dist_mnist.gpucheck same-params --graphed "$out/runs" graphs_ckpt graphs_straight || status=1
for name in graphs_ckpt graphs_resume graphs_straight; do
    ! grep -sF "CUDA graph capture failed" "$out/$name.log" || { echo "FAIL $name: eager steps, see above"; status=1; }
done
# A capture that fails (a host sync injected into the captured step) leaves eager steps that train to the end: the
# note, then every step. A failed capture used to leave the CUDA generator in capture mode for the first dropout.
hook="$out/capture_fails_hook"
mkdir -p "$hook" && cat >"$hook/sitecustomize.py" <<'PY'
import torch
import dist_mnist.graphs as graphs
_body = graphs.GraphedStep._body
def _body_with_a_host_sync(self):
    _body(self)
    if torch.cuda.is_current_stream_capturing():
        self.loss.item()  # not allowed while a stream captures: the capture fails
graphs.GraphedStep._body = _body_with_a_host_sync
PY
PYTHONPATH="$hook:$repo" smoke capture_fails 60 --max-steps 30 --eval-every 30 --no-tensorboard
expect capture_fails "note: CUDA graph capture failed"
expect capture_fails "eval  epoch 1 step 30:"
fi

if want issue10; then
# ---- profiler overhead (issue 10) ----------------------------------------------------------------------------------
# Steps before / inside / after a --profile window under each profiler arrangement (one process, arrangements taking
# turns), the phase timers off vs sampled vs every step (long blocks taking turns), whole runs with vs without --profile, at the cuda recipe's
# batch and 16 (the bench's default --profiler-batch-sizes), then PASS/FAIL rows against issue 10's bars. And
# whether the profiled smoke run's trace holds the GPU's kernels (with CUDA graphs too: a graph replay's kernels
# must show up inside the window).
echo "== profiler overhead (issue 10)"
# The profiled smoke run whose traces are checked below.
smoke profile 90 --profile --cuda-memory-snapshot --max-steps 30 --no-tensorboard
# Whole runs of 3750 steps: one epoch at batch 16, the recipe's whole schedule at its own batch (fewer steps).
timed profiler_bench 300 "$python" -m dist_mnist.bench --data-dir "$data_dir" --only profiler --profiler-run-steps 3750 \
    --output "$out/profiler_overhead.md" --json "$out/profiler_overhead.json"
cat "$out/profiler_overhead.md" 2>/dev/null
"$python" -m dist_mnist.gpucheck trace-kernels "$out/runs/profile" || status=1
# Where the profiled steps' GPU time goes, kernel by kernel (what to make faster next).
"$python" -m dist_mnist.gpucheck step-kernels "$out/runs/profile" --top 25
fi
# ---- end of profiler overhead (issue 10) ---------------------------------------------------------------------------

if want sweep; then
# --- issue 12: DDP comm hooks over nccl, PowerSGD with torch's default buckets (gloo needs one bucket); 2+ GPUs ---
if [ "$("$python" -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ]; then
    for hook in none bf16 powersgd; do
        NPROC=2 smoke "hook_$hook" 120 --ddp-comm-hook "$hook" --max-steps 60 --warmup-frac 0.05 --no-tensorboard
        # Only a run that finished has a summary to report (a skipped one would cost an import of torch for nothing).
        [ -f "$out/hook_$hook.wall" ] && "$python" -m dist_mnist.report --no-picture "$out/runs/hook_$hook" | tail -4
    done
else
    echo "SKIP comm hooks over nccl: they need 2 GPUs"
fi

# torch.compile's own CUDA graphs, the alternative to ours (issue 9 asks for whichever measures faster): compared in
# the table at the cuda recipe's batch. Before the recipe candidates, which only refine the recipe: no GPU run so far
# had budget left for it when it came last.
smoke compile 180 --compile --compile-mode reduce-overhead --max-steps 240 --no-tensorboard

# --- issue 9: CUDA recipe candidates, each stopped at 99.0% (time to 99% from the first step, evaluations in) ---
# The recipe's rivals (the default run measures the recipe itself): batch 256 (docs/benchmarks.md, "The cuda
# recipe's steps to 99.0%"), the recipe as the H200 runs had it (evaluating every 20 steps, a checkpoint every 200:
# "Evaluations and checkpoints on the GPU"), the recipe in NCHW, which the GPU has not run since conv1 runs in
# NHWC too ("The step's layout and order"), and the recipe with the warm-up it had before, 0.2 of the steps (now
# 0.4 epochs: 0.1 at the recipe's 4 epochs; "The cuda recipe's warm-up").
candidates=(
    "b256_e3 --batch-size 256 --lr 5.6e-3 --epochs 3 --eval-every 40"
    "b512_ev20_ckpt200 --eval-every 20 --checkpoint-every 200"
    "b512_nchw --channels-last off"
    "b512_w02 --warmup-frac 0.2"
)
for candidate in "${candidates[@]}"; do
    read -r -a words <<<"$candidate"
    smoke "sweep_${words[0]}" 60 "${words[@]:1}" --stop-at-accuracy 0.99 --no-tensorboard
done

fi

if want issue9; then
# --- issue 9: the done-when table ---
echo
"$python" -m dist_mnist.gpucheck table "$out" ${classic_main:+--classic-given} || status=1

fi

# Everything but checkpoints, memory snapshots and the caches, in one file (traces included: a few MB): the check's
# whole result.
if tar -czf "$bundle.part" -C "$out" --exclude='*.pt' --exclude='*.pickle' --exclude="$(basename "$bundle")*" \
        --exclude=./cache . &&
        mv "$bundle.part" "$bundle"; then
    echo "bundle: $bundle ($(du -h "$bundle" | cut -f1))"
else
    echo "FAIL bundle: could not write $bundle"; status=1
fi
exit $status
