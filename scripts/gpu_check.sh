#!/usr/bin/env bash
# The GPU check (issue 11): every CUDA path of the project, run once, with PASS/FAIL per check.
# On one H100 it is meant to finish in under 8 minutes (BUDGET, below; compilation included):
#
#   env          the GPU, its compute capability, the CPU flags, what --amp auto picks
#   equivalence  the training step on CUDA (fp32 with and without TF32, bf16, compiled with
#                CUDA graphs) against float64 on the CPU, from the same state (tests/test_equivalence.py)
#   train        50 iterations on the built-in data (a 50-image copy) with --amp none, bf16, fp16
#   sigterm      SIGTERM in the middle of a run, then --resume to the end
#   translate    test.py on CUDA with the weights just trained
#   evaluate     evaluate.py (FID/KID) on CUDA with the same weights
#   ddp          2-process DDP with torchrun (NCCL), if there are 2 GPUs
#   compiled     50 iterations with --compile for each precision, and with --compile reduce-overhead
#                (started first, beside the checks above, which check results, not speed)
#   bench        the speed table at 256x256, batch 1, 9 blocks: fp32, default (--amp auto), bf16+channels_last,
#                bf16+compile, bf16+cudagraphs, with peak memory (bench.py --rows), alone, last
#
#   bash scripts/gpu_check.sh                    # on the GPU machine; with OUT set, the log is also $OUT/gpu_check.log
#   DRY=1 bash scripts/gpu_check.sh              # the same sequence on the CPU at tiny sizes (tests/test_gpu_check.py)
#   ONLY="bench compiled" bash scripts/gpu_check.sh   # some of the groups above only (env always runs)
#
# Exit status 0 only if every check that ran passed and none was cut off by the time budget.
set -u
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python}
DRY=${DRY:-0}
if [ "$DRY" = 1 ]; then
    # CPU, tiny: 32x32, 1 block, 4 images a domain; fp32 only (bf16 is emulated, slow, on CPUs without
    # avx512_bf16; fp16 needs a GPU); no compilation (minutes on a CPU). AMP: the precision of the
    # checks that are not about precision, fp32 here so that the CPU never chooses it (the tests run this)
    DEVICE=cpu SIZE=32 BLOCKS=1 N_TRAIN=4 N_TEST=2 LONG_EPOCHS=3 STOP_AFTER=4 WORKERS=1 PRECISIONS="none" AMP=none BUDGET=${BUDGET:-600}
    BENCH=(--img_size 32 --n_residual_blocks 1 --iters 1 --warmup 0 --amp none --rows default,channels_last)
else
    # 128x128 and 3 blocks for the trainings: small enough that the compiled runs fit the
    # budget; the speed table is at the paper's 256x256 with 9 blocks
    DEVICE=cuda SIZE=128 BLOCKS=3 N_TRAIN=50 N_TEST=8 LONG_EPOCHS=8 STOP_AFTER=10 WORKERS=2 PRECISIONS="none bf16 fp16" AMP=auto BUDGET=${BUDGET:-470}
    BENCH=(--img_size 256 --n_residual_blocks 9 --iters 20 --warmup 2 --amp auto
           --rows fp32,default,bf16+channels_last,bf16+compile,bf16+cudagraphs)
fi
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")
DATA=$WORK/data
MODELS=saved_models/synthetic_day2night
# every training run: its own folder, 1 epoch of N_TRAIN iterations; replay buffers of 4 images,
# so that stored fakes come back within the 50 iterations
TRAIN=(--dataset_name synthetic_day2night --data_root "$DATA" --img_height "$SIZE" --img_width "$SIZE"
       --n_residual_blocks "$BLOCKS" --n_epochs 1 --decay_epoch 0 --device "$DEVICE" --n_cpu "$WORKERS" --seed 0
       --pool_size 4 --log_interval 5 --sample_interval 25 --checkpoint_interval 0)
FAILED=()

want() { [ -z "${ONLY:-}" ] || [[ " $ONLY " == *" $1 "* ]]; }

left() { echo $((BUDGET - SECONDS)); }

check() {  # check NAME COMMAND...: run it, if there is time left; PASS or FAIL
    local name=$1 t0=$SECONDS
    shift
    if [ "$(left)" -le 5 ]; then
        echo "FAIL $name: not run, the ${BUDGET} s budget is spent (rerun with ONLY=...)"
        FAILED+=("$name")
        return 1
    fi
    echo "---- $name"
    "$@"
    verdict "$name" $? $((SECONDS - t0))
}

