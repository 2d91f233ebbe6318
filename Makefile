# The README's commands. `make demo` and `make test` both install the kit's pinned environment into .venv first,
# and only when pyproject.toml or constraints.txt changed since the last install.
SHELL  := /bin/bash
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-nbs test-py docs outputs lab ui sync-check browser

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/coronary-mlops demo

# 1-2: the notebooks are the source, so cleaning and exporting them must change nothing that is committed
sync-check: install
	@tools/unchanged.sh $(BIN)/nbdev-clean
	@tools/unchanged.sh $(BIN)/nbdev-export

test-nbs: install
	$(BIN)/nbdev-test --n-workers 2

# The browser tests use Debian's chromium (Playwright's browser download fails on these machines): installed here when
# it is missing and root may use apt; without it they are skipped, except under CI, where that is a failure.
browser:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  { apt-get install -y -q chromium >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; }; }; } || \
	  echo "chromium is not installed (apt-get install chromium): the browser tests will be skipped"

test-py: install browser
	$(BIN)/python -m pytest tests --durations=15

# the docs build (--check: README.md current, every link and anchor resolves) runs once, inside pytest (tests/conftest.py)
test: sync-check test-nbs test-py

# The site: nbdev-docs (Quarto) where quarto is on PATH, else MkDocs; both show the notebooks' committed outputs
docs: install
	$(BIN)/python tools/build_docs.py

# Re-execute every notebook and keep its outputs (nbdev's convention: the docs show what is committed), then clean
outputs: install
	$(BIN)/nbdev-test --n-workers 2 --save
	$(BIN)/nbdev-clean

# as root (a container) Jupyter refuses to start without --allow-root
lab: install
	$(BIN)/jupyter lab --notebook-dir=nbs $(if $(filter 0,$(shell id -u)),--allow-root)

ui: install
	$(BIN)/coronary-mlops ui
