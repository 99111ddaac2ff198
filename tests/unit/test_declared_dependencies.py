"""Every third-party module the package imports is a declared dependency: one that only comes
in transitively (onnx through onnxscript, referencing through jsonschema) disappears the day
its carrier drops or changes it, and the import fails in production only."""

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# pydantic pins its own core to one exact version: declaring it would fight that pin.
PINNED_BY_THEIR_PARENT = {"pydantic_core"}


def _normalised(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    # The service's own, and the `analysis` extra that export-events imports lazily.
    specs = [*project["dependencies"], *project["optional-dependencies"]["analysis"]]
    return {_normalised(re.split(r"[\[<>=!~ ;]", spec, maxsplit=1)[0]) for spec in specs}


def _imported_top_levels() -> set[str]:
    names: set[str] = set()
    for path in (ROOT / "routecache").rglob("*.py"):
        if path.relative_to(ROOT / "routecache").parts[0] == "v1":
            continue  # generated stubs: grpc and protobuf, declared
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {"routecache"} - PINNED_BY_THEIR_PARENT


def test_every_third_party_import_is_a_declared_dependency() -> None:
    declared, owners = _declared(), packages_distributions()
    undeclared = sorted(
        module
        for module in _imported_top_levels()
        if not declared.intersection(_normalised(d) for d in owners.get(module, [module]))
    )
    assert undeclared == []


def test_sniffio_which_httpcore_imports_on_every_call_is_declared_and_installed() -> None:
    import importlib.util

    # httpcore imports sniffio (inside a try) each time it sets up a lock or semaphore, ~7
    # times an upstream call; missing, each is a failed import that scans sys.path (~0.1 ms
    # on the event loop). Nothing else declared brings it (anyio 4 dropped it).
    assert "sniffio" in _declared()
    assert importlib.util.find_spec("sniffio") is not None


# The distribution that gives each `jupyter SUBCOMMAND` a document may tell readers to run.
JUPYTER_SUBCOMMANDS = {"execute": "nbclient", "nbconvert": "nbconvert", "lab": "jupyterlab",
                       "notebook": "notebook", "run": "jupyter-client"}  # fmt: skip


def _extras() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    specs = [spec for extra in project["optional-dependencies"].values() for spec in extra]
    return {_normalised(re.split(r"[\[<>=!~ ;]", spec, maxsplit=1)[0]) for spec in specs}


def test_the_notebooks_documented_run_command_is_one_the_extras_install() -> None:
    # Before: the notebook said to run it with `jupyter nbconvert --execute`, and nbconvert is
    # in no extra: the documented command failed on an install of the declared extras.
    documents = [ROOT / "README.md", *(ROOT / "docs").glob("*.md"),
                 ROOT / "notebooks" / "cache_hit_analysis.ipynb"]  # fmt: skip
    commands = {
        match for path in documents
        for match in re.findall(r"\bjupyter[ -](\w+)", path.read_text(encoding="utf-8"))
    }  # fmt: skip
    assert "execute" in commands  # the notebook says how to run it
    extras = _extras()
    assert {c for c in commands if JUPYTER_SUBCOMMANDS.get(c, c) not in extras} == set()