verdict() {  # verdict NAME EXIT_STATUS SECONDS
    if [ "$2" -eq 0 ]; then
        echo "PASS $1 ($3 s)"
    else
        echo "FAIL $1 (exit $2$([ "$2" -eq 124 ] || [ "$2" -eq 137 ] && echo ', out of time'), $3 s)"
        FAILED+=("$1")
    fi
    return "$2"
}

skip() { echo "SKIP $1: $2"; }

name() { [ "$1" = none ] && echo fp32 || echo "$1"; }  # a run's name for its --amp

py() { timeout -k 10 "$(left)" "$PY" "$@"; }

in_dir() { mkdir -p "$1" && cd "$1"; }

train() (  # train DIR FLAGS...: 1 epoch in $WORK/DIR; its last weights must be there
    name=$1 t0=$SECONDS
    shift
    in_dir "$WORK/$name" && py "$ROOT/cyclegan.py" "${TRAIN[@]}" "$@" && test -s "$MODELS/G_AB_1.pth"
    rc=$?
    echo $((SECONDS - t0)) >"$WORK/$name.seconds"
    exit $rc
)

declare -A PID

start() {  # start NAME FLAGS...: a training in the background, its output in $WORK/NAME.log
    local name=$1
    shift
    train "$name" "$@" >"$WORK/$name.log" 2>&1 &
    PID[$name]=$!
}

finish() {  # finish NAME...: wait for those trainings; PASS or FAIL each
    local name rc
    for name; do
        wait "${PID[$name]}"
        rc=$?
        echo "---- train $name (ran beside the checks started after it)"
        cat "$WORK/$name.log"
        verdict "train $name" $rc "$(cat "$WORK/$name.seconds" 2>/dev/null)"
    done
}

sigterm_resume() (  # SIGTERM once STOP_AFTER iterations are logged; then --resume to the end
    in_dir "$WORK/sigterm" || exit 1
    total=$((LONG_EPOCHS * N_TRAIN))
    # (timeout is the background job, and passes the signal on; --foreground: to the run only, not
    # again to its process group, since a second SIGTERM would make the run quit without saving;
    # -k 120: once timeout has passed our SIGTERM on, it KILLs the run that long after, and on a
    # loaded CPU finishing the batch, saving and exiting took over 10 s: exit 137, not 143)
    timeout --foreground -k 120 "$(left)" "$PY" "$ROOT/cyclegan.py" "${TRAIN[@]}" --n_epochs "$LONG_EPOCHS" --amp "$AMP" >run1.log 2>&1 &
    pid=$!
    until [ "$(cat "$MODELS/log.csv" 2>/dev/null | wc -l)" -gt "$STOP_AFTER" ] || ! kill -0 $pid 2>/dev/null; do
        sleep 0.1
    done
    kill -TERM $pid 2>/dev/null
    wait $pid
    rc=$?
    cat run1.log
    [ $rc -eq 143 ] || { echo "expected exit 143 (128 + SIGTERM) after the signal, got $rc"; exit 1; }
    grep -q "^saved $MODELS/last.pt at epoch" run1.log || { echo "the run did not stop and save after SIGTERM"; exit 1; }
    echo "interrupted after $(($(wc -l < "$MODELS/log.csv") - 1)) of $total iterations; resuming"
    py "$ROOT/cyclegan.py" --dataset_name synthetic_day2night --resume --device "$DEVICE" --amp "$AMP" || exit 1
    test -s "$MODELS/G_AB_$LONG_EPOCHS.pth" || { echo "no final weights $MODELS/G_AB_$LONG_EPOCHS.pth"; exit 1; }
    # each iteration logged once, in order, across the interruption
    rows=$(awk -F, 'NR > 1 { if ($3 != n) bad = 1; n++ } END { print (bad ? "out of order" : n) }' "$MODELS/log.csv")
    [ "$rows" = "$total" ] || { echo "log.csv: $rows iteration rows, expected $total in order"; exit 1; }
)

translate() {
    local out=$WORK/translated n
    py "$ROOT/test.py" --checkpoint "$WORK/fp32/$MODELS/G_AB_1.pth" --image_path "$DATA/testA" \
        --reference_dir "$DATA/testB" --output_dir "$out" --device "$DEVICE" --amp "$AMP" || return 1
    for f in "$DATA"/testA/*.png; do
        test -s "$out/${f##*/}" || { echo "no translation $out/${f##*/} of $f"; return 1; }
    done
}

evaluate() {
    py "$ROOT/evaluate.py" --checkpoint "$WORK/fp32/$MODELS/G_AB_1.pth" --dataset_name synthetic_day2night \
        --data_root "$DATA" --cache_dir "$WORK/fid-cache" --device "$DEVICE" --amp none
}

