"""The architecture, guarded: which package may import which, and what the Slicer module installs.

Every import is read from the source (module level and inside functions alike), so an edge
against the layering fails here however it is written.
"""

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODULE = ROOT / "CDMSegment"
LIB = MODULE / "CDMSegmentLib"

# Which sub-packages each sub-package may import (itself always). One direction: nothing imports
# the command line but the command line, nothing imports evaluation but evaluation and the command line.
ALLOWED = {
    "core": set(),
    "baselines": {"core"},
    "data": {"core"},
    "training": {"core", "data"},
    "evaluation": {"core", "baselines", "data"},
    "cli": {"core", "baselines", "data", "training", "evaluation"},
    "slicer_adapters": {"core"},
}
# The method registry builds a baseline only when one is asked for, so the core runs without them.
LAZY_EDGES = {("core.methods", "baselines")}
GUI_MODULES = {"qt", "ctk", "PythonQt"}
SLICER_MODULES = {"slicer", "vtk", "mrml", "vtkSegmentationCorePython"}
OPTIONAL_LIBRARIES = ["nilearn", "matplotlib", "pytorch_grad_cam", "sklearn", "pytest", "onnx", "onnxruntime"]


def _module_name(path: Path) -> str:
    parts = path.relative_to(LIB).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path):
    """(imported CDMSegmentLib module or package, e.g. 'core.runner'; top-level foreign modules; at module level?)."""
    name = _module_name(path) if path.is_relative_to(LIB) else ""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top_level = {id(node) for node in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            elif (node.module or "").startswith("CDMSegmentLib"):
                target = node.module.removeprefix("CDMSegmentLib").lstrip(".")
            else:
                yield None, node.module.split(".")[0], id(node) in top_level
                continue
            if node.module is None or (LIB / target.replace(".", "/")).is_dir():
                for alias in node.names:  # `from . import x` or `from ..core import x`: x may be a module
                    candidate = f"{target}.{alias.name}".lstrip(".")
                    is_module = (LIB / (candidate.replace(".", "/") + ".py")).is_file()
                    yield (candidate if is_module else target), None, id(node) in top_level
            else:
                yield target, None, id(node) in top_level
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("CDMSegmentLib."):
                    yield alias.name.removeprefix("CDMSegmentLib."), None, id(node) in top_level
                else:
                    yield None, alias.name.split(".")[0], id(node) in top_level


def _library_files():
    return sorted(p for p in LIB.rglob("*.py") if "__pycache__" not in p.parts)


def test_every_module_sits_in_a_sub_package_and_each_package_says_what_it_holds():
    loose = [p.name for p in LIB.glob("*.py") if p.name != "__init__.py"]
    assert loose == []
    packages = {p.parent.name for p in _library_files() if p.parent != LIB}
    assert packages == set(ALLOWED)
    for package in packages:
        assert ast.get_docstring(ast.parse((LIB / package / "__init__.py").read_text(encoding="utf-8")))
    overview = ast.get_docstring(ast.parse((LIB / "__init__.py").read_text(encoding="utf-8")))
    assert all(f"``{package}``" in overview for package in packages), "the package map names every sub-package"


def test_imports_follow_the_layering():
    wrong = []
    for path in _library_files():
        if path.parent == LIB:
            continue
        name = _module_name(path)
        package = name.split(".")[0]
        for target, foreign, top_level in _imports(path):
            if foreign is not None:
                if foreign in GUI_MODULES or (foreign in SLICER_MODULES and package != "slicer_adapters"):
                    wrong.append(f"{name} imports {foreign}")
                continue
            other = target.split(".")[0]
            if other == package or other in ALLOWED[package]:
                continue
            if (name, other) in LAZY_EDGES and not top_level:
                continue
            wrong.append(f"{name} imports {target}" + ("" if top_level else " (inside a function)"))
    assert wrong == []


def test_the_layering_check_sees_imports_inside_functions(tmp_path, monkeypatch):
    """The walker must not miss a function-level import: a planted one is reported."""
    planted = tmp_path / "planted.py"
    planted.write_text("def f():\n    from ..training.train import TrainConfig\n    from . import runner\n")
    monkeypatch.setattr(sys.modules[__name__], "LIB", tmp_path)
    (tmp_path / "training").mkdir()
    (tmp_path / "training" / "train.py").write_text("")
    (tmp_path / "core").mkdir()
    (tmp_path / "core" / "runner.py").write_text("")
    moved = tmp_path / "core" / "planted.py"
    shutil.move(planted, moved)
    found = sorted((t, top) for t, _, top in _imports(moved))
    assert found == [("core.runner", False), ("training.train", False)]


def _child_entry() -> Path:
    """The file of the module the Slicer adapters start in a child process (``python -m <SEGMENT_ENTRY>``):
    it is reached by name, not by an import, so it is read from the launcher's constant."""
    tree = ast.parse((LIB / "slicer_adapters" / "child_process.py").read_text(encoding="utf-8"))
    name = next(node.value.value for node in tree.body if isinstance(node, ast.Assign)
                and any(getattr(t, "id", None) == "SEGMENT_ENTRY" for t in node.targets))
    return LIB.parent.joinpath(*name.split(".")).with_suffix(".py")


def _runtime_closure():
    """Every CDMSegmentLib module the Slicer module can reach from CDMSegment.py and from the child process's
    entry, through imports at module level or inside functions, except the baselines the registry builds on
    request."""
    seen, todo = set(), [MODULE / "CDMSegment.py", _child_entry()]
    while todo:
        path = todo.pop()
        name = _module_name(path) if path.is_relative_to(LIB) else ""
        for target, _, top_level in _imports(path):
            if target is None or (name, target.split(".")[0]) in LAZY_EDGES and not top_level:
                continue
            parts = target.split(".")
            for depth in range(1, len(parts) + 1):  # a module's packages run their __init__ too
                package_init = LIB.joinpath(*parts[:depth], "__init__.py")
                module_file = LIB.joinpath(*parts[:depth]).with_suffix(".py")
                for candidate in (package_init, module_file):
                    if candidate.is_file() and candidate not in seen:
                        seen.add(candidate)
                        todo.append(candidate)
    return {str(p.relative_to(MODULE)) for p in seen} | {"CDMSegmentLib/__init__.py", str(_child_entry().relative_to(MODULE))}


def _cmake_scripts():
    text = (MODULE / "CMakeLists.txt").read_text(encoding="utf-8")
    block = re.search(r"set\(MODULE_PYTHON_SCRIPTS(.*?)\)", text, re.S).group(1)
    return {line.strip() for line in block.splitlines() if line.strip().startswith("CDMSegmentLib/")}


def test_slicer_installs_exactly_what_the_module_runs():
    scripts = _cmake_scripts()
    assert scripts == _runtime_closure()
    assert all((MODULE / s).is_file() for s in scripts)
    assert not any(s.startswith(("CDMSegmentLib/training/", "CDMSegmentLib/data/", "CDMSegmentLib/baselines/"))
                   for s in scripts), "the trainer, the phantom generator and the baselines stay out of Slicer"
    assert "CDMSegmentLib/cli/segment_command.py" in scripts, "the child process's entry is installed"
    assert not any(s.endswith(("training_commands.py", "evaluation_commands.py", "cli/main.py")) for s in scripts)


def test_the_installed_set_imports_alone_without_the_optional_libraries(tmp_path):
    """Copy exactly the CMake list, block nilearn, matplotlib, grad-cam and scikit-learn, and import
    every module: what Slicer installs must not reach for anything it did not install."""
    for script in _cmake_scripts() | {"CDMSegment.py"}:
        (tmp_path / script).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(MODULE / script, tmp_path / script)
    modules = sorted(s.removesuffix(".py").removesuffix("/__init__").replace("/", ".") for s in _cmake_scripts())
    code = ("import importlib, sys\n"
            f"for blocked in {OPTIONAL_LIBRARIES!r}: sys.modules[blocked] = None\n"
            "sys.path = [sys.argv[1]] + [p for p in sys.path[1:] if 'CDMSegment' not in p]\n"
            f"for name in {modules!r} + ['CDMSegment']:\n"
            "    module = importlib.import_module(name)\n"
            "    assert module.__file__.startswith(sys.argv[1]), module.__file__\n"
            "print(len(sys.modules))\n")
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True,
                            timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
