# Fresh machine: `make demo` runs the main job on the default model; `make test` runs every test.
# Both set up .venv/ first (Python 3.10+; on Linux mlx[cpu], Debian's OpenBLAS when apt is usable).

PY ?= python3
VENV := .venv
QUESTION ?= What is the capital of France?
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-python test-typescript test-go bench fuzz soak

setup: $(STAMP)

$(STAMP): pyproject.toml
	@if [ "$$(uname -s)" = Linux ] && [ ! -e /usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 ] && [ ! -e /usr/lib/aarch64-linux-gnu/openblas-pthread/libblas.so.3 ] && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		echo "installing Debian's OpenBLAS (30x faster float32 matmuls on CPU)"; \
		(apt-get install -y -q libopenblas0-pthread >/dev/null 2>&1 || (apt-get update -q >/dev/null && apt-get install -y -q libopenblas0-pthread >/dev/null)) || echo "no OpenBLAS: mlx will use its bundled reference BLAS"; \
	fi
	test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	@if [ "$$(uname -s)" = Darwin ]; then extras="test,vlm"; else extras="cpu,test,vlm"; fi; \
		$(VENV)/bin/python -m pip install -q -e ".[$$extras]"
	touch $(STAMP)

# The main job goes through the TypeScript reference client (a Node.js host, as the sidecar's users are).
demo: setup
	cd clients/typescript && npm ci --no-audit --no-fund --silent && npm run --silent example:chat -- --model default "$(QUESTION)"

test: setup
	$(MAKE) test-python test-typescript test-go

test-python: setup
	$(VENV)/bin/python -m pytest -q

test-typescript: setup
	cd clients/typescript && npm ci --no-audit --no-fund && npm test

test-go: setup
	cd clients/go && go vet ./... && go test -race ./... && go test -run='^$$' -fuzz=FuzzReadFrame -fuzztime=10s .

bench: setup
	$(VENV)/bin/python bench/run.py --json bench/results/latest.json

# Longer hunts than the test suite's: frame readers and params with 20,000 examples each, a 10,000-request soak.
fuzz: setup
	MLX_SIDECAR_FUZZ_EXAMPLES=20000 $(VENV)/bin/python -m pytest -q tests/test_framing_fuzz.py tests/test_params_fuzz.py
	cd clients/go && go test -run='^$$' -fuzz=FuzzReadFrame -fuzztime=5m .

soak: setup
	$(VENV)/bin/python bench/soak.py --requests 10000 --json bench/results/soak.json
