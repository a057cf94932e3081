# Every target sets up .venv first (torch pinned to the local CPU wheel).
#   make test       the whole suite (unit + e2e; installs espeak-ng and synthesises the speech fixture) -- CI
#   make test-fast  tests/unit only: no espeak-ng, no fixture, no training (under 2 minutes)
#   make keywords   synthesise the keyword-spotting fixture (fixtures/keywords; bench needs it)
#   make text       build the English text corpus + tokenizer from python3.11-doc (fixtures/text; bench needs it)
#   make detection  draw the synthetic shapes detection fixture (fixtures/detection; bench needs it)
#   make lint       ruff + the import-layer contract (pyproject.toml [tool.ruff], [tool.importlinter])
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.edgec-installed
SPEECH := fixtures/speech/labels.csv
KEYWORDS := fixtures/keywords/labels.csv
TEXT   := fixtures/text/tokens.safetensors
DETECTION := fixtures/detection/train.json
DOCSRC := /usr/share/doc/python3.11/html/_sources
LINTED := edgec tests benchmarks fixtures

.PHONY: venv demo test test-fast lint espeak clean bench keywords text pydoc detection

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

# the Python 3.11 documentation sources (Debian package python3.11-doc, PSF License): the text corpus
pydoc:
	@test -d $(DOCSRC) || { apt-get update -qq && apt-get install -y -qq python3.11-doc >/dev/null; } \
	  || { echo "python3.11-doc is needed: apt-get install python3.11-doc"; exit 2; }

# English text for causal LMs (>= 1 M tokens, train/val/test by document, byte-level BPE tokenizer)
$(TEXT): fixtures/make_text.py edgec/data/text.py | venv pydoc
	$(BIN)/python fixtures/make_text.py --out fixtures/text --src $(DOCSRC)

text: $(TEXT)

# synthetic shapes on textured backgrounds, COCO json per split (3000 images, 64-128 px; needs Pillow)
$(DETECTION): fixtures/make_detection.py | venv
	$(BIN)/python fixtures/make_detection.py --out fixtures/detection

detection: $(DETECTION)

demo: venv espeak $(SPEECH)
	$(BIN)/edgec run fixtures/demo.toml --out out/demo

test: venv espeak $(SPEECH)
	$(BIN)/python -m pytest

test-fast: venv
	$(BIN)/python -m pytest tests/unit

lint: venv
	$(BIN)/ruff check $(LINTED)
	$(BIN)/lint-imports

bench: venv espeak $(SPEECH) $(KEYWORDS) $(TEXT) $(DETECTION)
	$(BIN)/python benchmarks/zoo.py

clean:
	rm -rf out .cache fixtures/speech fixtures/keywords fixtures/text fixtures/detection
