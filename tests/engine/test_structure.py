"""The engine's shape (issue 8 "Done when"): no import cycle, no import inside a function, no
call of another module's private function, small functions.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ENGINE = Path(__file__).resolve().parents[2] / "app" / "engine"
MAX_LINES = 60
MAX_COMPLEXITY = 15
# The ordered check lists read as the kernel's list: allowed to be long.
KERNEL_LISTS = {"memslots.check_region", "gmem.GmemTable.check_fallocate"}


def modules() -> dict[str, ast.Module]:
    return {p.stem: ast.parse(p.read_text()) for p in sorted(ENGINE.glob("*.py"))}


def _type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def runtime_imports(tree: ast.Module) -> set[str]:
    """Engine modules imported at run time (not the `if TYPE_CHECKING:` ones)."""
    out: set[str] = set()
    for node in tree.body:
        if _type_checking(node):
            continue
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                out.add(node.module.split(".")[0])
            else:
                out.update(a.name for a in node.names)
    return out


def functions(tree: ast.Module) -> Iterator[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    def visit(node: ast.AST, prefix: str) -> Iterator[tuple[str, ast.AST]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef):
                yield from visit(child, f"{prefix}{child.name}.")
            elif isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                yield f"{prefix}{child.name}", child
                yield from visit(child, f"{prefix}{child.name}.")

    yield from visit(tree, "")  # type: ignore[misc]


def complexity(fn: ast.AST) -> int:
    """McCabe: 1 + one per branch point (if/elif, loops, except, boolean operators,
    conditional expressions, comprehension filters, match cases)."""
    n = 1
    for node in ast.walk(fn):
        if isinstance(node, ast.If | ast.IfExp | ast.For | ast.While | ast.AsyncFor):
            n += 1
        elif isinstance(node, ast.ExceptHandler | ast.match_case):
            n += 1
        elif isinstance(node, ast.BoolOp):
            n += len(node.values) - 1
        elif isinstance(node, ast.comprehension):
            n += 1 + len(node.ifs)
    return n


def test_the_runtime_import_graph_has_no_cycle() -> None:
    graph = {name: runtime_imports(tree) & set(modules()) for name, tree in modules().items()}
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            assert state.get(n) != 1, f"import cycle: {' -> '.join([*path, m, n])}"
            if n not in state:
                visit(n, [*path, m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])


def test_no_engine_module_but_its_front_and_codec_imports_vm_at_run_time() -> None:
    users = {name for name, tree in modules().items() if "vm" in runtime_imports(tree)}
    assert users <= {"__init__", "codec"}


def test_helper_modules_take_the_state_not_the_vm() -> None:
    """Not even for annotations: the modules work on `KvmState` (state.py); only the package
    and `codec` (which builds a `Vm` back from a snapshot) name `Vm`."""
    users = {
        name
        for name, tree in modules().items()
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module == "vm"
    }
    assert users <= {"__init__", "codec"}


def test_no_import_inside_a_function() -> None:
    found = [
        f"{mod}.{name}"
        for mod, tree in modules().items()
        for name, fn in functions(tree)
        if any(isinstance(n, ast.Import | ast.ImportFrom) for n in ast.walk(fn))
    ]
    assert found == []


def test_no_call_of_another_modules_private_function() -> None:
    """`x._name(...)` only on `self` / `cls` (a class's own helpers)."""
    found = []
    for mod, tree in modules().items():
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                continue
            attr, base = node.func.attr, node.func.value
            if attr.startswith("_") and not attr.startswith("__"):
                if not (isinstance(base, ast.Name) and base.id in ("self", "cls", "pool")):
                    found.append(f"{mod}: {ast.unparse(node.func)}")
    assert found == []


def over_limits() -> dict[str, tuple[int, int]]:
    out = {}
    for mod, tree in modules().items():
        for name, fn in functions(tree):
            lines = (fn.end_lineno or fn.lineno) - fn.lineno + 1
            cc = complexity(fn)
            if (lines > MAX_LINES or cc > MAX_COMPLEXITY) and f"{mod}.{name}" not in KERNEL_LISTS:
                out[f"{mod}.{name}"] = (lines, cc)
    return out


def test_functions_stay_small_and_simple() -> None:
    """(lines, complexity) of every function over the limits but the kernel's lists."""
    assert over_limits() == {}


def test_page_shifts_live_in_addr_only() -> None:
    """Addresses are converted by `addr.py` (issue 8): no engine module shifts by PAGE_SHIFT
    itself; `uapi` defines it."""
    found = [
        f"{p.stem}:{n}"
        for p in sorted(ENGINE.glob("*.py"))
        if p.stem not in ("addr", "uapi")
        for n, line in enumerate(p.read_text().splitlines(), 1)
        if "PAGE_SHIFT" in line
    ]
    assert found == []
