# `make demo`: the bundled model on the bundled sample; `make test`: the whole suite.
# Both create .venv with everything they need (CPU torch pinned for reproducible tests); `make test` also
# creates .venv-slicer-newest, where the MRML tests run again on the newest slicer-core.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_PIN := torch==2.13.0

.PHONY: venv demo test test-newest-slicer bench screenshot clean

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
	$(PY) bench/bench_volume.py

# Resources/screenshot.png: the demo's result rendered by Slicer's own views (slicer-core through
# trame-slicer, offscreen), in a separate environment so the test environment stays as it is.
VIEWS_VENV := .venv-views
STEM := CDMSegmentSample_flair

screenshot: demo
	test -x $(VIEWS_VENV)/bin/python || $(PYTHON) -m venv $(VIEWS_VENV)
	$(VIEWS_VENV)/bin/python -m pip install --quiet "trame-slicer[standalone]==2.0.0" "slicer-core>=5.11,<5.12" numpy pillow \
		simpleitk scipy  # what CDMSegmentLib.slicer_adapters.mrml imports
	$(VIEWS_VENV)/bin/python tools/render_screenshot.py $(SAMPLE) demo-output/$(STEM)_heatmap.nrrd \
		demo-output/$(STEM).seg.nrrd Resources/screenshot.png

clean:
	rm -rf $(VENV) $(VIEWS_VENV) $(NEWEST_VENV) demo-output .pytest_cache
