"""The package's structure: imports run one way (the algorithm core knows nothing of the
exporter, the engines or the runtime; the runtime does not load the exporter), and the
dependencies declared in pyproject.toml are the ones the code imports."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import subprocess
import sys
import tomllib
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
#: The algorithm core (configs, errors, alignment, plan, FWT, DPS, the edit, LocalBlend, the
#: controllers, geometry, batch layouts, the exporter/runtime contract).
CORE = {
    f"adapedit.{m}"
    for m in (
        *("config", "errors", "alignment", "plan", "fwt", "dps", "edit", "blend"),
        *("controller", "geometry", "layout", "spec"),
    )
}
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


def test_the_core_imports_nothing_from_export_engines_or_runtime():
    assert set(MODULES) >= CORE
    for name in CORE:
        upward = {
            m
            for m in IMPORTS[name]
            if any(
                _within(m, p) for p in ("adapedit.export", "adapedit.engines", "adapedit.runtime")
            )
        }
        assert not upward, f"{name} imports {upward}"


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
