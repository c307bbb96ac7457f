"""The layering of the code base, checked from the source (every import, lazy ones included).

Each top-level package may import only the packages below it in :data:`LAYERS`; the
README's architecture section names the same layers. SQL lives in ``crm/`` only.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

#: Package -> the project packages it may import (directly or lazily).
LAYERS: dict[str, set[str]] = {
    "core": set(),
    "crm": {"core"},
    "seeding": {"core", "crm"},
    "scheduling": {"core", "crm"},
    "processors": {"core"},
    "tools": {"core", "crm", "scheduling"},
    "telephony": {"core"},
    "bot": {"core", "crm", "scheduling", "tools", "processors", "telephony"},
    "messaging": {"core", "crm", "telephony"},
    "campaigns": {"core", "crm", "telephony", "messaging"},
    "api": {"core", "crm", "tools", "processors", "telephony", "bot", "campaigns", "messaging"},
    "ops": {"core", "crm", "processors"},
}
PACKAGES = set(LAYERS)
#: A statement sent to Postgres (only the data layer sends them).
SQL_CALL = re.compile(r"\.(execute|executemany|copy)\(")
#: Files outside crm/ allowed to talk SQL, and why.
SQL_ALLOWED = {
    "core/resources.py": "the health check's SELECT 1 on the pool",
    "core/embedded.py": "bootstrap of the embedded server (its database), before any CRM",
}


def _modules(package: str) -> list[Path]:
    return sorted((REPO / package).rglob("*.py"))


def _imports(path: Path) -> set[str]:
    """Top-level project packages imported anywhere in ``path`` (lazy imports included)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found.update(name.split(".")[0] for name in names)
    return found & (PACKAGES | {"runner", "seed_data"})


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_each_package_imports_only_the_layers_below_it(package: str) -> None:
    assert (REPO / package / "__init__.py").exists(), f"{package}/ is not a package"
    allowed = LAYERS[package] | {package}
    wrong = {
        str(path.relative_to(REPO)): sorted(_imports(path) - allowed)
        for path in _modules(package)
        if _imports(path) - allowed
    }
    assert not wrong, f"imports above the {package!r} layer: {wrong}"


def test_the_layers_have_no_cycle() -> None:
    # A layering is a DAG: a topological order exists.
    remaining = {name: set(deps) for name, deps in LAYERS.items()}
    while remaining:
        free = [name for name, deps in remaining.items() if not deps & remaining.keys()]
        assert free, f"cycle among {sorted(remaining)}"
        for name in free:
            del remaining[name]


def test_no_sql_outside_crm() -> None:
    offenders = []
    paths = [p for package in sorted(PACKAGES - {"crm"}) for p in _modules(package)]
    for path in [*paths, REPO / "runner.py", REPO / "seed_data.py"]:
        name = str(path.relative_to(REPO))
        if name not in SQL_ALLOWED and SQL_CALL.search(path.read_text()):
            offenders.append(name)
    assert not offenders, f"SQL outside crm/: {offenders}"


def test_every_top_level_package_is_in_the_architecture_section() -> None:
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Architecture", 1)[1].split("\n## ", 1)[0]
    on_disk = {
        p.name
        for p in REPO.iterdir()
        if p.is_dir() and (p / "__init__.py").exists() and p.name != "tests"
    }
    assert on_disk == PACKAGES, "LAYERS must list every package"
    missing = [name for name in sorted(on_disk) if f"`{name}/`" not in section]
    assert not missing, f"README architecture section misses {missing}"
