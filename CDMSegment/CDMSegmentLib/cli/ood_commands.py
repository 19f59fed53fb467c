"""Command-line front ends for the out-of-distribution score: ``ood`` (one volume) and ``calibrate-ood``."""

import json
import sys
from pathlib import Path

from ..core.errors import CDMSegmentError
from ..core.ranges import option


def add_ood_parser(sub) -> None:
    p = sub.add_parser("ood", help="is this input like the model's training data? its out-of-distribution score")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image file or DICOM folder, one per model modality")
    p.add_argument("--model", default=None, help="registered model name or model file (default: the registry's default model)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda")
    p.set_defaults(func=run_ood)


def run_ood(args) -> None:
    from ..core.reading import read_volume
    from ..core.modelfile import load_model
    from ..core.device import choose_device
    from ..core.ood import ood_score
    from ..core.plausibility import ood_finding, ood_levels

    model = load_model(args.model)
    volumes = [read_volume(p) for p in args.inputs]
    # 'auto' says once which device it chose, as segment does
    result = ood_score(model, volumes, device=choose_device(args.device, log=lambda m: print(m, file=sys.stderr)))
    if result is None:
        raise CDMSegmentError(f"model {model.metadata['name']} has no out-of-distribution reference; "
                              "add one with 'cdmsegment calibrate-ood' and 'cdmsegment set-defaults --ood'")
    finding = ood_finding(result)  # what segment makes of the score
    if finding is None:
        verdict = "like the model's training data: segment runs"
    elif not finding.clear:
        verdict = ("unusual for the model (an unusual contrast, or large or unusual lesions): segment runs and "
                   "warns beside the result")
    else:
        verdict = "OUTSIDE what the model learned: segment refuses it unless --force"
    print(f"{' '.join(map(str, args.inputs))}: OOD score {ood_levels(result)}: {verdict}; the model expects "
          f"{model.metadata.get('expects', {}).get('description', 'what cdmsegment info says')}")


def add_calibrate_ood_parser(sub) -> None:
    p = sub.add_parser("calibrate-ood", help="measure the model's out-of-distribution reference on held-out volumes "
                                             "(every family it should take); write it for set-defaults --ood")
    p.add_argument("model", help="model file or registered name")
    p.add_argument("data", type=Path, help="folder of held-out cases in the BraTS layout (phantoms of every family)")
    p.add_argument("-o", "--output", type=Path, required=True, help="OOD reference JSON")
    p.add_argument("--cases", type=option("count"), default=None, help="only the first N cases")
    p.add_argument("--false-alarm", type=option("false_alarm"), default=0.05, help="allowed share of valid inputs flagged")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda")
    p.set_defaults(func=run_calibrate_ood)


def run_calibrate_ood(args) -> None:
    from ..core.device import choose_device
    from ..core.modelfile import load_model
    from ..data.cases import find_brats_cases
    from ..training.calibrate_ood import calibrate_ood
    from .writers import write_text_outputs

    model = load_model(args.model)
    cases = find_brats_cases(args.data)[:args.cases]
    say = lambda m: print(m, file=sys.stderr)  # noqa: E731  (progress on stderr, the result on stdout)
    reference, rows = calibrate_ood(model, cases, false_alarm=args.false_alarm, device=choose_device(args.device, say),
                                    data=f"{len(cases)} held-out volumes of {args.data}", log=say)
    write_text_outputs({args.output: json.dumps(reference, indent=1),
                        args.output.with_suffix(".cases.json"): json.dumps(rows, indent=1)})
    print(f"threshold {reference['threshold']:.2f}, {reference['calibration']['false_alarms']} of {len(rows)} "
          f"held-out volumes over it -> {args.output}")
