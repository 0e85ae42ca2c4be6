# The two commands of the README:
#   make demo   decompose a SmolLM2-135M-Instruct generation and print the per-token tables
#   make test   lint, type-check, and run the tests on transformers 5.x and 4.x
#   make faithfulness   the faithfulness evaluation (docs/faithfulness.md says what it runs and how long it took)
PROMPT ?= What is the capital of France?
TF5 ?= 5.24.0
TF4 ?= 4.57.6
PYTEST_ARGS ?=

.PHONY: demo test lint venvs browser faithfulness

demo:
	scripts/bootstrap.sh .venv $(TF5)
	.venv/bin/llama-attrib --chat --max-new-tokens 8 --top 8 "$(PROMPT)"

faithfulness:
	scripts/bootstrap.sh .venv $(TF5)
	.venv/bin/python -m llama_attrib.evaluation --out faithfulness.json

venvs:
	scripts/bootstrap.sh .venv $(TF5)
	scripts/bootstrap.sh .venv-tf4 $(TF4)

lint: venvs
	.venv/bin/ruff check src tests benchmarks
	.venv/bin/ruff format --check src tests benchmarks
	.venv/bin/mypy

browser:
	scripts/install_browser.sh

test: lint browser
	.venv/bin/python -m pytest $(PYTEST_ARGS)
	.venv-tf4/bin/python -m pytest $(PYTEST_ARGS)
