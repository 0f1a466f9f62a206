# The two commands: `make quickstart` and `make test`. Both create and reuse .venv/.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
OUT    ?= runs/quickstart
RUNS   ?= prunevision-runs
DATA   ?=

.PHONY: quickstart train-one test lint smoke venv clean

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check uv
	# uv resolves torch and torchvision from the registry as one matching pair (see ../shared/STACK.md)
	$(VENV)/bin/uv pip install --quiet --python $(PY) -r requirements.txt -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

# The main job: a real small sweep on CIFAR-10 (8 trials), recorded in ./mlflow.db.
quickstart: $(STAMP)
	$(PY) -m prunevision sweep run sweeps/configs/quickstart.yaml --storage $(RUNS) --set name=quickstart-$$(date +%Y%m%d-%H%M%S) $(if $(DATA),--set data.root=$(DATA))

# One gated model, pruned, measured and exported (the quickstart before sweeps).
train-one: $(STAMP)
	$(PY) -m prunevision train configs/quickstart.yaml --out $(OUT) $(if $(DATA),--set data.root=$(DATA))

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check .

smoke: $(STAMP)
	$(PY) -m prunevision train --smoke-test --out runs/smoke

clean:
	rm -rf runs .pytest_cache
