# clipviz — `make demo` runs the main job, `make test` the checks (installing what they need),
# `make docs` the documentation site.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install demo test test-compat docs lint format clean

install: $(VENV)/.installed wordnet chromium

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

# WordNet 3.0 for ConVis (`clipviz concepts`): when it is missing, install Debian's packages if
# we are root with apt-get; otherwise print how to get it. Never fails the install.
WORDNET_DIRS ?= $(WNSEARCHDIR) $(WNHOME)/dict /usr/share/wordnet /usr/local/WordNet-3.0/dict
NLTK_DIRS ?= $(NLTK_DATA) $(HOME)/nltk_data $(VENV)/nltk_data $(VENV)/share/nltk_data \
	/usr/share/nltk_data /usr/local/share/nltk_data /usr/lib/nltk_data /usr/local/lib/nltk_data

.PHONY: wordnet
wordnet:
	@found() { for d in $(WORDNET_DIRS); do [ -f "$$d/data.noun" ] && return 0; done; \
	  for d in $(NLTK_DIRS); do [ -e "$$d/corpora/wordnet" ] || [ -e "$$d/corpora/wordnet.zip" ] && return 0; done; \
	  return 1; }; \
	found && exit 0; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing WordNet 3.0 for clipviz concepts (apt-get: wordnet-base wordnet-sense-index)"; \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	    --no-install-recommends wordnet-base wordnet-sense-index; } >/dev/null 2>&1; \
	fi; \
	found || echo "note: WordNet 3.0 not found; clipviz concepts needs it:" \
	  "sudo apt install wordnet-base wordnet-sense-index (or: python -m nltk.downloader wordnet)"

# Debian's chromium for the report's browser test (playwright drives it; no browser download):
# installed with apt-get when missing and we are root; otherwise a note. Never fails the install.
.PHONY: chromium
chromium:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 && exit 0; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing chromium for the report's browser test (apt-get: chromium)"; \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	    --no-install-recommends chromium; } >/dev/null 2>&1; \
	fi; \
	command -v chromium >/dev/null 2>&1 || echo "note: chromium not found; the browser test" \
	  "needs it: sudo apt install chromium"

demo: install
	$(BIN)/python examples/explain_photos.py

lint: install
	$(BIN)/ruff check src tests examples
	$(BIN)/ruff format --check src tests examples
	$(BIN)/mypy src

# two test processes (pytest-xdist, a test file each at a time) share the two cores; the
# slowest tests are listed at the end of the log (--durations)
PYTEST_WORKERS ?= 2
# the test bed's models train (where not cached) while the linters run, on the core they leave
test: install
	@$(BIN)/python tests/conftest.py & training=$$!; status=0; \
	  $(MAKE) --no-print-directory lint || status=$$?; \
	  wait $$training || echo "training the test bed's models failed; pytest tries again"; \
	  exit $$status
	$(BIN)/pytest -q -n $(PYTEST_WORKERS) --dist loadfile --durations=20
	$(MAKE) --no-print-directory test-compat
	$(MAKE) --no-print-directory docs

# The tests that read open_clip's internals (marker `open_clip`, tests/conftest.py) under the
# oldest open_clip that pyproject.toml allows, in a venv that borrows everything else
# (torch, timm, …) from .venv: a .pth line adds .venv's site-packages after its own, so the
# pinned open_clip shadows the newest one. About a minute (the download is 1.5 MB).
COMPAT_OPEN_CLIP ?= 3.0.0
COMPAT_VENV ?= .venv-compat
test-compat: install
	@rm -rf $(COMPAT_VENV) && $(PYTHON) -m venv $(COMPAT_VENV)
	@main=$$($(BIN)/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])"); \
	  own=$$($(COMPAT_VENV)/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])"); \
	  echo "import site; site.addsitedir('$$main')" > "$$own/zz-clipviz-main.pth"
	$(COMPAT_VENV)/bin/python -m pip install -q --no-deps open_clip_torch==$(COMPAT_OPEN_CLIP)
	$(COMPAT_VENV)/bin/python -c "import open_clip; assert open_clip.__version__ == '$(COMPAT_OPEN_CLIP)', open_clip.__version__"
	$(COMPAT_VENV)/bin/python -m pytest -q -p no:cacheprovider -m open_clip \
	  -n $(PYTEST_WORKERS) --dist loadfile --durations=5

# The documentation site (Sphinx, furo, MyST) in docs/_build/html; warnings are errors. The
# example notebooks show the outputs of the notebook tests' run where their code is unchanged
# since (docs/_build/executed/), and are executed here otherwise.
docs: install
	$(BIN)/sphinx-build -W --keep-going -q -b html docs docs/_build/html

format: install
	$(BIN)/ruff check --fix src tests examples
	$(BIN)/ruff format src tests examples

clean:
	rm -rf $(VENV) $(COMPAT_VENV) clipviz-out .pytest_cache .mypy_cache .ruff_cache \
	  docs/_build docs/notebooks
