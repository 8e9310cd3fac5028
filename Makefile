# Two commands for a fresh machine; each installs what it needs into .venv first.
#   make quickstart   tiny LLaMA + LoRA on the bundled data, dev accuracy before/after
#   make test         the test suite
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install quickstart test

$(VENV)/.installed: setup.py
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[cpu,test]"
	touch $@

install: $(VENV)/.installed

quickstart: install
	$(PY) -m paddlellm.quickstart

test: install
	$(PY) -m pytest -q tests
