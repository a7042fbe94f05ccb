"""The package's imports, read from its source with ast: no import hidden inside a function (except optional heavy
third-party packages) and no import circle among dictcircuits' modules. An import moved into a function still
closes a circle when the function runs; it only hides it, so the circle check counts those imports too."""

import ast
from pathlib import Path

import pytest

import dictcircuits

PACKAGE = Path(dictcircuits.__file__).parent
# Imported where they are used, never at module level: heavy to import and needed by one feature each.
OPTIONAL = {
    "matplotlib",  # plots only (eval --plots, compare --plot, train's curves)
    "gguf",  # .gguf models only; an extra (pip install 'dictcircuits[gguf]'), not a dependency
    "datasets",  # hub datasets only; seconds to import, and local text files do not need it
}


def _modules() -> dict[str, ast.Module]:
    """Dotted module name relative to the package ('trace', 'circuit.prompt', '' for __init__) -> its AST."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = ast.parse(path.read_text(encoding="utf-8"), str(path))
    return out


def _in_functions(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement inside a function (or method, or lambda) of tree."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            found += [n for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom))]
    return list({id(n): n for n in found}.values())


def _is_optional(node: ast.Import | ast.ImportFrom) -> bool:
    if isinstance(node, ast.ImportFrom):
        return node.level == 0 and node.module.split(".")[0] in OPTIONAL
    return all(alias.name.split(".")[0] in OPTIONAL for alias in node.names)


def _file(module: str) -> str:
    path = PACKAGE / (module.replace(".", "/") + ".py")
    return path.relative_to(PACKAGE).as_posix() if path.exists() else f"{module.replace('.', '/')}/__init__.py"


def hidden_imports(modules: dict[str, ast.Module]) -> dict[str, list[str]]:
    """file -> 'line N: import ...' for every function-level import outside OPTIONAL."""
    out: dict[str, list[str]] = {}
    for name, tree in modules.items():
        for node in _in_functions(tree):
            if not _is_optional(node):
                out.setdefault(_file(name), []).append(f"line {node.lineno}: {ast.unparse(node)}")
    return out


def _targets(module: str, node: ast.Import | ast.ImportFrom, modules) -> set[str]:
    """The dictcircuits modules one import statement in `module` loads."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names if a.name.split(".")[0] == "dictcircuits"]
        return {n.removeprefix("dictcircuits").lstrip(".") for n in names} & set(modules)
    if node.level == 0:
        if not (node.module or "").startswith("dictcircuits"):
            return set()
        base = node.module.removeprefix("dictcircuits").lstrip(".")
    else:
        is_package = (PACKAGE / module.replace(".", "/") / "__init__.py").exists() or module == ""
        parts = module.split(".") if module else []
        anchor = parts if is_package else parts[:-1]
        anchor = anchor[:len(anchor) - (node.level - 1)]
        base = ".".join(anchor + ([node.module] if node.module else []))
    found = set()
    for alias in node.names:  # `from . import x` and `from .circuit import nodes` load submodules
        sub = f"{base}.{alias.name}" if base else alias.name
        found.add(sub if sub in modules else base)
    return found & set(modules)


def _type_only(tree: ast.Module) -> set[int]:
    """ids of the imports under `if TYPE_CHECKING:`: annotations only, never run, so they close no circle."""
    return {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and ast.unparse(node.test) in
            ("TYPE_CHECKING", "typing.TYPE_CHECKING") for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom))}


def import_graph(modules: dict[str, ast.Module]) -> dict[str, set[str]]:
    """module -> the dictcircuits modules it imports when it runs, at module level or inside functions."""
    return {name: {t for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
                   and id(node) not in _type_only(tree) for t in _targets(name, node, modules)} - {name}
            for name, tree in modules.items()}


def circles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(frozenset(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


@pytest.fixture(scope="module")
def modules():
    return _modules()


def test_no_imports_hidden_in_functions(modules):
    hidden = hidden_imports(modules)
    assert not hidden, "imports inside functions (move them to the top; break a circle instead of dodging it): " + \
        "; ".join(f"{f} {', '.join(lines)}" for f, lines in sorted(hidden.items()))


def test_no_import_circles(modules):
    found = circles(import_graph(modules))
    assert not found, "import circles: " + "; ".join(" <-> ".join(sorted(c)) for c in found)


def test_the_checks_see_a_hidden_import_and_a_circle():
    """Both checks fail on a planted violation (a function-level import that closes a circle)."""
    planted = {"a": ast.parse("from .b import x\n"),
               "b": ast.parse("def f():\n    from .a import y\n    import matplotlib.pyplot\n")}
    assert hidden_imports(planted) == {"b/__init__.py": ["line 2: from .a import y"]}
    assert circles(import_graph(planted)) == [frozenset({"a", "b"})]
    typed = {"a": ast.parse("from .b import x\n"),
             "b": ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import y\n")}
    assert circles(import_graph(typed)) == []
