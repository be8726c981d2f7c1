"""The house's floors, read from the source: who may import whom, no circle, no room too large.

    common/                     the ground floor: imports nothing of the project
    export/ engine/ runtime/    the layers: import the ground floor and each other (runtime never export)
    zimage_trt/                 the app (CLI, server, bench, parity, Ray): on top, imported by nothing below

Imports inside functions count too: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# installed package name -> folder (pyproject.toml's package-dir)
PACKAGES = {
    "zimage_trt.common": "common",
    "zimage_trt.export": "export",
    "zimage_trt.engine": "engine",
    "zimage_trt.runtime": "runtime",
    "zimage_trt.calibration": "calibration",
    "zimage_trt": "zimage_trt",
}
LAYERS = ("zimage_trt.export", "zimage_trt.engine", "zimage_trt.runtime")
MAX_LINES = 450


def package_of(module: str) -> str:
    """The project package a module belongs to (the longest name of PACKAGES it starts with)."""
    return max((p for p in PACKAGES if module == p or module.startswith(p + ".")), key=len)


def project_modules() -> dict[str, Path]:
    modules = {}
    for package, folder in PACKAGES.items():
        for path in sorted((ROOT / folder).glob("*.py")):
            name = package if path.stem == "__init__" else f"{package}.{path.stem}"
            modules[name] = path
    return modules


def imports_of(module: str, path: Path) -> set[str]:
    """The project modules `module` imports, absolute or relative, at the top or inside functions."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.stem == "__init__" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(parent + ([base] if base else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        found.update(n for n in names if n == "zimage_trt" or n.startswith("zimage_trt."))
    modules = project_modules()
    return {n for n in found if n in modules and n != module}


def graph() -> dict[str, set[str]]:
    return {m: imports_of(m, p) for m, p in project_modules().items()}


def test_ground_floor_imports_nothing_above_it():
    for module, deps in graph().items():
        if package_of(module) == "zimage_trt.common":
            above = {d for d in deps if package_of(d) != "zimage_trt.common"}
            assert not above, f"{module} imports {sorted(above)}"


def test_layers_never_import_the_app():
    app = "zimage_trt"
    for module, deps in graph().items():
        if package_of(module) in LAYERS:
            upward = {d for d in deps if package_of(d) == app}
            assert not upward, f"{module} imports the app's {sorted(upward)}"


def test_runtime_imports_no_export_code():
    for module, deps in graph().items():
        if package_of(module) == "zimage_trt.runtime":
            assert not {d for d in deps if package_of(d) == "zimage_trt.export"}, module


def test_no_circle():
    edges = graph()
    for module in edges:
        # a module reachable from itself sits on a circle
        seen, todo = set(), list(edges[module])
        while todo:
            m = todo.pop()
            assert m != module, f"{module} imports itself through a circle"
            if m not in seen:
                seen.add(m)
                todo.extend(edges.get(m, ()))


def test_no_code_file_over_the_limit():
    long = {str(p.relative_to(ROOT)): n for p in project_modules().values() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"files over {MAX_LINES} lines: {long}"
