"""Packaging: the module's CMakeLists lists every file Slicer needs, and the extension descriptions agree."""

import importlib.metadata
import json
import re
import subprocess
import sys
from pathlib import Path

import SimpleITK as sitk

from CDMSegmentLib.core.engine import ONNX_REQUIREMENTS

ROOT = Path(__file__).resolve().parent.parent
MODULE = ROOT / "CDMSegment"


def _module_files():
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "."], cwd=MODULE,
                            capture_output=True, text=True, check=True).stdout.split()
    return {f for f in listed if f != "CMakeLists.txt" and (MODULE / f).is_file()}


def test_module_cmakelists_lists_every_resource():
    """Every file under Resources/ ships; the scripts are checked against the imports in test_layering.py."""
    text = (MODULE / "CMakeLists.txt").read_text(encoding="utf-8").replace("${MODULE_NAME}", "CDMSegment")
    listed = set(re.findall(r"^\s+(Resources/\S*\.\w+)\s*$", text, re.M))
    assert listed == {f for f in _module_files() if f.startswith("Resources/")}
    assert "CDMSegment.py" in re.findall(r"^\s+(\S+\.py)\s*$", text, re.M)
    assert "slicer_add_python_unittest(SCRIPT CDMSegment.py)" in text


def test_extension_metadata_agrees_across_cmake_s4ext_and_catalog_entry():
    cmake = (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    s4ext = dict(line.split(" ", 1) for line in (ROOT / "CDMSegment.s4ext").read_text(encoding="utf-8").splitlines()
                 if line and not line.startswith("#"))
    entry = json.loads((ROOT / "CDMSegment.json").read_text(encoding="utf-8"))
    assert entry["$schema"].endswith("slicer-extension-catalog-entry-schema-v1.0.1.json#")
    assert set(entry) <= {"$schema", "build_dependencies", "build_subdirectory", "category", "scm_revision",
                          "scm_type", "scm_url", "tier"}
    assert 'set(EXTENSION_DEPENDS "PyTorch")' in cmake and s4ext["depends"] == "PyTorch"
    assert entry["build_dependencies"] == ["PyTorch"]
    assert f'set(EXTENSION_CATEGORY "{entry["category"]}")' in cmake and s4ext["category"] == entry["category"]
    assert s4ext["scmurl"] == entry["scm_url"]
    assert "add_subdirectory(CDMSegment)" in cmake


def test_the_catalog_entry_is_written_as_the_extensions_index_formatter_writes_it():
    """The Extensions Index's pre-commit runs prettier 3.5.3 with prettier-plugin-multiline-arrays at wrap threshold
    0 (its .prettierrc.js): two-space indent, every array one item per line, LF endings, a final newline. That is
    json.dumps(indent=2)'s layout (checked against prettier's own output for this file and TotalSegmentator.json)."""
    text = (ROOT / "CDMSegment.json").read_bytes().decode("utf-8")
    assert text == json.dumps(json.loads(text), indent=2) + "\n"
    assert "\r" not in text and "\t" not in text


def test_the_license_is_the_bsd_3_clause_license_pyproject_names():
    """The Extensions Index refuses a repository without a license file at its root (LICENSE is one it looks for)."""
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert text.startswith("BSD 3-Clause License\n\nCopyright (c) 2026, the CDMSegment authors\n")
    assert "Neither the name of the copyright holder nor the names of its" in text
    # an SPDX expression (PEP 639), as the installed package's metadata says it
    assert 'license = "BSD-3-Clause"' in (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert importlib.metadata.metadata("cdmsegment")["License-Expression"] == "BSD-3-Clause"


def test_the_screenshot_and_icon_urls_point_at_files_in_this_repository():
    cmake = (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    s4ext = dict(line.split(" ", 1) for line in (ROOT / "CDMSegment.s4ext").read_text(encoding="utf-8").splitlines()
                 if line and not line.startswith("#"))
    prefix = s4ext["scmurl"].replace("https://github.com/", "https://raw.githubusercontent.com/").removesuffix(".git")
    for key, variable in (("iconurl", "EXTENSION_ICONURL"), ("screenshoturls", "EXTENSION_SCREENSHOTURLS")):
        url = s4ext[key]
        assert f'set({variable} "{url}")' in cmake
        assert url.startswith(f"{prefix}/{s4ext['scmrevision']}/")
        path = ROOT / url.split(f"/{s4ext['scmrevision']}/", 1)[1]
        assert path.is_file() and path.suffix == ".png" and path.stat().st_size < 500_000


def test_icons_are_small_rgba_pngs():
    for path in (MODULE / "Resources" / "Icons" / "CDMSegment.png", ROOT / "Resources" / "CDMSegment.png"):
        image = sitk.ReadImage(str(path))
        assert image.GetSize() == (128, 128) and image.GetNumberOfComponentsPerPixel() == 4
        assert path.stat().st_size < 20_000


def test_the_module_loads_in_a_slicer_without_torch():
    """Slicer imports CDMSegment.py at startup, before the PyTorch extension has installed torch: the module
    must load (the panel then offers the install) instead of failing with an ImportError."""
    code = ("import sys; sys.modules['torch'] = None; sys.path.insert(0, sys.argv[1]); import CDMSegment; "
            "print(sorted(n for n in vars(CDMSegment) if n.startswith('CDMSegment')))")
    result = subprocess.run([sys.executable, "-c", code, str(MODULE)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "'CDMSegmentLogic'" in result.stdout and "'CDMSegmentWidget'" in result.stdout


def test_reload_makes_the_core_import_again_from_disk():
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import CDMSegment, CDMSegmentLib.slicer_adapters.mrml as m; "
            "CDMSegment.forgetLibraryModules(); "
            "assert not [n for n in sys.modules if n.startswith('CDMSegmentLib')]; "
            "import CDMSegmentLib.slicer_adapters.mrml as again; print(again is not m)")
    result = subprocess.run([sys.executable, "-c", code, str(MODULE)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "True"


def test_the_fast_extra_installs_what_the_panels_onnx_runtime_button_installs():
    """One list of requirements (core.engine.ONNX_REQUIREMENTS) for `pip install cdmsegment[fast]` and the panel's
    Install ONNX Runtime button; the test extra has them too, for the engine's tests."""
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")  # tomllib is Python 3.11+; the extras are JSON lists
    extras = {name: json.loads(value) for name, value in re.findall(r'^(fast|test) = (\[.*\])$', text, re.M)}
    assert extras["fast"] == list(ONNX_REQUIREMENTS)
    assert set(ONNX_REQUIREMENTS) <= set(extras["test"])
