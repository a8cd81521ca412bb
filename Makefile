# `make demo` and `make test` each do the set-up they need on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup dataset browser demo test test-fast lint format bench clean

setup: $(STAMP) dataset

$(STAMP): pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch/torchvision first, from the pinned pair (local wheels on the project machines)
	$(PY) -m pip install -q -c constraints.txt torch torchvision
	$(PY) -m pip install -q -c constraints.txt -e '.[dev,trt-rtx]'
	touch $@

dataset:
	@scripts/ensure_dataset.sh

browser:
	@scripts/ensure_browser.sh

demo: setup
	$(VENV)/bin/clamp-export run pipelines/fmnist_vit-w8a8-ort.yaml
	@echo "report: $(CURDIR)/out/fmnist_vit-w8a8-ort/report.html (report.md, report.json, manifest.json beside it)"

test: setup browser
	$(PY) -m pytest -q --durations=15 tests

test-fast: setup
	$(PY) -m pytest -q tests -m "not e2e"

lint: setup
	$(VENV)/bin/ruff check clamp_export tests benchmarks scripts
	$(VENV)/bin/ruff format --check clamp_export tests benchmarks scripts

format: setup
	$(VENV)/bin/ruff format clamp_export tests benchmarks scripts
	$(VENV)/bin/ruff check --fix clamp_export tests benchmarks scripts

bench: setup
	$(PY) benchmarks/latency_ort.py

clean:
	rm -rf out .pytest_cache
