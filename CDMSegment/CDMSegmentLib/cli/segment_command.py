"""``cdmsegment segment`` and ``cdmsegment info``, and an entry point that has only these two: the one the
Slicer module runs in a child process (``python -m CDMSegmentLib.cli.segment_command segment ...``).

It imports neither the trainer nor the evaluation harness, so Slicer installs the command without them.
With ``--progress-lines`` a run reports on stdout in JSON lines (``core.run_events``) instead of a
progress bar and a summary line: what the program that started it reads.
"""

import argparse
import contextlib
import json
import os
import shlex
import signal
import sys
import threading
from pathlib import Path
from typing import Callable, List, Optional

from ..core.engine import ENGINES
from ..core.errors import CDMSegmentError, out_of_memory
from ..core.names import AXIS_NAMES, METHODS
from ..core.ranges import option
from ..core.run_events import ERROR, SUMMARY, EventWriter
from ..core.settings import CDMSettings


class OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line, like every other error of the command (the usage is in --help)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")


ENGINE_HELP = ("what evaluates the network: auto (ONNX Runtime on a CPU when the packages onnx and onnxruntime are "
               "installed, about 1.3x faster there; torch otherwise), torch, or onnxruntime")
SEED_HELP = ("seed of the noise drawn for each slice: the same seed, settings and device give the same heatmap "
             "(default: %(default)s)")


def _axis(value: str):
    """--axis: a name or a voxel axis, checked as the parser reads it (before the model loads)."""
    if value.isdigit() and int(value) in (0, 1, 2):
        return int(value)
    if value == "auto" or value in AXIS_NAMES:
        return value
    raise argparse.ArgumentTypeError(f"unknown slice axis {value!r}; use auto, axial, coronal, sagittal, 0, 1 or 2")


def add_segment_parser(sub) -> None:
    p = sub.add_parser("segment", help="heatmap and segmentation of one case (one input per model modality)")
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="image file or DICOM folder, one per modality, of the kind the model takes: the bundled "
                        "model takes skull-stripped brain MRI (FLAIR); 'cdmsegment info MODEL' says what another "
                        "takes")
    p.add_argument("--series", action="append", default=[], metavar="UID",
                   help="SeriesInstanceUID of the series to read from a DICOM folder holding several (repeatable)")
    p.add_argument("--force", action="store_true",
                   help="run even on an image that does not look like what the model takes (a CT, a head "
                        "with its skull, another MRI sequence)")
    p.add_argument("-o", "--output", required=True, type=Path, metavar="OUTDIR",
                   help="folder for the results, made when missing: <input>_heatmap.nrrd (one per class when the model "
                        "has several) and <input>.seg.nrrd; existing files are kept unless --overwrite")
    p.add_argument("--model", default=None, help="registered model name or model file (default: the registry's default model)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda")
    p.add_argument("--axis", type=_axis, default="auto",
                   help="slice axis: auto (axial), axial, coronal, sagittal, or voxel axis 0 (I), 1 (J), 2 (K)")
    p.add_argument("--method", default="cdm", choices=METHODS, metavar="METHOD", help="cdm, cg-cdm (guided by the model's registered classifier or "
                   "--classifier), or a baseline: gradcam, gradcam++, scorecam, layercam, cg-diff (need --classifier)")
    p.add_argument("--classifier", default=None, help="noise-aware classifier for cg-cdm and the baselines (name or file)")
    p.add_argument("--target-class", type=option("target_class"), default=None,
                   help="class index to segment (default: every class except 0 = normal)")
    CDMSettings.add_arguments(p)
    p.add_argument("--batch-size", type=option("batch_size"), default=None,
                   help="slices per network batch (default: the model's measured value for the device, else 4 on "
                        "a CPU and 64 on a GPU)")
    p.add_argument("--precision", default="auto", help="auto (fp32 on CPU, fp16 on CUDA), fp32, bf16 or fp16")
    p.add_argument("--engine", default="auto", choices=ENGINES, help=ENGINE_HELP)
    p.add_argument("--seed", type=option("seed"), default=0, help=SEED_HELP)
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--progress-lines", action="store_true",
                   help="report on stdout in JSON lines (phase, slices done of N and time left, summary or error) "
                        "for a program that runs this command")
    p.set_defaults(func=run_segment)


