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
lint: ## rustfmt, clippy (-D warnings), ruff
	cargo fmt --check
	cargo clippy --all-targets -- -D warnings
	$(PYTHON) -m ruff check python tests examples benches
	$(PYTHON) -m ruff format --check python tests examples benches

.PHONY: stubtest
stubtest: install ## Check python/cortex/_core.pyi against the built module
	$(PYTHON) -m mypy.stubtest cortex._core --allowlist stubtest-allowlist.txt

.PHONY: fmt
fmt: ## Format Rust and Python sources
	cargo fmt
	$(PYTHON) -m ruff format python tests examples benches

.PHONY: bench
bench: install ## Speed of the default model, beside llama.cpp when llama-cpp-python is installed
	cortex bench
