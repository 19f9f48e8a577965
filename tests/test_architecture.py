"""Imports go one way: service/, workers/ -> jobs/ -> core (adapters/, merge/); serving/ -> adapters/.

The graph is read from the source (every `import`, at module level or inside a function, since
heavy imports are deferred on purpose), so a violation is caught before any code runs it.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("adapters", "merge", "jobs", "workers", "service", "serving", "loramill")
WEB_FRAMEWORKS = {"fastapi", "starlette", "uvicorn"}


@cache
def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            if "migrations" in path.parts:
                continue
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


@cache
def imports(module: str) -> frozenset[str]:
    """Every absolute module name `module` imports (project modules resolved to the longest known name)."""
    names = set()
    for node in ast.walk(ast.parse(modules()[module].read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return frozenset(names)


def _project(name: str) -> str | None:
    while name and name not in modules():
        name = name.rpartition(".")[0]
    return name or None


@cache
def reachable(module: str) -> frozenset[str]:
    """Every import name reachable from `module` through project modules (including third-party roots)."""
    seen, todo, names = {module}, [module], set()
    while todo:
        for name in imports(todo.pop()):
            names.add(name)
            target = _project(name)
            if target is not None and target not in seen:
                seen.add(target)
                todo.append(target)
    return frozenset(names)


def package_of(name: str) -> str:
    return name.split(".")[0]


def offenders(packages: tuple[str, ...], forbidden, transitive: bool = False) -> list[str]:
    found = []
    for module in modules():
        if package_of(module) not in packages:
            continue
        for name in (reachable(module) if transitive else imports(module)):
            if forbidden(name):
                found.append(f"{module} -> {name}")
    return sorted(found)


def test_the_core_imports_nothing_above_it():
    above = {"jobs", "workers", "service", "serving", "loramill"}
    assert offenders(("adapters", "merge"), lambda n: package_of(n) in above) == []


def test_jobs_imports_neither_shell():
    assert offenders(("jobs",), lambda n: package_of(n) in {"service", "workers", "serving"}) == []


def test_service_and_workers_never_import_each_other():
    assert offenders(("service",), lambda n: package_of(n) == "workers") == []
    assert offenders(("workers",), lambda n: package_of(n) == "service") == []


def test_serving_imports_only_the_adapter_reader():
    assert offenders(("serving",), lambda n: package_of(n) in {"service", "workers", "jobs", "merge"}) == []


def test_no_web_framework_below_the_http_shells_even_indirectly():
    assert offenders(("jobs", "workers", "adapters", "merge"), lambda n: package_of(n) in WEB_FRAMEWORKS,
                     transitive=True) == []
