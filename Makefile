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

.PHONY: install test test-lowest lint demo

# The package is installed as a wheel, not in editable mode: setuptools warns on every editable install of a layout
# that maps conversion/, metal/ and model_cards/ into m2bert_hf_mlx. Any change to the package's files installs it
# again (a few seconds), so the tests always run the code of the working tree.
PACKAGE_FILES := $(filter-out %__pycache__ %.pyc,$(wildcard m2bert_hf_mlx/* m2bert_hf_mlx/*/* conversion/* metal/* model_cards/*))

install: $(VENV)/.installed

$(VENV)/.dependencies: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q ".[$(EXTRAS),reference]" $(TORCH)
	touch $@

$(VENV)/.installed: $(VENV)/.dependencies $(PACKAGE_FILES)
	$(PY) -m pip install -q --no-deps --force-reinstall .
	rm -rf build
	touch $@

$(LOWEST)/.dependencies: pyproject.toml Makefile .ci/lowest_requirements.py
	$(PYTHON) -m venv $(LOWEST)
	$(LOWEST)/bin/python -m pip install -q --upgrade pip
	$(LOWEST)/bin/python .ci/lowest_requirements.py $(subst $(comma), ,$(EXTRAS)) > $(LOWEST)/requirements.txt
	$(LOWEST)/bin/python -m pip install -q -r $(LOWEST)/requirements.txt
	touch $@

$(LOWEST)/.installed: $(LOWEST)/.dependencies $(PACKAGE_FILES)
	$(LOWEST)/bin/python -m pip install -q --no-deps --force-reinstall .
	rm -rf build
	touch $@

comma := ,

# pytest exits 5 when it collected no test; that is not a failure of the suite.
test: install
	$(PY) -m pytest -q; rc=$$?; if [ $$rc -eq 5 ]; then rc=0; fi; exit $$rc

# The same suite without torch and at every declared minimum version; tests that need torch skip themselves.
test-lowest: $(LOWEST)/.installed
	$(LOWEST)/bin/python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch') is not None)"
	$(LOWEST)/bin/python -m pytest -q; rc=$$?; if [ $$rc -eq 5 ]; then rc=0; fi; exit $$rc

# ruff's lint and format rules (pyproject.toml), and a wheel build without setuptools' warnings.
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	log=$$(mktemp) && $(PY) -m pip wheel -q --no-deps -w build/wheel . > $$log 2>&1; rc=$$?; rm -rf build; \
	if grep -q "Setuptools.*Warning\|BuildBackendWarning" $$log; then cat $$log; rc=1; fi; rm -f $$log; exit $$rc

demo: install
	$(VENV)/bin/m2bert-mlx demo
