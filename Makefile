# The user's verbs. Variables: DATA_DIR, CONFIG, EPOCHS, ARGS, RESUME, RUN, OUT, K, FILE, MESSAGE, DRY_RUN,
# COMPETITION, BATCHES, ANSWERS, SPACE, TRIALS, BUDGET, STUDY, STORAGE, TRIAL_MINUTES, PRUNER.
SHELL := /bin/bash
VENV ?= .venv
# tcmalloc where it is installed (Debian/Ubuntu: apt install libtcmalloc-minimal4; TCMALLOC= turns it
# off): it keeps a step's freed activations for the next step, where glibc returns them to the kernel
# and faults them in again (training +27% images/s, a quarter less memory; docs/results.md).
TCMALLOC ?= $(firstword $(wildcard /usr/lib/*-linux-gnu/libtcmalloc_minimal.so.4 /usr/lib64/libtcmalloc_minimal.so.4))
PY := $(if $(TCMALLOC),LD_PRELOAD=$(TCMALLOC) )$(VENV)/bin/python
CONFIG ?= configs/default.yaml
export NO_ALBUMENTATIONS_UPDATE := 1

.PHONY: install train features predict holdout cv sweep audit lr-find report score submit data test bench clean-cache help

help:
	@echo "make train    [DATA_DIR=data] [CONFIG=configs/<recipe>.yaml] [EPOCHS=N] [ARGS='--model.lr=1e-3'] [RESUME=runs/<run>]"
	@echo "make predict  [DATA_DIR=data] [RUN='runs/a runs/b'] [OUT=path.csv] [ARGS='--tta --checkpoint last --slide_prior 0']"
	@echo "make holdout  [RUN='runs/a runs/b'] [ARGS='--slide_prior 5']  each run and their ensemble on the holdout they share, TTA and slide prior off and on"
	@echo "make submit   [FILE=submissions/x.csv] [MESSAGE='...'] [DRY_RUN=1]"
	@echo "make score    [FILE='a.csv [b.csv ...]'] [ANSWERS=DATA_DIR/test_labels.csv] [ARGS='--shared_errors DIR']  accuracy against an answer key; b, c... compared with a"
	@echo "make cv       [K=5] [CONFIG=...] [DATA_DIR=...] [EPOCHS=N] [ARGS=...]   slide-grouped cross-validation"
	@echo "make sweep    [TRIALS=20] [SPACE=configs/sweeps/<recipe>.yaml] [EPOCHS=N] [BUDGET=min] [TRIAL_MINUTES=N] [STUDY=name] [STORAGE=url] [PRUNER=median|halving|hyperband] [CONFIG, DATA_DIR, ARGS]  Optuna search; rerun continues it; TRIALS=0: report only"
	@echo "make audit    [RUN=runs/<cv>] or [K=5] [CONFIG=...] [DATA_DIR=...] [EPOCHS=N]  suspect labels from out-of-fold predictions"
	@echo "make lr-find  [CONFIG=...] [DATA_DIR=...]  learning-rate range test"
	@echo "make features [CONFIG=configs/resnet18_features.yaml] [DATA_DIR=...]  frozen backbone, cached features"
	@echo "make report   [RUN=runs/<run>] [DATA_DIR=...]  figures, Grad-CAM and report.md for a run"
	@echo "make bench    [CONFIG=...] [DATA_DIR=...] [BATCHES=8]  images/s of each stage vs a naive pipeline"
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
	$(PY) -m malaria.commands.train fit \
		--config $(if $(RESUME),$(RESUME)/config.yaml,$(CONFIG)) \
		$(if $(RESUME),--ckpt_path $(RESUME)/checkpoints/last.ckpt) \
		$(if $(DATA_DIR),--data.data_dir $(DATA_DIR)) \
		$(if $(EPOCHS),--trainer.max_epochs $(EPOCHS)) \
		$(ARGS)

features: install
	$(PY) -m malaria.commands.features --config $(if $(filter $(CONFIG),configs/default.yaml),configs/resnet18_features.yaml,$(CONFIG)) \
		$(if $(DATA_DIR),--data.data_dir $(DATA_DIR)) $(if $(EPOCHS),--trainer.max_epochs $(EPOCHS)) $(ARGS)

predict: install
	$(PY) -m malaria.commands.predict $(if $(RUN),--run $(RUN)) $(if $(DATA_DIR),--data.data_dir $(DATA_DIR)) $(if $(OUT),--out $(OUT)) $(ARGS)

holdout: install
	$(PY) -m malaria.commands.holdout $(if $(RUN),--run $(RUN)) $(ARGS)

cv: install
	$(PY) -m malaria.commands.cv --k $(or $(K),5) --config $(CONFIG) $(if $(DATA_DIR),--data.data_dir $(DATA_DIR)) \
		$(if $(EPOCHS),--trainer.max_epochs $(EPOCHS)) $(ARGS)

# Every worker pointing at the same STUDY and STORAGE shares one study; rerunning continues it.
sweep: install
	$(PY) -m malaria.commands.sweep --config $(CONFIG) $(if $(SPACE),--space $(SPACE)) $(if $(TRIALS),--trials $(TRIALS)) \
		$(if $(BUDGET),--budget $(BUDGET)) $(if $(TRIAL_MINUTES),--trial_minutes $(TRIAL_MINUTES)) \
		$(if $(STUDY),--study $(STUDY)) $(if $(STORAGE),--storage "$(STORAGE)") $(if $(PRUNER),--pruner $(PRUNER)) \
		$(if $(DATA_DIR),--data.data_dir $(DATA_DIR)) $(if $(EPOCHS),--trainer.max_epochs $(EPOCHS)) $(ARGS)

# Without RUN, a slide-grouped CV runs first (named here, so the audit knows where its predictions are).
AUDIT_CV := runs/audit-cv-$(shell date +%Y%m%d-%H%M%S)
audit: install
	$(if $(RUN),,$(PY) -m malaria.commands.cv --k $(or $(K),5) --config $(CONFIG) --name $(notdir $(AUDIT_CV)) \
		$(if $(DATA_DIR),--data.data_dir $(DATA_DIR)) $(if $(EPOCHS),--trainer.max_epochs $(EPOCHS)) $(ARGS) &&) \
	$(PY) -m malaria.commands.audit --run $(or $(RUN),$(AUDIT_CV))

lr-find: install
	$(PY) -m malaria.commands.lr_find --config $(CONFIG) $(if $(DATA_DIR),--data.data_dir $(DATA_DIR)) $(ARGS)

report: install
	$(PY) -m malaria.commands.report $(if $(RUN),--run $(RUN)) $(if $(DATA_DIR),--data.data_dir $(DATA_DIR))

bench: install
	@$(PY) -m malaria.commands.bench --config $(CONFIG) $(if $(DATA_DIR),--data.data_dir $(DATA_DIR)) \
		$(if $(BATCHES),--batches $(BATCHES)) $(ARGS)

score: install
	$(PY) -m malaria.commands.score $(FILE) $(ARGS) \
		--answers $(or $(ANSWERS),$(or $(DATA_DIR),data)/test_labels.csv)

data: install
	$(PY) -m malaria.commands.leaderboard download $(if $(COMPETITION),--competition $(COMPETITION)) --data.data_dir $(or $(DATA_DIR),data)

submit: install
	$(PY) -m malaria.commands.leaderboard submit $(if $(FILE),--file $(FILE)) $(if $(MESSAGE),--message "$(MESSAGE)") \
		$(if $(DRY_RUN),--dry_run) $(if $(COMPETITION),--competition $(COMPETITION)) --data.data_dir $(or $(DATA_DIR),data)

test: install
	$(PY) -m pytest

clean-cache:
	rm -rf .cache data/.cache data/demo/.cache
