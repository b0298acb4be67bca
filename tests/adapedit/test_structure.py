"""The package's structure: imports run one way (the algorithm core knows nothing of the
exporter, the engines or the runtime; the runtime does not load the exporter), and the
dependencies declared in pyproject.toml are the ones the code imports."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
#: import name → folder, as setuptools' package-dir maps them
PACKAGES = {
    "adapedit": ROOT / "adapedit",
    "adapedit.export": ROOT / "export",
    "adapedit.engines": ROOT / "engines",
    "adapedit.runtime": ROOT / "runtime",
}
#: The algorithm core: the equations (``adapedit.algorithm``), the torch wiring that applies
#: them (``adapedit.pipelines``) and what every layer shares (configs, errors, the
#: exporter/runtime contract).
CORE = ("adapedit.algorithm", "adapedit.pipelines", "adapedit.config", "adapedit.errors")
CORE_FILES = ("adapedit.spec",)
#: What the equations may import from the project: each other, the configs and the errors.
ALGORITHM_MAY_IMPORT = ("adapedit.algorithm", "adapedit.config", "adapedit.errors")
#: The app: the command line and the demo, which may use every layer and which none may use.
APP = ("adapedit.cli", "adapedit.demo")
#: Dependencies that the code needs at run time without importing them by name.
USED_INDIRECTLY = {
    "onnxscript": "torch.onnx.export(dynamo=True) translates with it",
    "safetensors": "diffusers/transformers read the shapes model's .safetensors with it",
}


def _modules() -> dict[str, Path]:
    out = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([package, *parts])] = path
    return out


def _imports(name: str, path: Path) -> set[str]:
    """Every module imported anywhere in the file (lazy imports included), absolute."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")[: -node.level]
                found.add(".".join([*base, node.module] if node.module else base))
            else:
                found.add(node.module)
    return found


MODULES = _modules()
IMPORTS = {name: _imports(name, path) for name, path in MODULES.items()}


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _core(name: str) -> bool:
    return name in CORE_FILES or any(_within(name, p) for p in CORE)


def test_the_core_imports_nothing_from_export_engines_runtime_or_the_app():
    core = [name for name in MODULES if _core(name)]
    assert {"adapedit.algorithm.edit", "adapedit.pipelines.controller", "adapedit.spec"} <= {*core}
    for name in core:
        upward = {
            m
            for m in IMPORTS[name]
            if any(
                _within(m, p)
                for p in ("adapedit.export", "adapedit.engines", "adapedit.runtime", *APP)
            )
        }
        assert not upward, f"{name} imports {upward}"


def test_the_equations_import_only_each_other_the_configs_and_the_errors():
    equations = [name for name in MODULES if _within(name, "adapedit.algorithm")]
    assert len(equations) >= 9
    for name in equations:
        project = {m for m in IMPORTS[name] if _within(m, "adapedit")}
        bad = {m for m in project if not any(_within(m, p) for p in ALGORITHM_MAY_IMPORT)}
        assert not bad, f"{name} imports {bad}"
        models = {m for m in IMPORTS[name] if m.split(".")[0] in ("diffusers", "transformers")}
        assert not models, f"{name} imports {models}: the equations know no model library"


