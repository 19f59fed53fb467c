# `make demo`: the bundled model on the bundled sample; `make test`: the whole suite.
# Both create .venv with everything they need (CPU torch pinned for reproducible tests).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_PIN := torch==2.13.0

.PHONY: venv demo test bench clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_PIN)"
	$(PY) -m pip install --quiet -e ".[test]" "$(TORCH_PIN)"
	touch $@

demo: venv
	$(VENV)/bin/cdmsegment segment Resources/Sample/CDMSegmentSample_flair.nrrd -o demo-output
	@echo "Open in Slicer: File > Add Data > Resources/Sample/CDMSegmentSample_flair.nrrd and demo-output/*"

test: venv
	$(PY) -m pytest -q Testing

bench: venv
	$(PY) bench/bench_volume.py

clean:
	rm -rf $(VENV) demo-output .pytest_cache
