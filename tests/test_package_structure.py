"""The package's import structure: no import cycle among hfquant's modules (imports inside
functions count: deferring an import hides a cycle, it does not remove it), and no module
takes another module's private names."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "hfquant"


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


MODULES = _modules()
NATIVE = "hfquant._C"  # the compiled extension: imports nothing of the package


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _type_checking_lines(tree: ast.AST) -> set[int]:
    """Lines inside `if TYPE_CHECKING:` blocks (imports for annotations only)."""
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def _resolve(importer: str, level: int, module: str | None) -> str:
    if level == 0:
        return module or ""
    base = importer if _is_package(importer) else importer.rpartition(".")[0]
    for _ in range(level - 1):
        base = base.rpartition(".")[0]
    return f"{base}.{module}" if module else base


def imports(name: str, text: str | None = None) -> list[tuple[str, str | None, int]]:
    """(imported hfquant module, name taken from it or None, line) of every import of a module."""
    tree = ast.parse(MODULES[name].read_text() if text is None else text, str(MODULES[name]))
    skip = _type_checking_lines(tree)
    out = []
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            out += [(a.name, None, node.lineno) for a in node.names if a.name.split(".")[0] == "hfquant"]
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(name, node.level, node.module)
            if target.split(".")[0] != "hfquant":
                continue
            for a in node.names:
                sub = f"{target}.{a.name}"
                if sub == NATIVE:
                    continue
                out.append((sub, None, node.lineno) if sub in MODULES else (target, a.name, node.lineno))
    return out


def _graph() -> dict[str, set[str]]:
    graph = {m: set() for m in MODULES}
    for m in MODULES:
        for target, _, _ in imports(m):
            while target not in MODULES and "." in target:
                target = target.rpartition(".")[0]
            graph[m].add(target)
            # importing a.b.c runs a.b's __init__ first, unless the importer lives inside a.b
            parent = target.rpartition(".")[0]
            while parent.count(".") >= 1 and not m.startswith(parent + ".") and m != parent:
                graph[m].add(parent)
                parent = parent.rpartition(".")[0]
    for m in graph:
        graph[m].discard(m)
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, comps = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return comps


def test_no_import_cycle():
    cycles = find_cycles(_graph())
    assert not cycles, "import cycles among hfquant modules: " + "; ".join(" <-> ".join(c) for c in cycles)


def _private_uses(name: str, text: str | None = None) -> list[str]:
    """`from hfquant.x import _name` and `x._name` on an imported hfquant module, for names that
    are not modules themselves (hfquant._ext, the native loader, is a module)."""
    found = [f"{name}:{line} imports {target}.{what}" for target, what, line in imports(name, text)
             if what is not None and what.startswith("_") and not what.startswith("__")]
    tree = ast.parse(MODULES[name].read_text() if text is None else text)
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            target = _resolve(name, node.level, node.module)
            for a in node.names:
                if f"{target}.{a.name}" in MODULES:
                    aliases[a.asname or a.name] = f"{target}.{a.name}"
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name in MODULES and a.asname:
                    aliases[a.asname] = a.name
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                and node.attr.startswith("_") and not node.attr.startswith("__")
                and f"{aliases[node.value.id]}.{node.attr}" not in MODULES):
            found.append(f"{name}:{node.lineno} uses {aliases[node.value.id]}.{node.attr}")
    return found


# _ext exposes the native module as _C: the one designated entry to it
ALLOWED_PRIVATE = {"_C"}


def test_no_private_cross_module_imports():
    bad = [u for m in sorted(MODULES) for u in _private_uses(m) if u.rpartition(".")[2] not in ALLOWED_PRIVATE]
    assert not bad, "private names used across modules:\n" + "\n".join(bad)


def test_checker_finds_a_cycle_and_a_private_import():
    """The checks can fail: a made-up cycle is found, and so are private names taken."""
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []
    text = ("from ..formats import v1\nfrom ..formats.v1 import _grouped\n"
            "def f():\n    from .. import nn\n    return v1._grouped, nn.base\n")
    assert _private_uses("hfquant.algorithms.awq", text) == [
        "hfquant.algorithms.awq:2 imports hfquant.formats.v1._grouped",
        "hfquant.algorithms.awq:5 uses hfquant.formats.v1._grouped"]


@pytest.mark.parametrize("importer,level,module,expected", [
    ("hfquant.nn.embedding", 1, "base", "hfquant.nn.base"),
    ("hfquant.nn", 1, "base", "hfquant.nn.base"),
    ("hfquant.nn.embedding", 2, "formats", "hfquant.formats"),
    ("hfquant.quantizer", 1, None, "hfquant"),
])
def test_relative_imports_resolve(importer, level, module, expected):
    assert _resolve(importer, level, module) == expected