def run_segment(args) -> None:
    from .segment_files import segment_files

    def run(progress: Callable[[int, int], None], log: Callable[[str], None], phase=lambda name: None):
        return segment_files(
            args.inputs, args.output, model=args.model, device=args.device, axis=args.axis, method=args.method,
            classifier=args.classifier, target_class=args.target_class, settings=CDMSettings.from_arguments(args),
            batch_size=args.batch_size, precision=args.precision, engine=args.engine, seed=args.seed, overwrite=args.overwrite,
            series=args.series, force=args.force, progress=progress, log=log, phase=phase)

    if args.progress_lines:
        events = EventWriter(sys.stdout)
        events.emit(SUMMARY, **run(events.progress, events.log, events.phase).to_json())
        return
    from tqdm import tqdm

    # disable=None: no bar when stderr is not a terminal, so logs and pipes get only the messages
    bar = tqdm(total=0, unit="slice", desc="segmenting", file=sys.stderr, leave=False, disable=None)

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    try:
        summary = run(progress, lambda m: tqdm.write(m, file=sys.stderr))
    finally:
        with contextlib.suppress(OSError):  # the terminal closed (SIGHUP): the bar has nowhere to go
            bar.close()
    print(summary.line())


def add_info_parser(sub) -> None:
    p = sub.add_parser("info", help="what a model is, takes and does by default (--json: all its metadata)")
    p.add_argument("model", nargs="?", default=None,
                   help="registered model name or model file (default: the registry's default model)")
    p.add_argument("--kind", default=None, choices=("diffusion", "classifier"),
                   help="what the model is: a diffusion model or a noise-aware classifier (default: what the "
                        "registry or the file says)")
    p.add_argument("--json", action="store_true",
                   help="print the model's whole metadata as JSON, and nothing else, for a program to read")
    p.set_defaults(func=run_info)


def run_info(args) -> None:
    from ..core.model_description import kind_of
    from ..core.modelfile import load_model

    model = load_model(args.model, kind=args.kind or kind_of(args.model))
    if args.json:
        print(json.dumps(model.metadata, indent=2, sort_keys=True))
        return
    print("\n".join(model_summary(model)))
    print(f"All its metadata: cdmsegment info {shlex.quote(str(args.model or model.metadata['name']))}"
          f"{' --kind classifier' if args.kind == 'classifier' else ''} --json")


# The defaults shown first, in the order a user reads them; any other follows, alphabetically.
DEFAULTS_ORDER = ("noise_level", "steps", "tau", "noise_draws", "guidance_scale", "threshold", "cg_cdm_threshold",
                  "min_component_ml")
UNITS = ("ml", "px", "mm", "s")  # a key ending in _<unit> is shown as 'name value unit'
NAMES = {"cg_cdm_threshold": "CG-CDM threshold"}  # where the key's words do not spell the name


def _default_text(key: str, value) -> str:
    """'noise level 0.3', 'min component 0.25 ml', 'batch size cpu 4, cuda 64'."""
    name, _, unit = key.rpartition("_")
    if unit not in UNITS:
        name, unit = key, ""
    if isinstance(value, dict):
        value = ", ".join(f"{k} {v}" for k, v in value.items())
    elif isinstance(value, float):
        value = f"{value:.3g}"
    return " ".join(filter(None, [NAMES.get(key, name.replace("_", " ")), str(value), unit]))