def test_every_package_folder_is_declared_in_pyproject():
    """A folder Python can import, code (an ``__init__.py``) or data (files in a folder named
    like a module: the model files, the page), missing from ``[tool.setuptools] packages`` is
    left out of a wheel (``pip install .``), though an editable install still finds it
    (setuptools warns of such data folders now and will drop them)."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = {
        ".".join([package, *d.relative_to(folder).parts])
        for package, folder in PACKAGES.items()
        for d in [folder, *folder.rglob("*")]
        if d.is_dir()
        and all(part.isidentifier() for part in d.relative_to(folder).parts)
        and "__pycache__" not in d.parts
        and any(f.is_file() for f in d.rglob("*"))
    }
    assert set(setuptools["packages"]) == found
    assert setuptools["package-dir"] == {p: str(f.relative_to(ROOT)) for p, f in PACKAGES.items()}


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        ("adapedit.export", ("adapedit.engines", "adapedit.runtime")),
        ("adapedit.engines", ("adapedit.export", "adapedit.runtime")),
        ("adapedit.runtime", ("adapedit.export",)),
    ],
)
def test_plumbing_layers_import_one_way(package, forbidden):
    for name, imports in IMPORTS.items():
        if _within(name, package):
            bad = {m for m in imports if any(_within(m, f) for f in forbidden)}
            assert not bad, f"{name} imports {bad}"


@pytest.mark.slow
def test_the_wheel_holds_every_module_and_data_file(tmp_path):
    """What ``pip install .`` installs (a wheel, not the editable install the tests run on):
    every module of every package at its import path, the tokenizer, the shapes model and the
    page's files. Built from a clean copy of the sources, so that no build/ folder is written
    into the checkout."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for folder in PACKAGES.values():
        shutil.copytree(folder, src / folder.name, ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
    subprocess.run(
        [*pip, "--no-index", "-w", str(tmp_path / "dist"), str(src)],
        check=True,
        capture_output=True,
    )
    (wheel,) = (tmp_path / "dist").glob("adapedit-*.whl")
    held = set(zipfile.ZipFile(wheel).namelist())
    expected = {
        "/".join(["adapedit", *package.split(".")[1:], path.name])
        for name, path in MODULES.items()
        for package in [name if path.name == "__init__.py" else name.rpartition(".")[0]]
    }
    missing = expected - held
    assert not missing, f"modules left out of the wheel: {sorted(missing)}"
    data = [
        *(p for p in (ROOT / "adapedit" / "data").rglob("*") if p.is_file()),
        *(ROOT / "runtime" / "static").iterdir(),
    ]
    installed = {
        "adapedit/" + str(p.relative_to(ROOT / "adapedit"))
        if p.is_relative_to(ROOT / "adapedit")
        else "adapedit/" + str(p.relative_to(ROOT))
        for p in data
    }
    assert not installed - held, f"data left out of the wheel: {sorted(installed - held)}"


def test_importing_the_runtime_session_does_not_load_onnx():
    code = (
        "import sys, adapedit.runtime.session; "
        "print(sorted(m for m in sys.modules if m == 'onnx' or m.startswith('onnx.')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout
    assert out.strip() == "[]"


def _normalise(dist: str) -> str:
    return re.sub(r"[-_.]+", "-", dist).lower()


def _requirement_name(req: str) -> str:
    return _normalise(re.split(r"[\s<>=!~;\[]", req, maxsplit=1)[0])


def _third_party(module: str) -> str | None:
    top = module.split(".")[0]
    if top in sys.stdlib_module_names or top in ("adapedit", "__future__"):
        return None
    return top


def test_declared_dependencies_match_the_imports():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = {_requirement_name(r) for r in project["dependencies"]}
    extras = {
        _requirement_name(r) for reqs in project["optional-dependencies"].values() for r in reqs
    }
    dists = importlib.metadata.packages_distributions()
    imported: dict[str, set[str]] = {}
    for name, imports in IMPORTS.items():
        for m in imports:
            top = _third_party(m)
            if top is None:
                continue
            # an installed module names its distribution; one that is not installed here
            # (an optional backend) is looked up under its own name
            for dist in dists.get(top, [top]):
                imported.setdefault(_normalise(dist), set()).add(name)
    undeclared = {
        d: sorted(mods)
        for d, mods in imported.items()
        if d not in core | extras
        # a module provided by several distributions (onnxruntime / onnxruntime-gpu): one
        # of them declared is enough
        and not any(_normalise(o) in core | extras for o in _providers(d, dists))
    }
    assert not undeclared, f"imported but not declared in pyproject.toml: {undeclared}"
    unused = core - set(imported) - set(USED_INDIRECTLY)
    assert not unused, f"declared but imported nowhere: {sorted(unused)}"


def _providers(dist: str, dists: dict[str, list[str]]) -> set[str]:
    """Every distribution that provides a module that ``dist`` provides."""
    tops = {t for t, ds in dists.items() if dist in map(_normalise, ds)}
    return {d for t in tops for d in dists[t]}
