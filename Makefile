# Cortex developer commands. `make help` lists them; CI (.ci/run) calls `make lint test`.
.DEFAULT_GOAL := help
PYTHON ?= python3
export CARGO_TERM_COLOR := never

.PHONY: help
help: ## Show this help
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  %-10s %s\n", $$1, $$2}'

.PHONY: install
install: ## Build the Rust core in release mode and install Cortex (with dev tools) in place
	$(PYTHON) -m pip install --disable-pip-version-check -q -e ".[dev]"

.PHONY: model
model: install ## Fetch the default model (SmolLM2-135M-Instruct GGUF) into the Cortex cache
	$(PYTHON) -c "import cortex; print(cortex.default_model_path())"

.PHONY: test
test: model ## Build, then run every test: Rust (unit, oracle) and Python
	cargo test --release
	$(PYTHON) -m pytest

.PHONY: lint
lint: install ## rustfmt, clippy (-D warnings), ruff, mypy, stub check
	cargo fmt --check
	cargo clippy --all-targets -- -D warnings
	cargo clippy --lib --features python -- -D warnings
	$(PYTHON) -m ruff check python tests examples
	$(PYTHON) -m ruff format --check python tests examples
	$(PYTHON) -m mypy python/cortex
	$(PYTHON) -m mypy.stubtest cortex._core

.PHONY: fmt
fmt: ## Format Rust and Python sources
	cargo fmt
	$(PYTHON) -m ruff format python tests examples

.PHONY: bench
bench: install ## Speed of the default model, beside llama.cpp when llama-cpp-python is installed
	cortex bench