def _band_text(model) -> str:
    """', trained on timesteps 40..599 (alpha_bar 0.98 to 0.03)...' for a model trained on part of the schedule, else ''."""
    if model.kind != "diffusion":
        return ""
    lo, hi = model.noise_band()
    if (lo, hi) == (0, int(model.metadata["num_timesteps"]) - 1):
        return ""
    schedule = model.schedule()
    return (f", trained on timesteps {lo}..{hi} (alpha_bar {float(schedule.alpha_bar(lo)):.2f} to "
            f"{float(schedule.alpha_bar(hi)):.2f}): noise levels outside are refused")


def model_summary(model) -> List[str]:
    """A LoadedModel in a few readable lines: what it is, takes and gives, its defaults, OOD threshold, hash and
    intended use (``cdmsegment info``; the whole metadata is ``--json``)."""
    import textwrap

    from ..core.model_metadata import ensemble_size
    from ..core.plausibility import OOD_REFUSAL_FACTOR, takes

    m = model.metadata
    defaults = model.defaults
    shown = [k for k in DEFAULTS_ORDER if k in defaults] + sorted(
        k for k in defaults if k not in DEFAULTS_ORDER and k not in ("calibration", "refinement_calibration"))
    rows = [("SHA256", model.sha256), ("takes", takes(m)),
            ("modalities", ", ".join(model.modalities)),
            ("classes", ", ".join(f"{n} {name}" for n, name in enumerate(model.class_names))),
            ("image size", f"{model.image_size} x {model.image_size} px slices"),
            ("schedule", f"{m['schedule']}, T = {m['num_timesteps']}" + _band_text(model)),
            ("defaults", ", ".join(_default_text(k, defaults[k]) for k in shown) or "none stored")]
    if "ood" in m:
        threshold = float(m["ood"]["threshold"])
        rows.append(("OOD threshold", f"{threshold:.3g}: warns above it, refuses above "
                                      f"{OOD_REFUSAL_FACTOR * threshold:.3g} unless --force"))
    if model.kind == "diffusion":
        from ..core.engine import onnxruntime_available

        rows.append(("CPU engine", "ONNX Runtime (what --engine auto uses on a CPU)" if onnxruntime_available() else
                     "torch; pip install onnx onnxruntime makes CPU runs about 1.3x faster"))
    if m["training"].get("data"):
        rows.append(("trained on", m["training"]["data"]))
    networks = ensemble_size(m)
    if networks > 1:
        members = m["training"].get("members")
        seeds = [str(r.get("config", {}).get("seed", "?")) for r in members if isinstance(r, dict)] \
            if isinstance(members, list) else []
        rows.append(("ensemble", f"{networks} networks of this recipe" + (f" (training seeds {', '.join(seeds)})"
                                 if seeds else "") + f"; noise draw d runs through network d mod {networks}"))
    rows.append(("intended use", m.get("intended_use", "not stated in the model file")))
    lines = [f"{m['name']} {m['version']}: {m['kind']} model", f"  {'file':<15}{model.path}"]  # a path is never wrapped
    for label, text in rows:
        lines += textwrap.wrap(text, width=110, initial_indent=f"  {label:<15}", subsequent_indent=" " * 17,
                               break_long_words=False, break_on_hyphens=False)
    return lines


def make_parser(commands) -> argparse.ArgumentParser:
    parser = OneLineParser(prog="cdmsegment", description=(
        "Weakly supervised segmentation with conditional diffusion models (Hu et al., MICCAI 2023)."))
    sub = parser.add_subparsers(dest="command", required=True)
    for add in commands:
        add(sub)
    return parser


# The signals that stop a run, and what each means to the user. SIGHUP is the terminal closing (not on Windows).
STOP_SIGNALS = {signal.SIGINT: "interrupted", signal.SIGTERM: "terminated"}
if hasattr(signal, "SIGHUP"):
    STOP_SIGNALS[signal.SIGHUP] = "stopped: its terminal was closed"


