"""Architecture rules of edgec (docs/architecture.md#layers), checked with `ast` and import-linter.

Everything here reads source files; nothing imports edgec or torch in this process.
"""

import ast
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "edgec"
MAX_FUNCTION_LINES = 120
LOCAL_IMPORTS_ALLOWED_IN = "edgec.app"  # function-local imports keep `edgec --help` free of torch
HEAVY = "torch"


@dataclass(frozen=True)
class Module:
    name: str  # dotted, e.g. "edgec.core.graph"; a package is named after its folder
    path: Path
    tree: ast.Module

    @property
    def is_package(self) -> bool:
        return self.path.name == "__init__.py"

    @property
    def where(self) -> str:
        return str(self.path.relative_to(ROOT))


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _load_modules() -> dict[str, Module]:
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = _module_name(path)
        modules[name] = Module(name, path, ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
    return modules


MODULES = _load_modules()


def _functions(tree: ast.AST):
    return (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)))


def _imports_with_scope(tree: ast.Module):
    """Yield (import node, is_function_local) for every import statement in the module."""

    def visit(node: ast.AST, local: bool):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child, local
            inner = local or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            yield from visit(child, inner)

    yield from visit(tree, False)


def _absolute(node: ast.ImportFrom, importer: Module) -> str:
    """The absolute module a `from X import ...` statement names (resolves relative imports)."""
    if not node.level:
        return node.module or ""
    base = importer.name.split(".")
    if not importer.is_package:
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _targets(node: ast.Import | ast.ImportFrom, importer: Module) -> list[tuple[str, str | None]]:
    """(edgec module imported, name taken from it or None) for each alias of an import statement."""
    out = []
    if isinstance(node, ast.Import):
        for alias in node.names:
            if alias.name in MODULES:
                out.append((alias.name, None))
        return out
    source = _absolute(node, importer)
    for alias in node.names:
        submodule = f"{source}.{alias.name}"
        if submodule in MODULES:
            out.append((submodule, None))
        elif source in MODULES:
            out.append((source, alias.name))
    return out


def _is_edgec(node: ast.Import | ast.ImportFrom) -> bool:
    if isinstance(node, ast.Import):
        return any(a.name == "edgec" or a.name.startswith("edgec.") for a in node.names)
    return bool(node.level) or (node.module or "").split(".")[0] == "edgec"


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def _layer_package(name: str) -> str:
    """edgec.latency.table -> edgec.latency; edgec.evaluation -> edgec.evaluation."""
    return ".".join(name.split(".")[:2])


# (a) ------------------------------------------------------------------------------------------------------------
def _lint_imports_command() -> list[str]:
    script = Path(sys.executable).with_name("lint-imports")
    if script.exists():
        return [str(script)]
    found = shutil.which("lint-imports")
    if found:
        return [found]
    pytest.fail("import-linter is not installed: pip install -e '.[test]'")


