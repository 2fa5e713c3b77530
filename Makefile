VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.edgedistill-setup

.PHONY: setup browser demo test test-all clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt scripts/install_llama_cpp.sh
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
	bash scripts/install_llama_cpp.sh $(PY)
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	touch $@

# headless Chromium for the chat-page test (idempotent)
browser:
	bash scripts/install_browser.sh

demo: setup
	$(VENV)/bin/edgedistill build --out out/default
	@echo
	@echo "Serve it:  $(VENV)/bin/edgedistill serve out/default   (OpenAI API on http://127.0.0.1:8000/v1)"

test: setup browser
	HF_HUB_OFFLINE=1 $(PY) -m pytest -m 'not slow' -q

test-all: setup browser
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

clean:
	rm -rf out .pytest_cache
