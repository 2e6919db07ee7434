"""The house's shape, checked by reading the source: which package may import which.

Every `import` counts, also those inside functions and under `TYPE_CHECKING`: a lazy import is still an
arrow a maintainer has to follow. Units are `backend.<package>` and the modules at `backend/`'s root.
"""

import ast
from collections import defaultdict
from pathlib import Path

from backend.core.config import PROJECT_ROOT

BACKEND = PROJECT_ROOT / "backend"

# Bottom first: a unit may import those before it. Equal rank = one floor, no arrows either way needed.
LAYERS: list[set[str]] = [
    {"core"},
    {"imaging", "telemetry"},  # image decoding; the Prometheus metrics and JSON logs
    {"storage", "index"},  # all SQL; pure FAISS/NumPy
    {"sources"},  # datasets, URLs, archives, query images
    {"embedding"},
    {"search"},  # what serves a query from the database's truth
    {"ingest", "cluster"},  # the writer; stage 2 over a Ray cluster (shards hold a restricted live index)
    {"jobs", "evaluation"},
    {"schemas"},  # the HTTP and CLI JSON shapes
    {"services"},
    {"api"},
    {"cli"},
]
# Arrows allowed to run back up, each with its reason. Keep at most two.
UPWARD: dict[tuple[str, str], str] = {}

MAX_ROOT_MODULES = 3


def _module_name(path: Path) -> str:
    parts = path.relative_to(PROJECT_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every backend module `path` names in an import, anywhere in the file."""
    return _imported(path.read_text(), _module_name(path), is_package=path.name == "__init__.py")


def _imported(source: str, name: str, is_package: bool) -> set[str]:
    package = name.split(".") if is_package else name.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
            found.add(base)
            # `from backend import telemetry` names a module; `from backend.x import f` a module's attribute.
            found.update(f"{base}.{a.name}" for a in node.names if _is_module(f"{base}.{a.name}"))
    return {f for f in found if f == "backend" or f.startswith("backend.")}


def _is_module(name: str) -> bool:
    path = PROJECT_ROOT / name.replace(".", "/")
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def _unit(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def _modules() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in sorted(BACKEND.rglob("*.py"))}


def _unit_arrows() -> dict[tuple[str, str], set[str]]:
    """(from unit, to unit) -> the modules that draw that arrow."""
    arrows: dict[tuple[str, str], set[str]] = defaultdict(set)
    for module, imported in _modules().items():
        source = _unit(module)
        for target in filter(None, map(_unit, imported)):
            if source is not None and source != target:
                arrows[(source, target)].add(module)
    return arrows


def _rank() -> dict[str, int]:
    return {unit: floor for floor, units in enumerate(LAYERS) for unit in units}


def test_every_unit_has_a_floor() -> None:
    units = {u for m in _modules() if (u := _unit(m)) is not None}
    assert units <= set(_rank()), f"give these a floor in LAYERS: {sorted(units - set(_rank()))}"


def test_index_is_pure_faiss_and_numpy() -> None:
    for module, imported in _modules().items():
        if _unit(module) == "index":
            units = {_unit(i) for i in imported} - {None}
            assert units <= {"core", "index"}, f"{module} imports {sorted(units - {'core', 'index'})}"
            source = (BACKEND.parent / module.replace(".", "/")).with_suffix(".py")
            if not source.exists():
                source = BACKEND.parent / module.replace(".", "/") / "__init__.py"
            assert "sqlalchemy" not in _third_party(source), f"{module} imports SQLAlchemy"


def _third_party(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module.split(".")[0])
    return found


def test_core_imports_no_other_backend_package() -> None:
    for module, imported in _modules().items():
        if _unit(module) == "core":
            others = {i for i in imported if _unit(i) not in (None, "core")}
            assert not others, f"{module} imports {sorted(others)}"


def test_few_modules_at_backends_root() -> None:
    loose = sorted(p.name for p in BACKEND.glob("*.py") if p.name != "__init__.py")
    assert len(loose) <= MAX_ROOT_MODULES, f"{loose}: move into a package"


def test_no_circle_between_units() -> None:
    graph: dict[str, set[str]] = defaultdict(set)
    for source, target in _unit_arrows():
        graph[source].add(target)
    seen: set[str] = set()

    def visit(unit: str, path: list[str]) -> None:
        if unit in path:
            circle = [*path[path.index(unit) :], unit]
            raise AssertionError(f"import circle: {' -> '.join(circle)}")
        if unit in seen:
            return
        for target in sorted(graph[unit]):
            visit(target, [*path, unit])
        seen.add(unit)

    for unit in sorted(graph):
        visit(unit, [])


def test_arrows_run_down_but_the_named_few() -> None:
    rank = _rank()
    upward = {
        arrow: sorted(modules)
        for arrow, modules in _unit_arrows().items()
        if rank.get(arrow[1], -1) >= rank.get(arrow[0], -1) and arrow[0] != arrow[1]
    }
    # Same-floor arrows are upward too unless the floor's pair is listed: a floor is not a shortcut.
    unexplained = {arrow: modules for arrow, modules in upward.items() if arrow not in UPWARD}
    assert not unexplained, f"arrows running back up: {unexplained}"
    assert len(UPWARD) <= 2
    stale = set(UPWARD) - set(upward)
    assert not stale, f"listed in UPWARD but gone, remove: {stale}"


def test_the_check_sees_lazy_imports() -> None:
    """The reader must find imports inside functions and relative ones, else the checks above could pass."""
    source = (
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from backend.search.live_index import LiveIndex\n"
        "def f():\n    from backend import telemetry\n    import backend.storage.engine\n"
        "from .two_stage import TwoStageIndex\n"
    )
    found = _imported(source, "backend.index.fastscan", is_package=False)
    assert {"backend.search.live_index", "backend.telemetry", "backend.storage.engine"} <= found
    assert "backend.index.two_stage" in found