def test_import_contracts_hold():
    """The layers and acyclic-siblings contracts in pyproject.toml ([tool.importlinter]) are kept."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([*_lint_imports_command(), "--no-cache"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        pytest.fail(f"lint-imports failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}", pytrace=False)


# (b) ------------------------------------------------------------------------------------------------------------
def test_no_function_longer_than_limit():
    offenders = sorted(
        ((fn.end_lineno - fn.lineno + 1, f"{m.where}:{fn.lineno} {fn.name}")
         for m in MODULES.values() for fn in _functions(m.tree)
         if fn.end_lineno - fn.lineno + 1 > MAX_FUNCTION_LINES),
        reverse=True,
    )
    if offenders:
        pytest.fail(f"functions longer than {MAX_FUNCTION_LINES} lines:\n" + "\n".join(
            f"  {n:4d}  {where}" for n, where in offenders), pytrace=False)


# (c) ------------------------------------------------------------------------------------------------------------
def test_no_module_shadows_the_standard_library():
    offenders = [f"{m.where} ({m.name.rsplit('.', 1)[-1]})" for m in MODULES.values()
                 if m.name != "edgec" and not m.name.endswith("__main__")
                 and m.name.rsplit(".", 1)[-1] in sys.stdlib_module_names]
    if offenders:
        pytest.fail("modules named after a standard-library module:\n  " + "\n  ".join(offenders), pytrace=False)


# (d) ------------------------------------------------------------------------------------------------------------
def test_function_local_edgec_imports_only_in_app():
    offenders = [f"{m.where}:{node.lineno} {ast.unparse(node)}"
                 for m in MODULES.values() if not _within(m.name, LOCAL_IMPORTS_ALLOWED_IN)
                 for node, local in _imports_with_scope(m.tree) if local and _is_edgec(node)]
    if offenders:
        pytest.fail(f"{len(offenders)} function-local imports of edgec outside {LOCAL_IMPORTS_ALLOWED_IN} "
                    "(make them module-level):\n  " + "\n  ".join(offenders), pytrace=False)


# (e) ------------------------------------------------------------------------------------------------------------
def _import_graph() -> dict[str, dict[str, int]]:
    """importer -> {imported edgec module: line}, counting module-level and function-local imports alike."""
    graph: dict[str, dict[str, int]] = {name: {} for name in MODULES}
    for m in MODULES.values():
        for node, _local in _imports_with_scope(m.tree):
            for target, _name in _targets(node, m):
                if target != m.name:
                    graph[m.name].setdefault(target, node.lineno)
    return graph


def _cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, found, counter = {}, {}, set(), [], [], 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(graph[root]))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, edges = work[-1]
            for w in edges:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(graph[w])))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    component = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        component.append(w)
                        if w == v:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
    return found


def _shortest_cycle_through(start: str, members: set[str], graph: dict[str, dict[str, int]]) -> list[str]:
    """Breadth-first search inside one strongly connected component, from `start` back to `start`."""
    parent: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for v in frontier:
            for w in graph[v]:
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if w in members and w not in parent:
                    parent[w] = v
                    following.append(w)
        frontier = following
    return [start]


def _describe(component: list[str], graph: dict[str, dict[str, int]], shown: int = 5) -> str:
    """The component's size and its few shortest cycles, each edge with the importing line."""
    members = set(component)
    cycles = {}
    for start in component:
        cycle = _shortest_cycle_through(start, members, graph)
        turn = cycle.index(min(cycle[:-1]))  # rotate so the same cycle found from two starts is one key
        cycles[tuple(cycle[turn:-1] + cycle[:turn + 1])] = None
    lines = [f"  {len(component)} modules in one cycle group; shortest cycles:"]
    for cycle in sorted(cycles, key=len)[:shown]:
        hops = [f"{a} ({MODULES[a].where}:{graph[a][b]})" for a, b in zip(cycle, cycle[1:])]
        lines.append("    " + " -> ".join([*hops, cycle[-1]]))
    return "\n".join(lines)


def test_no_import_cycle_between_modules():
    graph = _import_graph()
    cycles = _cycles(graph)
    if cycles:
        pytest.fail("import cycles between edgec modules (function-local imports included):\n" + "\n".join(
            _describe(c, graph) for c in cycles), pytrace=False)


# (f) ------------------------------------------------------------------------------------------------------------
def test_cli_help_does_not_import_torch():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "edgec", "--help"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    lines = proc.stderr.splitlines()
    if proc.returncode != 0:
        errors = "\n".join(line for line in lines if not line.startswith("import time:"))
        pytest.fail(f"`edgec --help` exited {proc.returncode}:\n{errors[-4000:]}", pytrace=False)
    imported = [line.rsplit("|", 1)[-1].strip() for line in lines if line.startswith("import time:")]
    heavy = [name for name in imported if name == HEAVY or name.startswith(HEAVY + ".")]
    if heavy:
        pytest.fail(f"`edgec --help` imports {HEAVY} ({len(heavy)} modules, first: {heavy[:5]})", pytrace=False)


# (g) ------------------------------------------------------------------------------------------------------------
def test_private_names_stay_in_their_package():
    """`from edgec.x.y import _name` only inside edgec.x (private names do not cross layer packages)."""
    offenders = []
    for m in MODULES.values():
        for node, _local in _imports_with_scope(m.tree):
            for target, name in _targets(node, m):
                leaf = name or target.rsplit(".", 1)[-1]  # the name taken, or the module imported
                private = leaf.startswith("_") and not leaf.startswith("__")
                if private and _layer_package(target) != _layer_package(m.name):
                    offenders.append(f"{m.where}:{node.lineno} {name or target} from {target}")
    if offenders:
        pytest.fail("private names imported across packages:\n  " + "\n  ".join(offenders), pytrace=False)
