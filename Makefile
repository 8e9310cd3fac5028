# Two commands for a fresh machine; each installs what it needs into .venv first.
#   make quickstart   tiny LLaMA + LoRA on the bundled data, dev accuracy before/after
#   make test         the test suite
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install browser quickstart test

$(VENV)/.installed: setup.py
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[cpu,test]"
	touch $@

install: $(VENV)/.installed

# The Gradio UI test drives Debian's chromium through playwright (no browser download).
browser:
	@command -v chromium >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	  || echo "chromium could not be installed: the browser test will be skipped"

quickstart: install
	$(PY) -m paddlellm.quickstart

test: install browser
	$(PY) -m pytest -q tests
