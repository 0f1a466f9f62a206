# The two commands: `make quickstart` and `make test`. Both create and reuse .venv/.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
OUT    ?= runs/quickstart
DATA   ?=

.PHONY: quickstart test lint smoke venv clean

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check uv
	# uv resolves torch and torchvision from the registry as one matching pair (see ../shared/STACK.md)
	$(VENV)/bin/uv pip install --quiet --python $(PY) -r requirements.txt -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

quickstart: $(STAMP)
	$(PY) -m prunevision train configs/quickstart.yaml --out $(OUT) $(if $(DATA),--set data.root=$(DATA))

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check .

smoke: $(STAMP)
	$(PY) -m prunevision train --smoke-test --out runs/smoke

clean:
	rm -rf runs .pytest_cache