class Stopped(BaseException):
    """SIGTERM or SIGHUP, raised like KeyboardInterrupt so that every clean-up (temporary outputs) runs."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _ignore(signum, frame):
    """A stop signal after the first. A Python handler, not SIG_IGN: two signals that arrive together (both
    pending while a C call writes the output) are handled one after the other, and the second one finding SIG_IGN
    would make Python raise "Signal N ignored due to race condition" in the middle of the clean-up."""


def _stop(signum, frame):
    """The first stop signal unwinds the run; any later one (a second Ctrl-C, SIGTERM then Ctrl-C) is ignored, so
    the clean-up it started runs to its end: interrupted halfway it left partial files, and an interrupted
    destructor (tqdm's bar) prints Python's "Exception ignored" traceback."""
    for s in STOP_SIGNALS:
        signal.signal(s, _ignore)
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise Stopped(signum)


def run_command(parser: argparse.ArgumentParser, argv: Optional[List[str]] = None) -> int:
    """Parse and run one command: an error a user can act on is one line on stderr (and, with
    --progress-lines, one error event on stdout, the reason alone) and a non-zero exit, never a traceback.
    SIGTERM and SIGHUP clean up as SIGINT does."""
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = {s: signal.signal(s, _stop) for s in STOP_SIGNALS} if in_main_thread else {}
    try:
        return _run(parser, argv)
    finally:
        # After a stop signal the command is over and its process exits: the handlers stay _ignore, so a second
        # signal arriving after this point (SIGTERM then Ctrl-C) cannot interrupt the exit with a traceback.
        stopped = any(signal.getsignal(s) is _ignore for s in previous)
        for s, handler in previous.items() if not stopped else ():
            signal.signal(s, handler)


def _run(parser: argparse.ArgumentParser, argv: Optional[List[str]]) -> int:
    args = None
    try:
        args = parser.parse_args(argv)
        from .writers import check_command_outputs  # numpy and SimpleITK: once the command line is parsed

        check_command_outputs(args)
        args.func(args)
        return 0
    except CDMSegmentError as e:
        reason, prefix, code = str(e), "error: ", 1
    except BrokenPipeError:  # what reads the output went away ('| head', a parent that died): end quietly
        with contextlib.suppress(OSError):  # so that the flush at exit fails no more
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + 13  # as SIGPIPE would end it
    except OSError as e:  # what the file system refuses where no check foresaw it (a name too long for it)
        reason, prefix, code = f"{e.strerror or e}{f': {e.filename}' if e.filename else ''}", "error: ", 1
    except Exception as e:  # memory ran out in any library, anywhere in the run; any other error is a bug: raised
        memory = out_of_memory(e)
        if memory is None:
            raise
        reason, prefix, code = str(memory), "error: ", 1
    except KeyboardInterrupt:
        reason, prefix, code = f"{STOP_SIGNALS[signal.SIGINT]}; {_kept(args)}", "", 128 + signal.SIGINT
    except Stopped as e:
        reason, prefix, code = f"{STOP_SIGNALS[e.signum]}; {_kept(args)}", "", 128 + e.signum
    try:  # after SIGHUP the terminal may be gone
        if getattr(args, "progress_lines", False):
            EventWriter(sys.stdout).emit(ERROR, message=reason)
        command = " ".join(filter(None, [parser.prog, getattr(args, "command", None)]))
        print(f"{command}: {prefix}{reason}", file=sys.stderr)
    except OSError:
        pass
    return code


def _kept(args: Optional[argparse.Namespace]) -> str:
    """What a stopped command leaves: nothing, unless its parser says otherwise (``set_defaults(on_stop=...)``:
    a training run keeps its last checkpoint)."""
    return getattr(args, "on_stop", None) or "no partial output was kept"


SEGMENT_COMMANDS = [add_segment_parser, add_info_parser]


def main(argv: Optional[List[str]] = None) -> int:
    return run_command(make_parser(SEGMENT_COMMANDS), argv)


if __name__ == "__main__":
    sys.exit(main())
