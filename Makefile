# One setup path for humans and CI: a venv in .venv with vggnet installed editable.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
EXTRAS := export,quant,serve,tracking,tensorboard,interop,store,robustness

.PHONY: setup setup-core demo test lint lock clean postgres

setup: $(VENV)/.installed
setup-core: $(VENV)/.core

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# The demo needs only the core dependencies (torch, torchvision, numpy, ...): no export, serving or test tools.
$(VENV)/.core: pyproject.toml constraints.txt | $(VENV)/bin/python
	$(BIN)/pip install -c constraints.txt -e .
	touch $@

# Everything the tests use: every extra, and the dev group (PEP 735: pytest, ruff, playwright, ...).
# constraints.txt pins the tested versions (pyproject.toml only declares ranges); a change to either reinstalls.
$(VENV)/.installed: pyproject.toml constraints.txt | $(VENV)/bin/python
	$(BIN)/pip install -c constraints.txt -e '.[$(EXTRAS)]' --group dev
	touch $@ $(VENV)/.core

demo: setup-core
	$(BIN)/vggnet train --recipe demo --out runs/demo

test: setup
	$(BIN)/pytest -q

# A throwaway PostgreSQL for tests/test_store.py (scripts/postgres.sh; `scripts/postgres.sh stop` ends it).
postgres:
	@url=$$(scripts/postgres.sh start) && echo "PostgreSQL is up; for the store's tests:" \
		&& echo "export VGGNET_TEST_POSTGRES=$$url"

lint: setup
	$(BIN)/ruff check .

# Regenerate constraints.txt (every extra and the dev group, Linux x86-64, Python 3.11) with uv's resolver;
# versions already pinned there are kept where they still satisfy pyproject.toml.
lock: setup
	$(BIN)/uv pip compile pyproject.toml $(foreach e,$(subst $(comma), ,$(EXTRAS)),--extra $(e)) --group dev \
		-c constraints.in --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
		--custom-compile-command 'make lock' -o constraints.txt

comma := ,

clean:
	rm -rf $(VENV) build *.egg-info
