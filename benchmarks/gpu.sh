#!/usr/bin/env bash
# Everything a lent GPU machine should run, in one command (about 7 minutes on an H200):
#   bash benchmarks/gpu.sh [OUT_DIR]
# 1. the CUDA tests (tests/test_gpu.py: device placement, half precision, device_map="auto");
# 2. the Llama-7B-shaped bfloat16 benchmark (benchmarks/bench.py --shapes llama7b), target mode
#    at 512 to 32k prompt tokens, forward mode and decompose_sequence where they fit
#    (MODES=target,target-tf32,target-bf16 adds TF32 and bfloat16-component runs);
# 3. the default test suite on that machine (its CPU), in parallel where pytest-xdist is there.
# Where pydec or the project's transformers are missing, install wheels first (README, GPU).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-.}}
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
echo "== CUDA tests"
timeout 120 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py 2>&1 | tee "$out/gpu_tests.log"
echo "== Llama-7B-shaped benchmark"
timeout ${BENCH_TIMEOUT:-240} python3 benchmarks/bench.py --shapes llama7b --prompts "${PROMPTS:-512,2048,8192,32768}" \
    --new "${NEW:-8}" --modes "${MODES:-target,forward,after}" --forward-max "${FORWARD_MAX:-512}" --repeat 1 2>&1 | tee "$out/gpu_bench.md"
echo "== test suite"
xdist=$(python3 -c "import xdist" 2>/dev/null && echo "-n 8")
timeout ${SUITE_TIMEOUT:-150} python3 -m pytest -q -p no:cacheprovider --continue-on-collection-errors $xdist 2>&1 | tail -40 | tee "$out/gpu_suite.log"