ddp() (
    in_dir "$WORK/ddp" && py -m torch.distributed.run --standalone --nproc_per_node=2 "$ROOT/cyclegan.py" "${TRAIN[@]}" --amp "$AMP" &&
        test -s "$MODELS/G_AB_1.pth"
)

main() {
    cd "$ROOT" || exit 1
    echo "gpu_check: $([ "$DRY" = 1 ] && echo 'DRY (CPU, tiny sizes)' || echo GPU), budget $BUDGET s, work in $WORK, $(date -u +%FT%TZ)"
    command -v nvidia-smi >/dev/null && nvidia-smi
    check env py -c "
import sys, torch, bench, utils
device = torch.device('$DEVICE')
print('torch', torch.__version__, '| CUDA', torch.version.cuda, '|', torch.cuda.device_count(), 'GPU(s)')
if device.type == 'cuda' and not torch.cuda.is_available():
    sys.exit('no CUDA device: run DRY=1 bash scripts/gpu_check.sh on a machine without one')
name, flags = utils.cpu_info()
print('CPU:', name, '| native bf16:', ' '.join(f for f in utils.NATIVE_BF16_FLAGS if f in flags) or 'none')
if device.type == 'cuda':
    p = torch.cuda.get_device_properties(device)
    print(f'GPU: {p.name}, compute capability {p.major}.{p.minor}, {p.total_memory / 2**30:.0f} GiB')
print('--amp auto picks here, on', device.type + ':', bench.precision_label('auto', device))
from synthetic import make_day2night
make_day2night('$DATA', n_train=$N_TRAIN, n_test=$N_TEST)
print('built-in data ($N_TRAIN training images a domain, $N_TEST test) in $DATA')" ||
        { echo "gpu_check: FAILED: env (nothing else can run)"; exit 1; }

    # The compiled trainings compile for minutes: they run beside the checks that follow (which
    # check results, not speed), and are collected before the speed table, which runs alone.
    local compiled=()
    if want compiled; then
        if [ "$DRY" = 1 ]; then
            skip "compiled trainings" "dry mode: compiling takes minutes on a CPU"
        else
            for p in $PRECISIONS; do compiled+=("$(name "$p")-compile"); start "$(name "$p")-compile" --amp "$p" --compile; done
            compiled+=(bf16-reduce-overhead)
            start bf16-reduce-overhead --amp bf16 --compile reduce-overhead
        fi
    fi
    # (pytest's options of tests/ left out: this needs no parallel workers; without a GPU only the CPU's fp32 runs)
    want equivalence && check equivalence py -m pytest -q -s -rs -o addopts= -p no:cacheprovider tests/test_equivalence.py
    if want train || want translate || want evaluate; then
        local runs=()
        for p in $PRECISIONS; do runs+=("$(name "$p")"); start "$(name "$p")" --amp "$p"; done
        finish "${runs[@]}"
        [ "$DRY" = 1 ] && skip "train bf16, fp16" "dry mode: fp16 needs a GPU, bf16 is emulated (slow) on CPUs without avx512_bf16"
    fi
    want sigterm && check "sigterm + resume" sigterm_resume
    want translate && check "test.py" translate
    if want evaluate; then
        if [ -f "$ROOT/evaluate.py" ]; then
            check "evaluate.py" evaluate
        elif [ "$DRY" = 1 ]; then
            skip "evaluate.py" "not in this tree yet"
        else
            check "evaluate.py" eval 'echo "evaluate.py is missing"; false'
        fi
    fi
    if want ddp; then
        local gpus=0
        [ "$DEVICE" = cuda ] && gpus=$("$PY" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null)
        if [ "${gpus:-0}" -ge 2 ]; then
            check "ddp (2 processes, NCCL)" ddp
        else
            skip "ddp" "${gpus:-0} GPU(s); 2-process DDP needs 2 (on the CPU, gloo DDP is tests/test_ddp.py's)"
        fi
    fi
    [ ${#compiled[@]} -gt 0 ] && finish "${compiled[@]}"
    want bench && check "speed table" py bench.py --device "$DEVICE" "${BENCH[@]}"

    echo "---- summary ($SECONDS s)"
    if [ ${#FAILED[@]} -eq 0 ]; then
        echo "gpu_check: all checks passed"
    else
        echo "gpu_check: FAILED: $(IFS=,; echo "${FAILED[*]}")"
        exit 1
    fi
}

trap '[ "${KEEP:-0}" = 1 ] && echo "kept $WORK" || rm -rf "$WORK"' EXIT
if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
    main 2>&1 | tee "$OUT/gpu_check.log"
    exit "${PIPESTATUS[0]}"
fi
main
