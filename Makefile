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
test: model stubtest ## Build, then run every test: stub check, Rust (unit, oracle) and Python
	cargo test --release
	$(PYTHON) -m pytest

.PHONY: deps
deps: ## Install Cortex's dependencies and dev tools, as pyproject.toml lists them, without building it
	$(PYTHON) -c "import sys, tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
	  sys.stdout.write('\n'.join(p['dependencies'] + p['optional-dependencies']['dev']))" \
	  | $(PYTHON) -m pip install --disable-pip-version-check -q -r /dev/stdin

.PHONY: stubtest
stubtest: install ## Check python/cortex/_core.pyi against the built extension
	$(PYTHON) -m mypy.stubtest cortex._core

.PHONY: lint
lint: deps ## rustfmt, clippy (-D warnings, pedantic with the allow-list in Cargo.toml), ruff, mypy: no release build
	cargo fmt --check
	cargo clippy --all-targets -- -D warnings
	cargo clippy --lib --features python -- -D warnings
	$(PYTHON) -m ruff check python tests examples
	$(PYTHON) -m ruff format --check python tests examples
	$(PYTHON) -m mypy python/cortex

.PHONY: lint-cuda
lint-cuda: ## Compile and lint the CUDA backend without a GPU or toolkit (our kernels compile for real)
	scripts/cuda_env.sh --check cargo clippy --lib --features cuda -- -D warnings
	scripts/cuda_env.sh --check cargo clippy --lib --features cuda,python -- -D warnings

.PHONY: wheel-cuda
wheel-cuda: ## Build the GPU wheel into target/wheels (CUDA 13 from PyPI; CUDA_COMPUTE_CAP=90 for H100/H200)
	$(PYTHON) -m pip install --disable-pip-version-check -q "maturin>=1.7,<2"
	scripts/cuda_env.sh $(PYTHON) -m maturin build --release --features cuda,python --auditwheel skip

.PHONY: fmt
fmt: ## Format Rust and Python sources
	cargo fmt
	$(PYTHON) -m ruff format python tests examples

.PHONY: bench
bench: install ## Speed of the default model, beside llama.cpp when llama-cpp-python is installed
	cortex bench
