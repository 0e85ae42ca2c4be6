#!/usr/bin/env bash
# Everything a lent GPU machine should run, in one command (about 12 minutes on an H200; LLAMA3_SHAPES= skips step 3):
#   bash benchmarks/gpu.sh [OUT_DIR]
# 1. the CUDA tests (tests/test_gpu.py: device placement, half precision, device_map="auto");
# 2. the Llama-7B-shaped bfloat16 benchmark (benchmarks/bench.py --shapes llama7b), target mode
#    at 512 to 32k prompt tokens, forward mode and decompose_sequence where they fit
#    (MODES=target,target-tf32,target-bf16 adds TF32 and bfloat16-component runs);
# 3. the Llama-3-8B shape (vocabulary 128256, llama3 rope) in bfloat16 and in bitsandbytes NF4
#    at 256 + 32, 8192 + 8 and 32768 + 8, warm, target mode with the default precision (TF32
#    for these half-precision weights) and with float32 products, beside plain generation;
# 4. the default test suite on that machine (its CPU), in parallel where pytest-xdist is there.
# Where pydec or the project's transformers are missing, install them first (README, Install).
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
echo "== Llama-3-8B shape (128k vocabulary, llama3 rope), bfloat16 and bitsandbytes NF4, warm"
for shape in ${LLAMA3_SHAPES:-llama3-8b llama3-8b-4bit}; do
    timeout ${LLAMA3_TIMEOUT:-300} python3 benchmarks/bench.py --shapes "$shape" --prompts "${LLAMA3_PROMPTS:-256+32,8192+8,32768+8}" \
        --modes "${LLAMA3_MODES:-target,target-fp32}" --repeat 1 --warm 2>&1 | tee -a "$out/gpu_llama3.md"
done
echo "== test suite"
xdist=$(python3 -c "import xdist" 2>/dev/null && echo "-n 8")
timeout ${SUITE_TIMEOUT:-150} python3 -m pytest -q -p no:cacheprovider --continue-on-collection-errors $xdist 2>&1 | tail -40 | tee "$out/gpu_suite.log"
