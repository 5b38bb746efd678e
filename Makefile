PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

# Linux takes MLX's CPU back end and the CPU build of torch (the test reference); macOS takes Metal from plain mlx.
ifeq ($(shell uname -s),Darwin)
EXTRAS := torch,test
TORCH :=
else
EXTRAS := cpu,test
TORCH := torch==2.13.0
endif

.PHONY: install test demo

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[$(EXTRAS)]" $(TORCH)
	touch $@

# pytest exits 5 when it collected no test; that is not a failure of the suite.
test: install
	$(PY) -m pytest -q; rc=$$?; if [ $$rc -eq 5 ]; then rc=0; fi; exit $$rc

demo: install
	$(PY) -m m2bert_hf_mlx demo
