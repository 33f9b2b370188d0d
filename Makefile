# One setup path for humans and CI: a venv in .venv with vggnet installed editable.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
# edge (ExecuTorch + the LiteRT interpreter: about +340 MB on a venv of 6.5 GB, mostly torch) is in, so CI runs the
# .pte / .tflite tests instead of skipping them; the LiteRT converter is not (see edge-convert below).
EXTRAS := export,quant,serve,tracking,tensorboard,interop,store,robustness,edge,ray,shards,openvino
# make lock also pins edge-convert (the LiteRT converter's resolvable dependencies), which setup does not install.
LOCK_EXTRAS := $(EXTRAS),edge-convert
# The LiteRT converter itself, installed with --no-deps: litert-converter 0.5 pins xdsl==0.28.0, which needs
# typing-extensions<4.13 against the >=4.16 of pydantic (serve) and >=4.14 of cattrs (executorch), so pip and uv
# refuse it with constraints.txt. A vggnet conversion never imports xdsl (see pyproject.toml's edge-convert extra).
LITERT_CONVERTER := litert-torch==0.10.0 litert-converter==0.5.0

.PHONY: setup setup-core edge-convert demo test lint lock clean postgres

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

# vggnet export --format tflite|tflite-int8 (about +700 MB: jaxlib, litert-converter): the edge-convert extra from
# constraints.txt, then the converter without its dependency metadata (torch stays the pinned one).
edge-convert: setup
	$(BIN)/pip install -c constraints.txt -e '.[$(EXTRAS),edge-convert]'
	$(BIN)/pip install --no-deps $(LITERT_CONVERTER)

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
	$(BIN)/uv pip compile pyproject.toml $(foreach e,$(subst $(comma), ,$(LOCK_EXTRAS)),--extra $(e)) --group dev \
		-c constraints.in --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
		--custom-compile-command 'make lock' -o constraints.txt

comma := ,

clean:
	rm -rf $(VENV) build *.egg-info
