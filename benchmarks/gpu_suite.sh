#!/usr/bin/env bash
# The training tests on a CUDA GPU and, at the same time, with the GPU hidden, so that a test failing only on the
# GPU stands out (docs/distributed.md, "The test suite on a GPU"). Run from the repository root on a machine with a
# GPU and finegrain's test dependencies: `benchmarks/gpu_suite.sh [OUT_DIR] [SECONDS]`. SIGINT at the end of the time
# lets pytest print its summary of what ran; OUT_DIR gets gpu.log and cpu.log.
set -u
out=${1:-gpu_suite}
limit=${2:-250}
mkdir -p "$out"
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
files="tests/test_train.py tests/test_recipe_plan.py tests/test_probe.py tests/test_map_task.py tests/test_replan.py
       tests/test_api.py tests/test_export.py tests/test_ddp.py tests/test_keep_epoch.py tests/test_cutmix.py
       tests/test_consistency.py tests/test_contract.py"
args="-q -p no:cacheprovider --tb=short -rfE -W ignore"
# shellcheck disable=SC2086  # the lists split on purpose
(CUDA_VISIBLE_DEVICES= timeout -s INT "$limit" python3 -m pytest $args -n 6 --basetemp=/tmp/gpu_suite_cpu $files \
    >"$out/cpu.log" 2>&1) &
# shellcheck disable=SC2086
timeout -s INT "$limit" python3 -m pytest $args -n 9 --basetemp=/tmp/gpu_suite_gpu $files >"$out/gpu.log" 2>&1
wait
for side in gpu cpu; do
    echo "---- $side"
    grep -E "^(FAILED|ERROR)|passed|failed" "$out/$side.log" | tail -40
done
