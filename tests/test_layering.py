"""Import rules of DESIGN.md, read from the source (AST): scripts are thin and independent, and
dataset/ uses nothing of model/ but the image codec."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENTRY_POINTS = ("scripts", "inference", "train")
# importlib / runpy calls that load a module from a file or by name at run time
DYNAMIC_LOADERS = {"spec_from_file_location", "module_from_spec", "exec_module", "import_module",
                   "run_path", "run_module", "__import__"}  # fmt: skip


# The file layer that training data and inference share.
ALLOWED_FOR_DATASET = ("model.io.images", "model.io.file_lists", "model.io.ranks")


def _imports(tree: ast.AST) -> list[tuple[str, list[str]]]:
    """(module, imported names) of every import; relative imports as '.module'."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = "." * node.level + (node.module or "")
            found.append((module, [alias.name for alias in node.names]))
    return found


def script_violations(source: str) -> list[str]:
    """What a script does that DESIGN.md forbids: import another script or an entry point,
    load a module dynamically, or read argparse's private `_actions`."""
    tree = ast.parse(source)
    problems = []
    for module, names in _imports(tree):
        top = module.split(".")[0]
        if module.startswith(".") or top in ENTRY_POINTS:
            problems.append(f"imports {module}")
        if module in ("importlib.util", "runpy") or (module == "importlib" and "util" in names):
            problems.append(f"imports {module} {names}")  # `importlib.metadata` is fine
    for node in ast.walk(tree):
        name = node.attr if isinstance(node, ast.Attribute) else getattr(node, "id", None)
        if name in DYNAMIC_LOADERS:
            problems.append(f"uses {name}")
        if name == "_actions":
            problems.append("reads argparse's _actions")
    return problems


def model_imports_of_dataset_module(source: str) -> list[str]:
    """The model/ modules a dataset/ module imports, other than the image codec and file lists."""
    bad = []
    for module, names in _imports(ast.parse(source)):
        if module.split(".")[0] != "model" or module in ALLOWED_FOR_DATASET:
            continue
        if module == "model.io" and set(names) <= {"images", "file_lists", "ranks"}:
            continue
        bad.append(module if names == [] else f"{module} ({', '.join(names)})")
    return bad


@pytest.mark.parametrize(
    "source",
    [
        "from scripts import evaluate",
        "import scripts.make_testset as mt",
        "from . import evaluate",
        "import inference",
        "from train import main",
        "import importlib.util\nspec = importlib.util.spec_from_file_location('x', 'inference.py')",
        "import importlib\nm = importlib.import_module('inference')",
        "from importlib import util",
        "from importlib.util import spec_from_file_location",
        "import runpy",
        "flags = [a for a in parser._actions]",
        "m = __import__('inference')",
    ],
)
def test_the_script_check_catches_each_pattern(source: str) -> None:
    assert script_violations(source)


def test_the_script_check_allows_library_imports() -> None:
    source = "from importlib import metadata\nfrom model.eval.scoring import evaluate\n"
    assert script_violations(source + "import dataset.testsets\nimport argparse\n") == []


def test_no_script_imports_another_script_or_an_entry_point() -> None:
    scripts = sorted((ROOT / "scripts").glob("*.py"))
    assert len(scripts) > 5
    found = {p.name: script_violations(p.read_text(encoding="utf-8")) for p in scripts}
    assert {name: problems for name, problems in found.items() if problems} == {}


def test_dataset_imports_only_the_image_codec_from_model() -> None:
    assert model_imports_of_dataset_module("from model.train.instantiate import instantiate")
    assert model_imports_of_dataset_module("import model.pipelines")
    assert not model_imports_of_dataset_module("from model.io.images import read_image")
    modules = sorted((ROOT / "dataset").rglob("*.py"))
    assert any(p.name == "testsets.py" for p in modules)
    found = {p.name: model_imports_of_dataset_module(p.read_text()) for p in modules}
    assert {name: bad for name, bad in found.items() if bad} == {}


def test_the_library_never_imports_dataset_scripts_or_entry_points() -> None:
    found = {}
    for path in sorted((ROOT / "model").rglob("*.py")):
        tops = {module.split(".")[0] for module, _ in _imports(ast.parse(path.read_text()))}
        bad = tops & {"dataset", *ENTRY_POINTS}
        if bad:
            found[str(path.relative_to(ROOT))] = sorted(bad)
    assert found == {}


def test_no_library_or_script_file_grows_past_500_lines() -> None:
    # ~400 is the aim; model/pipelines/diffbir.py and scripts/benchmark.py are the two files
    # above 450.
    files = [*(ROOT / "model").rglob("*.py"), *(ROOT / "dataset").rglob("*.py"),
             *(ROOT / "scripts").glob("*.py"), ROOT / "inference.py", ROOT / "train.py"]  # fmt: skip
    lengths = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in files}
    assert {name: n for name, n in lengths.items() if n > 500} == {}


def test_importing_the_pipelines_package_has_no_side_effects() -> None:
    import subprocess
    import sys

    code = (
        "import logging, sys; import model.pipelines; "
        "assert not logging.getLogger().handlers; "
        "assert 'gradio' not in sys.modules and 'pytorch_lightning' not in sys.modules"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
