"""The layout stays readable: no import cycle between modules, no module or function too long to hold in mind."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "mammacls"
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 80


def _modules() -> dict[str, ast.Module]:
    trees = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = ".".join(("mammacls", *path.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(".__init__")
        trees[name] = ast.parse(path.read_text(encoding="utf-8"))
    return trees


def _imported(name: str, tree: ast.Module, known: set[str]) -> set[str]:
    """Modules ``name`` imports, at module level or lazily inside a function: a lazy import hides a
    cycle from the interpreter, not from the reader (two modules that need each other are one)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            candidates = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        elif isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        else:
            continue
        found |= {c for c in candidates if c in known and c != name and not name.startswith(c + ".")}
    return found


def test_no_import_cycle():
    trees = _modules()
    graph = {name: _imported(name, tree, set(trees)) for name, tree in trees.items()}
    state: dict[str, str] = {}

    def visit(name: str, path: list[str]) -> None:
        state[name] = "open"
        for target in graph[name]:
            assert state.get(target) != "open", " -> ".join([*path[path.index(target):], target])
            if target not in state:
                visit(target, [*path, target])
        state[name] = "done"

    for name in graph:
        if name not in state:
            visit(name, [name])
    assert len(graph) > 40  # the walk saw the whole package
    assert "mammacls.archs" in graph["mammacls.choices"] and "mammacls.nets.gradcam" in graph["mammacls.overlays"]


def test_no_module_or_function_is_too_long():
    too_long = []
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        if len(text.splitlines()) > MAX_MODULE_LINES:
            too_long.append(f"{path.name}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    too_long.append(f"{path.name}:{node.name}: {length} lines")
    assert not too_long, too_long
