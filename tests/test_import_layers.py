"""The import contract (docs/design.md §2): every module imports only from its own package or from layers below
it, siblings on one layer stay independent, no module imports another inside a function to hide a circle, and
nothing in the package imports the bench tooling. Function-local imports of third-party modules stay allowed
where they are optional or heavy. Read from the source's AST, so it costs no imports."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Top to bottom. A module may import its own package and anything on a lower line; names on one line are
# siblings that do not import each other.
LAYERS = [
    ["bench"],  # tooling: imports the package like a user would
    ["__main__"],
    ["cli"],
    ["stages"],
    ["trainer", "export", "evaluation"],
    ["analysis", "configs"],  # algorithms that need a model and data | typed configs
    ["quantizers", "data"],  # the math | calibration trajectories on disk
    ["denoisers", "model_shapes", "lineage", "cost"],
    ["devices", "distributed_env", "progress"],
    ["files", "version"],
    ["errors"],
]
# The package root re-exports the Python API (quantize_, fit_ranges_, ...); it sits above everything.
ROOT_MODULE = "__init__"
# Function-local imports of qdistill modules are allowed only in the bench tooling, which imports the package as
# a user script would (some of its measurements time or count what an import loads).
LOCAL_IMPORTS_ALLOWED = {"bench"}
PACKAGE_DIRS = ["analysis", "bench", "configs", "data", "evaluation", "export", "quantizers", "stages", "trainer"]


def _unit(module: str) -> str:
    """The layer unit of a dotted module name below qdistill: its subpackage or top-level module."""
    return module.split(".")[0]


def _layer_of(unit: str) -> int:
    for i, names in enumerate(LAYERS):
        if unit in names:
            return i
    raise AssertionError(f"{unit} is in no layer of the import contract: add it to LAYERS")


def _modules():
    for path in sorted(ROOT.glob("*.py")):
        yield path.stem, path
    for folder in PACKAGE_DIRS:
        for path in sorted((ROOT / folder).glob("*.py")):
            yield (folder if path.stem == "__init__" else f"{folder}.{path.stem}"), path


def _imports(module: str, path: Path):
    """(imported module below qdistill, line, inside a function) for every qdistill import of `module`."""
    tree = ast.parse(path.read_text())
    package = module.split(".")[:-1] if path.stem != "__init__" else module.split(".")
    if path.parent == ROOT:
        package = []
    local = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
             for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))}
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - (node.level - 1)] if node.level > 1 else package
                name = ".".join(base + ([node.module] if node.module else []))
                targets = [name] if name else [a.name for a in node.names]  # `from . import x` at the root
            elif node.module and (node.module == "qdistill" or node.module.startswith("qdistill.")):
                name = node.module[len("qdistill."):] if node.module != "qdistill" else ""
                targets = [name] if name else [ROOT_MODULE]
        elif isinstance(node, ast.Import):
            targets = [a.name[len("qdistill."):] for a in node.names if a.name.startswith("qdistill.")]
        for t in targets:
            yield t, node.lineno, id(node) in local


def test_every_import_goes_down_the_layers_and_none_hides_in_a_function():
    problems = []
    for module, path in _modules():
        if module == ROOT_MODULE:
            continue
        unit = _unit(module)
        here = _layer_of(unit)
        for target, line, in_function in _imports(module, path):
            where = f"{path.relative_to(ROOT)}:{line} imports {target or 'qdistill'}"
            if target == ROOT_MODULE:
                problems.append(f"{where}: the package root is the API face; import the module that defines it")
                continue
            other = _unit(target)
            if in_function and unit not in LOCAL_IMPORTS_ALLOWED:
                problems.append(f"{where} inside a function (import qdistill modules at the top)")
            if other == unit:
                continue
            there = _layer_of(other)
            if there < here:
                problems.append(f"{where}: {unit} (layer {here}) imports upward into {other} (layer {there})")
            elif there == here:
                problems.append(f"{where}: {unit} and {other} are siblings on layer {here} and stay independent")
    assert not problems, "\n".join(problems)


def test_nothing_in_the_package_imports_the_bench_tooling():
    users = [f"{path.relative_to(ROOT)}:{line}" for module, path in _modules() if _unit(module) != "bench"
             for target, line, _ in _imports(module, path) if _unit(target) == "bench"]
    assert not users, users


def test_the_contract_sees_the_imports_it_checks():
    # the checker itself: a known downward import and a known relative import are found
    found = {t for t, _, _ in _imports("stages.train", ROOT / "stages" / "train.py")}
    assert {"trainer.distill", "configs.schema", "analysis.layer_choice"} <= found
    assert all(_layer_of(_unit(m)) >= 0 for m, _ in _modules() if m != ROOT_MODULE)
