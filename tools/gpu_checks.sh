#!/usr/bin/env bash
# GPU checks on one CUDA machine: the `gpu` tests, a short tiny SAPO run with the trainer on the GPU, the
# train-step / log-prob memory benchmark, and the engine's unit tests with CUDA present (the CUDA side of its
# `torch.cuda.is_available()` branches), and the single-process e2e tests. Logs go to $OUT (default gpu_checks/).
#
#   bash tools/gpu_checks.sh            # megatron_sapo and its requirements installed
#
# Wheels in .whl/ (e.g. fetched with `pip download` for a machine without network) are installed first into
# /tmp/site. Multi-rank tests (tests/dist) are left out: their ranks would share one GPU.
set -uo pipefail
OUT=${OUT:-gpu_checks}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/machine.txt"
python3 -c "import torch, megatron.core, transformers; print('torch', torch.__version__, 'megatron-core', megatron.core.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())" | tee -a "$OUT/machine.txt"

step() {  # name, time limit (s), command...
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "$name rc=$rc $((SECONDS - t0))s" | tee -a "$OUT/summary.txt"
    tail -n 25 "$OUT/$name.log"
}
step gpu_tests "${GPU_LIMIT:-200}" python3 -m pytest -q -rs -p no:cacheprovider tests/gpu
step tiny_train "${TINY_LIMIT:-110}" python3 -m megatron_sapo.cli train examples/tiny_moe_cpu.yaml train.steps=12 checkpoint.every=6 \
    run.dir=/tmp/gpu_tiny
cp /tmp/gpu_tiny/metrics.jsonl "$OUT/tiny_metrics.jsonl" 2>/dev/null
if [ "${BENCH:-1}" != 0 ]; then  # BENCH=0 skips the benchmark (its numbers are in the README) to save device time
    step bench_train_step 120 python3 tools/bench_train_step.py --hidden 1024 --layers 4 --vocab 32768 --seq 512 \
        --seqs 16 --mbs 4 --mem-tokens 8192 --mem-vocab 151936
fi
step unit_tests "${UNIT_LIMIT:-150}" python3 -m pytest -q -rf -p no:cacheprovider --timeout 60 \
    tests/unit/test_megatron_engine.py tests/unit/test_megatron_logprobs.py tests/unit/test_router_engine.py \
    tests/unit/test_router_recompute.py tests/unit/test_hf_checkpoint.py tests/unit/test_weight_stream.py \
    tests/unit/test_packing.py
# single-process end-to-end paths (convert, eval, trainer, routing replay, tiny run); multi-rank ones excluded
step e2e_tests "${E2E_LIMIT:-200}" python3 -m pytest -q -rf -p no:cacheprovider --timeout 90 -k "not two_rank" \
    tests/e2e/test_convert.py tests/e2e/test_eval.py tests/e2e/test_trainer_inprocess.py \
    tests/e2e/test_router_trainer.py tests/e2e/test_tiny_run.py
cat "$OUT/summary.txt"
