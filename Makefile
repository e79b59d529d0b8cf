# Two commands do all the set-up on a fresh machine:
#   make demo   create .venv, install, build the tiny model, run the demo job on samples/, write its report
#   make test   create .venv, install, run the whole suite (about 20 minutes on 2 cores)
# After each edit, `make test-fast`: the suite without the tests marked slow, the ones that start a process
# (Ray, a storage server, a browser, `scriptorium` itself), in about a minute; `make test` before a commit.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export RAY_USAGE_STATS_ENABLED := 0
export RAY_AUTH_MODE := disabled
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test test-fast install tesseract system-deps clean

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

demo: install tesseract models/tiny-idefics2/config.json
	$(BIN)/scriptorium run --job jobs/demo.toml  # prints the run summary; again later: scriptorium summary out/demo
	$(BIN)/scriptorium report out/demo --html out/demo-report.html
	@echo "review the results: file://$(CURDIR)/out/demo-report.html"

# Debian packages: Tesseract (the CPU OCR engine: the demo's scans, some tests), Chromium (tests open
# the HTML report in a real browser) and Prometheus (tests scrape a Ray cluster's metrics with it). Installed when missing and apt-get is usable (root); otherwise the
# tests that need them skip, saying why, and the demo's scanned pages are error rows naming the fix.
define apt_install
	@command -v $(1) >/dev/null || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(2) >/dev/null; } || \
	  echo "note: $(1) not installed (it needs root and apt-get: apt-get install $(2)): $(3)"
endef

tesseract:
	$(call apt_install,tesseract,tesseract-ocr tesseract-ocr-eng,tests of it skip and the demo's scans become error rows)

system-deps: tesseract
	$(call apt_install,chromium,chromium,the tests of the HTML report in a browser skip)
	$(call apt_install,prometheus,prometheus,the tests of the metrics against a Prometheus server skip)

test: install system-deps
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup

test-fast: install
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup -m "not slow"

clean:
	rm -rf $(VENV) models out
