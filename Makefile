# The user's verbs. Variables: DATA_DIR, CONFIG, EPOCHS, ARGS, RESUME, RUN, OUT, FILE, MESSAGE, DRY_RUN.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
CONFIG ?= configs/default.yaml
export NO_ALBUMENTATIONS_UPDATE := 1

.PHONY: install train predict submit data test bench clean-cache help

help:
	@echo "make train    [DATA_DIR=data] [CONFIG=configs/<recipe>.yaml] [EPOCHS=N] [ARGS='--model.lr=1e-3'] [RESUME=runs/<run>]"
	@echo "make predict  [DATA_DIR=data] [RUN='runs/a runs/b'] [OUT=path.csv]"
	@echo "make submit   [FILE=submissions/x.csv] [MESSAGE='...'] [DRY_RUN=1]"
	@echo "make data     [COMPETITION=<slug>]     download the competition into data/"
	@echo "make test | make bench | make install"

install: $(VENV)/.installed

# Exact versions from requirements/constraints.txt: a fresh machine gets what the tests ran on.
$(VENV)/.installed: pyproject.toml requirements/constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c requirements/constraints.txt -e ".[test]"
	touch $@

train: install
	$(PY) -m malaria.train fit \
		--config $(if $(RESUME),$(RESUME)/config.yaml,$(CONFIG)) \
		$(if $(RESUME),--ckpt_path $(RESUME)/checkpoints/last.ckpt) \
		$(if $(DATA_DIR),--data.data_dir $(DATA_DIR)) \
		$(if $(EPOCHS),--trainer.max_epochs $(EPOCHS)) \
		$(ARGS)

predict: install
	$(PY) -m malaria.predict $(if $(RUN),--run $(RUN)) $(if $(DATA_DIR),--data-dir $(DATA_DIR)) $(if $(OUT),--out $(OUT))

test: install
	$(PY) -m pytest

clean-cache:
	rm -rf .cache data/.cache data/demo/.cache
