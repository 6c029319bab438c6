"""cache/'s sub-packages: every folder is packaged, and imports between modules form no circle."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMPORT = re.compile(
    r"^\s*(?:from|import) (kdcache\.cache[\w.]*)(?: import \(?([\w, \n]+)\)?)?", re.M
)


def _modules() -> dict[str, Path]:
    modules = {}
    for path in (ROOT / "cache").rglob("*.py"):
        dotted = "kdcache." + ".".join(path.relative_to(ROOT).with_suffix("").parts)
        modules[dotted.removesuffix(".__init__")] = path
    return modules


def _imports(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the kdcache.cache modules it imports (top level or inside functions)."""
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found: set[str] = set()
        for match in IMPORT.finditer(path.read_text()):
            base, names = match.group(1), match.group(2)
            for item in (names or "").replace("\n", " ").split(","):
                leaf = item.strip().split(" as ")[0]
                found.add(f"{base}.{leaf}" if f"{base}.{leaf}" in modules else base)
        graph[name] = {m for m in found if m in modules and m not in (name, "kdcache.cache")}
    return graph


def test_every_cache_folder_is_a_listed_package() -> None:
    packages = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    folders = {
        "kdcache." + ".".join(path.parent.relative_to(ROOT).parts)
        for path in (ROOT / "cache").rglob("__init__.py")
    }
    assert folders <= packages, f"add to pyproject's packages: {sorted(folders - packages)}"


def test_no_import_circle_in_cache() -> None:
    graph = _imports(_modules())
    state: dict[str, int] = {}  # 1 = on the path, 2 = done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                raise AssertionError("import circle: " + " -> ".join([*path, dep]))
            if dep not in state:
                visit(dep, [*path, dep])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def test_packages_import_one_way() -> None:
    """format <- storage <- read <- build, extraction alone: no package imports a later one."""
    order = ["format", "storage", "read", "build"]
    graph = _imports(_modules())
    for module, deps in graph.items():
        if module == "kdcache.cache":
            continue
        package = module.split(".")[2]
        for dep in deps:
            dep_package = dep.split(".")[2]
            if package in order and dep_package in order:
                assert order.index(dep_package) <= order.index(package), f"{module} imports {dep}"
            if package == "extraction":
                assert dep_package in ("extraction", "errors", "records"), f"{module} imports {dep}"
