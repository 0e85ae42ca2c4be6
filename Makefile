# The two commands of the README:
#   make demo   decompose a SmolLM2-135M-Instruct generation and print the per-token tables
#   make test   lint, type-check, build the docs site, and run the tests on transformers 5.x and 4.x
#   make faithfulness   the faithfulness evaluation (docs/faithfulness.md says what it runs)
PROMPT ?= What is the capital of France?
TF5 ?= 5.24.0
TF4 ?= 4.57.6
PYTEST_ARGS ?=

.PHONY: demo test lint venvs browser docs tables faithfulness

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
	.venv/bin/ruff check src tests benchmarks scripts
	.venv/bin/ruff format --check src tests benchmarks scripts
	.venv/bin/mypy

browser:
	scripts/install_browser.sh

# the docs site (docs/*.md and the API reference from the docstrings), warnings as errors
docs: venvs
	NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs build --strict --quiet -f scripts/mkdocs.yml

# every table of figures in README.md and docs/, rendered again from its result file
tables: venvs
	.venv/bin/python scripts/docs_tables.py

# the second transformers version leaves out the tests marked `once` (LLAMA_ATTRIB_SECOND_RUN)
test: lint browser docs
	.venv/bin/python -m pytest $(PYTEST_ARGS)
	LLAMA_ATTRIB_SECOND_RUN=1 .venv-tf4/bin/python -m pytest $(PYTEST_ARGS)
