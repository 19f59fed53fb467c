# `make demo`: the bundled model on the bundled sample; `make test`: the whole suite.
# Both create .venv with everything they need (CPU torch pinned for reproducible tests).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_PIN := torch==2.13.0

.PHONY: venv demo test bench screenshot clean

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

test: venv
	$(PY) -m pytest -q Testing

bench: venv
	$(PY) bench/bench_speed.py

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
	rm -rf $(VENV) $(VIEWS_VENV) demo-output .pytest_cache
