# Set-up and checks. `make demo` and `make test` each create .venv and install what they need.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.ftmoe-installed
# jieba and torch.compile write caches into TMPDIR: keep them inside the repo (git-ignored)
export TMPDIR := $(CURDIR)/.tmp

.PHONY: demo test venv clean

venv: $(STAMP)

# A machine whose python already has torch (e.g. a GPU image) keeps it: the venv sees the
# system site-packages. Otherwise install the CPU build, pinned (an unpinned torch pulls CUDA).
$(STAMP): pyproject.toml
	@mkdir -p $(TMPDIR)
	@if [ ! -x $(BIN)/python ]; then \
	  if $(PY) -c "import torch" >/dev/null 2>&1; then \
	    echo "torch found in $(PY): creating $(VENV) with system site-packages"; \
	    $(PY) -m venv --system-site-packages $(VENV); \
	  else \
	    $(PY) -m venv $(VENV); \
	  fi; \
	fi
	@if ! $(BIN)/python -c "import torch" >/dev/null 2>&1; then \
	  echo "installing CPU torch==2.13.0"; \
	  $(BIN)/python -m pip install -q torch==2.13.0; \
	fi
	$(BIN)/python -m pip install -q -e '.[test]'
	@touch $@

demo: $(STAMP)
	$(BIN)/ftmoe demo --workdir demo_out

# the suite in TEST_WORKERS processes (pytest-xdist): 7.5 instead of 11 minutes on a 2-core box
TEST_WORKERS ?= 2

test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) tests

clean:
	rm -rf $(VENV) demo_out .tmp .pytest_cache
