#!/bin/bash
# The retraining recipe (`make retrain`) end to end at toy scale on the CPU: a few coarse phantoms, a tiny
# network, a few training steps. It checks that the command sequence runs and writes a model file with
# defaults, an OOD reference and what it expects, and the per-family tables; the figures mean nothing.
# Usage: bench/retrain_toy.sh [DIR]   (default: a fresh temporary folder)
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-$(mktemp -d)}
# the environment `make venv` (or `make demo`, `make test`) creates, else python3 (set PYTHON to choose)
PYTHON=${PYTHON:-$(test -x .venv/bin/python && echo "$PWD/.venv/bin/python" || echo python3)}
export PYTHONPATH=$PWD/CDMSegment${PYTHONPATH:+:$PYTHONPATH}
start=$(date +%s)
make --no-print-directory retrain RETRAIN_DIR="$DIR" CDM="$PYTHON -m CDMSegmentLib.cli.main" MODEL_NAME=toy \
    TRAIN_CASES=4 SMALL_CASES=2 VAL_CASES=4 OOD_CASES=9 TEST_CASES=3 STEPS=4 BATCH=4 IMAGE_SIZE=64 \
    NETWORK="--base-channels 8 --channel-mults 1,2 --attention-levels 1" CHECKPOINT_EVERY=2 \
    PHANTOM_OPTS="--in-plane-mm 3 --slice-mm 4" CALIBRATE_OPTS="--precision fp32 --noise-level 0.5 --tau 0" \
    DEVICE=cpu
"$PYTHON" - "$DIR" <<'PY'
import sys
from pathlib import Path
from CDMSegmentLib.core.modelfile import load_model
d = Path(sys.argv[1])
meta = load_model(d / "toy.pt").metadata
assert meta["ood"]["reference_volumes"] == 9 and meta["expects"]["modality"] == "FLAIR", meta
assert "threshold" in meta["defaults"] and "lesion_intensity" in meta["defaults"] and meta["training"]["steps"] == 4
for table in ("families", "contrast"):
    text = (d / "results" / table / "volumes.md").read_text()
    assert "intensity threshold (calibrated)" in text and "| family |" in text, text
print(f"retrain recipe ran end to end at toy scale in {d}: model, defaults, OOD reference, per-family tables")
PY
echo "$(( $(date +%s) - start )) s on $(lscpu | sed -n 's/^Model name: *//p')"
