# Two commands do all the set-up on a fresh machine:
#   make demo   create .venv, install, build the tiny model, run the demo job on samples/, print a summary
#   make test   create .venv, install, run the tests
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export RAY_USAGE_STATS_ENABLED := 0
export RAY_AUTH_MODE := disabled
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test install system-deps clean

$(BIN)/scriptorium: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch 2.13.0 first: a CPU build is on this machine's disk; a bare `torch` would pull GBs of CUDA.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

install: $(BIN)/scriptorium

models/tiny-idefics2/config.json: | $(BIN)/scriptorium
	$(BIN)/scriptorium tiny-model models/tiny-idefics2

demo: install models/tiny-idefics2/config.json
	$(BIN)/scriptorium run --job jobs/demo.toml  # prints the run summary; again later: scriptorium summary out/demo

# Debian packages some tests use: Chromium (the HTML report in a real browser) and Tesseract (the CPU OCR
# engine). Installed when missing and apt-get is usable (root); otherwise those tests skip, saying why.
system-deps:
	@command -v chromium >/dev/null && command -v tesseract >/dev/null || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	      chromium tesseract-ocr tesseract-ocr-eng >/dev/null; } || \
	  echo "note: chromium/tesseract not installed; their tests will be skipped"

test: install system-deps
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) models out
