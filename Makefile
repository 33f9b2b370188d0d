# One setup path for humans and CI: a venv in .venv with vggnet installed editable.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test lint clean

setup: $(VENV)/.installed

# constraints.txt pins the tested versions (pyproject.toml only declares ranges); a change to either reinstalls.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -c constraints.txt -e '.[dev,export,quant,serve,tracking]'
	touch $@

demo: setup
	$(BIN)/vggnet train --recipe demo --out runs/demo

test: setup
	$(BIN)/pytest -q

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info
