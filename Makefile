PYTHON ?= python3

.PHONY: install demo test

install:  ## torch first (CPU wheel: a bare `torch` would pull GBs of CUDA), then the project with its test tools
	$(PYTHON) -m pip install -q torch==2.13.0
	$(PYTHON) -m pip install -q -e ".[dev]"

demo: install  ## offline: train a jokes adapter on the tiny model and the bundled sample, reload it, print generations
	$(PYTHON) scripts/train_lora.py configs/demo.yaml

test:  ## the whole suite, on two workers (pytest-xdist; each test module stays on one, its fixtures made once)
	$(PYTHON) -m pytest -q -n 2 --dist loadscope
