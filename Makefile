PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The torch-free install users get, at the lowest versions pyproject.toml declares.
LOWEST := .venv-lowest

# torch is the tests' reference only (a CPU build on Linux); the package never imports it.
TORCH := torch==2.13.0
ifeq ($(shell uname -s),Darwin)
EXTRAS := test
else
EXTRAS := cpu,test
endif

.PHONY: install test test-lowest demo

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[$(EXTRAS)]" $(TORCH)
	touch $@

$(LOWEST)/.installed: pyproject.toml Makefile .ci/lowest_requirements.py
	$(PYTHON) -m venv $(LOWEST)
	$(LOWEST)/bin/python -m pip install -q --upgrade pip
	$(LOWEST)/bin/python .ci/lowest_requirements.py $(subst $(comma), ,$(EXTRAS)) > $(LOWEST)/requirements.txt
	$(LOWEST)/bin/python -m pip install -q -r $(LOWEST)/requirements.txt
	$(LOWEST)/bin/python -m pip install -q --no-deps -e .
	touch $@

comma := ,

# pytest exits 5 when it collected no test; that is not a failure of the suite.
test: install
	$(PY) -m pytest -q; rc=$$?; if [ $$rc -eq 5 ]; then rc=0; fi; exit $$rc

# The same suite without torch and at every declared minimum version; tests that need torch skip themselves.
test-lowest: $(LOWEST)/.installed
	$(LOWEST)/bin/python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch') is not None)"
	$(LOWEST)/bin/python -m pytest -q; rc=$$?; if [ $$rc -eq 5 ]; then rc=0; fi; exit $$rc

demo: install
	$(PY) -m m2bert_hf_mlx demo
