"""The oldest Slicer the extension supports is stated once (CMake's find_package(Slicer X.Y)), repeated in the
README, and kept true: the code Slicer runs calls no API newer than it and parses with that Slicer's Python.

The table lists the Slicer APIs known to be newer than some supported release, each with the first release
that has it, read from Slicer's source at its release tags (v5.6.2, v5.8.1, v5.10.0, v5.12.0, main):
vtkSegment's terminology accessors appear in vtkSegment.h at 5.10; the rest in Base/Python/slicer/util.py and
Modules/Scripted/SampleData/SampleData.py."""

import ast
import re
from pathlib import Path

import pytest

from test_layering import _cmake_scripts

ROOT = Path(__file__).resolve().parent.parent
MODULE = ROOT / "CDMSegment"

# Called attribute or function name -> first Slicer release that has it.
NEWER_CALLS = {
    "SetTerminology": (5, 10), "GetTerminology": (5, 10), "HasTerminology": (5, 10),
    "registerUrlRewriteRule": (5, 10), "rewriteUrl": (5, 10),
    "registerCustomSampleDataCategory": (5, 12), "executePythonModule": (5, 12),
}
# (function, keyword) -> first Slicer release that takes the keyword.
NEWER_KEYWORDS = {
    ("launchConsoleProcess", "blocking"): (5, 12), ("launchConsoleProcess", "logCallback"): (5, 12),
    ("launchConsoleProcess", "completedCallback"): (5, 12), ("logProcessOutput", "logCallback"): (5, 12),
}
NEWER_MODULES = {"slicer.packaging": (5, 12)}
# The Python inside each Slicer release (Slicer_REQUIRED_PYTHON_VERSION in its CMake).
SLICER_PYTHON = {(5, 6): (3, 9), (5, 8): (3, 9), (5, 10): (3, 12), (5, 12): (3, 12)}


def slicer_floor():
    """(major, minor) from the top-level CMakeLists.txt's find_package(Slicer X.Y REQUIRED)."""
    found = re.search(r"find_package\(Slicer (\d+)\.(\d+) REQUIRED\)", (ROOT / "CMakeLists.txt").read_text(encoding="utf-8"))
    assert found, "CMakeLists.txt must state the minimum Slicer: find_package(Slicer X.Y REQUIRED)"
    return int(found.group(1)), int(found.group(2))


def _called_name(call: ast.Call) -> str:
    return call.func.attr if isinstance(call.func, ast.Attribute) else getattr(call.func, "id", "")


def newer_apis(source: str, floor) -> list:
    """'name (Slicer X.Y)' for every call, keyword or import in ``source`` that the floor release lacks."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call):
            name = _called_name(node)
            if NEWER_CALLS.get(name, floor) > floor:
                found.append(f"{name} (Slicer {'.'.join(map(str, NEWER_CALLS[name]))})")
            for keyword in node.keywords:
                first = NEWER_KEYWORDS.get((name, keyword.arg), floor)
                if first > floor:
                    found.append(f"{name}({keyword.arg}=...) (Slicer {'.'.join(map(str, first))})")
        modules = []
        if isinstance(node, ast.Import):
            modules = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            modules = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        found += [f"{m} (Slicer {'.'.join(map(str, NEWER_MODULES[m]))})" for m in modules
                  if NEWER_MODULES.get(m, floor) > floor]
    return found


def _slicer_runs():
    return [MODULE / "CDMSegment.py"] + [MODULE / p for p in sorted(_cmake_scripts())]


def test_the_floor_is_the_one_the_readme_states():
    major, minor = slicer_floor()
    assert (major, minor) in SLICER_PYTHON
    for statement in ("README.md", "CDMSegment.s4ext"):  # the catalog entry's schema has no field for it
        assert f"Slicer {major}.{minor} or newer" in (ROOT / statement).read_text(encoding="utf-8"), statement


@pytest.mark.parametrize("path", _slicer_runs(), ids=lambda p: str(p.relative_to(MODULE)))
def test_the_code_slicer_runs_calls_no_api_newer_than_the_floor(path):
    assert newer_apis(path.read_text(encoding="utf-8"), slicer_floor()) == []


@pytest.mark.parametrize("path", _slicer_runs(), ids=lambda p: str(p.relative_to(MODULE)))
def test_the_code_slicer_runs_parses_with_the_floors_python(path):
    """Syntax of the floor's Python (3.9 for Slicer 5.6), and no `X | None` annotation evaluated at import."""
    python = SLICER_PYTHON[slicer_floor()]
    source = path.read_text(encoding="utf-8")
    tree = ast.parse(source, feature_version=python)
    if python < (3, 10) and "from __future__ import annotations" not in source:
        annotations = [n.annotation for n in ast.walk(tree) if isinstance(n, (ast.arg, ast.AnnAssign)) and n.annotation]
        annotations += [n.returns for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.returns]
        unions = [ast.unparse(a) for a in annotations
                  if any(isinstance(b, ast.BinOp) and isinstance(b.op, ast.BitOr) for b in ast.walk(a))]
        assert unions == [], f"Python {python[0]}.{python[1]} cannot evaluate {unions}"


def test_the_scan_finds_each_known_newer_api():
    source = ("segment.SetTerminology(entry)\nsegment.GetTerminology()\nsegment.HasTerminology()\n"
              "SampleData.SampleDataLogic.registerCustomSampleDataCategory('CDMSegment')\n"
              "slicer.util.launchConsoleProcess(args, blocking=False)\nimport slicer.packaging\n")
    found = newer_apis(source, (5, 6))
    assert sorted(found) == sorted(["SetTerminology (Slicer 5.10)", "GetTerminology (Slicer 5.10)", "HasTerminology (Slicer 5.10)",
                     "registerCustomSampleDataCategory (Slicer 5.12)",
                     "launchConsoleProcess(blocking=...) (Slicer 5.12)", "slicer.packaging (Slicer 5.12)"])
    assert newer_apis(source, (5, 12)) == []
    assert newer_apis("segment.SetTag(segment.GetTerminologyEntryTagName(), entry)", (5, 6)) == []
