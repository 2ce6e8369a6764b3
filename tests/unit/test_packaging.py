"""pyproject.toml: `pip install .` (deploy/README.md, step 1) brings every package the daemon imports."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _imported_top_level_modules() -> set[str]:
    """Every module ca_daemon/ imports, at the top or inside a function (pkilint is imported lazily)."""
    modules: set[str] = set()
    for path in (ROOT / "ca_daemon").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                modules.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module is not None:
                modules.add(node.module.split(".")[0])
    return modules - set(sys.stdlib_module_names) - {"ca_daemon", "__future__"}


def test_every_imported_package_is_a_runtime_dependency() -> None:
    """A package the daemon imports only through the dev extra (pkilint, validators) is missing in production:
    there `ca-daemon` stopped at its first line with "ModuleNotFoundError: No module named 'validators'"."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {_normalized(re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0]) for requirement in project["dependencies"]}
    distributions = packages_distributions()
    undeclared = {}
    for module in sorted(_imported_top_level_modules()):
        providers = {_normalized(name) for name in distributions.get(module, [])}
        assert providers, f"no installed distribution provides {module!r}"
        if not providers & declared:
            undeclared[module] = sorted(providers)
    assert not undeclared, f"imported by ca_daemon/ but not in [project] dependencies: {undeclared}"
