"""``cdmsegment segment-cohort``: many cases, spread over the processes of ``torchrun``, one summary at the end.

Each case is segmented exactly as ``cdmsegment segment`` does it (``segment_files``, the same
defaults), so its outputs are the same files whichever process ran it: the noise is drawn from
(seed, slice), never from the rank. Under torchrun, rank r takes cases r, r + W, r + 2W, ...
and runs on its own GPU (``cuda:LOCAL_RANK``) or on the CPU; the ranks' rows are gathered
(gloo on CPUs, NCCL on GPUs) and rank 0 writes ``cohort_summary.csv`` and prints one line.
A case that fails is a row with its error, never a hung cohort; the exit status is then 1.

    torchrun --nproc_per_node=4 -m CDMSegmentLib.cli.main segment-cohort a.nii.gz b.nii.gz ... -o out
"""

import csv
import io
import os
import sys
import time
from pathlib import Path
from typing import List, Sequence

from ..core.errors import CDMSegmentError
from ..core.engine import ENGINES
from ..core.ranges import option
from .segment_command import ENGINE_HELP, SEED_HELP

SUMMARY_FILE = "cohort_summary.csv"
COLUMNS = ("case", "inputs", "slices_total", "slices_run", "voxels_segmented", "volume_ml", "seconds", "device",
           "rank", "error")


def add_segment_cohort_parser(sub) -> None:
    p = sub.add_parser("segment-cohort", help="segment many cases, one process per GPU (or CPU) under torchrun")
    p.add_argument("cases", nargs="*", metavar="CASE",
                   help="one case: an image file, or one file per model modality joined by commas")
    p.add_argument("--list", type=Path, default=None, metavar="FILE", help="more cases, one CASE per line")
    p.add_argument("-o", "--output", required=True, type=Path, metavar="OUTDIR",
                   help="folder for every case's heatmap and .seg.nrrd (as 'cdmsegment segment' names them) and "
                        "cohort_summary.csv")
    p.add_argument("--model", default=None, help="registered model name or model file (default: the registry's default model)")
    p.add_argument("--device", default="auto", help="auto (each rank's own CUDA GPU when there is one), cpu or cuda")
    p.add_argument("--batch-size", type=option("batch_size"), default=None, help="slices per network batch (default: per device)")
    p.add_argument("--engine", default="auto", choices=ENGINES, help=ENGINE_HELP)
    p.add_argument("--seed", type=option("seed"), default=0, help=SEED_HELP)
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.set_defaults(func=run_segment_cohort)


def read_cases(cases: Sequence[str], list_file: Path = None) -> List[List[str]]:
    """Each case as its list of input paths; refuses an empty cohort and two cases with one output stem."""
    from .writers import file_stem  # numpy and SimpleITK: imported once the command runs, as torch is
    lines = list(cases)
    if list_file is not None:
        if not list_file.is_file():
            raise CDMSegmentError(f"case list {list_file} does not exist")
        lines += [line.strip() for line in list_file.read_text().splitlines() if line.strip()]
    if not lines:
        raise CDMSegmentError("no cases given; name image files or give --list FILE")
    parsed = [line.split(",") for line in lines]
    stems = [file_stem(c[0]) for c in parsed]
    repeated = sorted({s for s in stems if stems.count(s) > 1})
    if repeated:
        raise CDMSegmentError(f"two cases would write the same outputs ({repeated[0]}); give their files distinct names")
    return parsed


def _rank_and_world():
    """(rank, world size, local rank) from torchrun's environment, with the process group started once."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return 0, 1, 0
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))


def _device(requested: str, local_rank: int) -> str:
    import torch

    if requested in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{local_rank}"
    return requested


def segment_cohort(cases: List[List[str]], output_dir: Path, *, rank: int = 0, world: int = 1, device: str = "auto",
                   log=print, **options) -> List[dict]:
    """This rank's share of ``cases`` (every ``world``-th from ``rank``): one summary row per case. No case's
    output may replace any case's input (one case's heatmap can be named as another's image)."""
    from .segment_files import segment_files
    from .writers import file_stem

    every_input = [p for c in cases for p in c]
    rows = []
    for index in range(rank, len(cases), world):
        inputs = cases[index]
        row = {"case": file_stem(inputs[0]), "inputs": ",".join(inputs), "rank": rank, "error": ""}
        start = time.perf_counter()
        try:
            s = segment_files(inputs, output_dir, device=device, log=log, keep=every_input, **options)
            row.update(slices_total=s.slices_total, slices_run=s.slices_run, voxels_segmented=s.voxels_segmented,
                       volume_ml=f"{s.volume_ml:.3f}", device=s.device)
        except CDMSegmentError as e:
            row["error"] = str(e)
        row["seconds"] = f"{time.perf_counter() - start:.2f}"
        log(f"[rank {rank}] {row['case']}: {row['error'] or 'done'}")
        rows.append(row)
    return rows


def summary_csv(rows: List[dict], case_order: List[str]) -> str:
    """The cohort's rows in the order the cases were given, as CSV text."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=COLUMNS, restval="")
    writer.writeheader()
    for row in sorted(rows, key=lambda r: case_order.index(r["case"])):
        writer.writerow(row)
    return out.getvalue()


def run_segment_cohort(args) -> None:
    from .writers import check_not_existing, check_not_inputs, file_stem

    cases = read_cases(args.cases, args.list)
    summary = args.output / SUMMARY_FILE
    check_not_inputs([summary], [p for c in cases for p in c] + ([args.list] if args.list else []))
    check_not_existing([summary], args.overwrite)
    rank, world, local_rank = _rank_and_world()
    start = time.perf_counter()
    rows = segment_cohort(cases, args.output, rank=rank, world=world, device=_device(args.device, local_rank),
                          model=args.model, batch_size=args.batch_size, engine=args.engine, seed=args.seed,
                          overwrite=args.overwrite,
                          log=lambda m: print(m, file=sys.stderr))
    if world > 1:
        import torch.distributed as dist

        gathered = [None] * world
        dist.all_gather_object(gathered, rows)
        rows = [r for part in gathered for r in part]
        dist.destroy_process_group()
    failed = [r for r in rows if r["error"]]
    if rank == 0:
        args.output.mkdir(parents=True, exist_ok=True)
        tmp = summary.with_name(summary.name + ".partial")
        tmp.write_text(summary_csv(rows, [file_stem(c[0]) for c in cases]))
        tmp.replace(summary)
        print(f"{len(rows) - len(failed)} of {len(rows)} cases segmented on {world} process"
              f"{'es' if world > 1 else ''} in {time.perf_counter() - start:.1f} s: {summary}")
    if failed:
        raise CDMSegmentError(f"{len(failed)} case(s) failed, first {failed[0]['case']}: {failed[0]['error']}")
