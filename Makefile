# Every target sets up .venv first (torch pinned to the local CPU wheel).
#   make test       the whole suite (unit + e2e; installs espeak-ng and synthesises the speech fixture) -- CI
#   make test-fast  tests/unit only: no espeak-ng, no fixture, no training (under 2 minutes)
#   make keywords   synthesise the keyword-spotting fixture (fixtures/keywords; bench needs it)
#   make lint       ruff + the import-layer contract (pyproject.toml [tool.ruff], [tool.importlinter])
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.edgec-installed
SPEECH := fixtures/speech/labels.csv
KEYWORDS := fixtures/keywords/labels.csv
LINTED := edgec tests benchmarks fixtures

.PHONY: venv demo test test-fast lint espeak clean bench keywords

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install -q --disable-pip-version-check -e '.[test]' torch==2.13.0
	touch $@

venv: $(STAMP)

# espeak-ng synthesises the speech fixture task (Debian package).
espeak:
	@command -v espeak-ng >/dev/null || { apt-get update -qq && apt-get install -y -qq espeak-ng >/dev/null; } \
	  || { echo "espeak-ng is needed: apt-get install espeak-ng"; exit 2; }

$(SPEECH): fixtures/make_speech.py | venv espeak
	$(BIN)/python fixtures/make_speech.py --out fixtures/speech

# keyword spotting (36 words, 24 voices, noise + reverberation): the capacity task of benchmarks/prune.py
$(KEYWORDS): fixtures/make_keywords.py fixtures/make_speech.py | venv espeak
	$(BIN)/python fixtures/make_keywords.py --out fixtures/keywords

keywords: $(KEYWORDS)

demo: venv espeak $(SPEECH)
	$(BIN)/edgec run fixtures/demo.toml --out out/demo

test: venv espeak $(SPEECH)
	$(BIN)/python -m pytest

test-fast: venv
	$(BIN)/python -m pytest tests/unit

lint: venv
	$(BIN)/ruff check $(LINTED)
	$(BIN)/lint-imports

bench: venv espeak $(SPEECH) $(KEYWORDS)
	$(BIN)/python benchmarks/zoo.py

clean:
	rm -rf out .cache fixtures/speech fixtures/keywords
