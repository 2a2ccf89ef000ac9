"""The package's floors: every import points down (or sideways within a package), no cycles, and an
import inside a function only for an optional dependency, said so in a comment on its line.

    base (config, sharding, paths, distributed, host_memory) < kernels < ops < models < data
        < checkpoints < train | inference (side by side) < command lines (cli), the public API
        < `python -m` entry points
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "idefics_jax"

FLOORS = (
    {"config", "sharding", "paths", "distributed", "host_memory"},
    {"kernels"},
    {"ops"},
    {"models"},
    {"data"},
    {"checkpoints"},
    {"train", "inference"},  # side by side: neither imports the other
    {"cli", "__init__"},  # command lines; the public API
    {"demo", "generate", "evaluate", "serve", "convert", "ablate", "__main__"},  # `python -m idefics_jax.X` entry points
)


def module_name(path: Path, root: Path) -> str:
    parts = ["idefics_jax", *path.relative_to(root).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(root: Path) -> dict[str, Path]:
    return {module_name(p, root): p for p in sorted(root.rglob("*.py"))}


def unit(module: str, path: Path) -> str:
    """The floor entry a module belongs to: its top-level package, or `__main__` for entry points."""
    if path.name == "__main__.py":
        return "__main__"
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def floor(name: str) -> int:
    return next(i for i, names in enumerate(FLOORS) if name in names)


def functions_nodes(tree) -> set[int]:
    return {id(node) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
            for node in ast.walk(f)}


def imports(path: Path, root: Path, known: dict[str, Path]):
    """(line, imported idefics_jax module) for each import of ours in `path`, wherever it stands."""
    tree = ast.parse(path.read_text())
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                kept = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(kept + ([base] if base else []))
            # `from package import module` imports that module; `from module import name`, the module
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for target in targets:
            if target.split(".")[0] == "idefics_jax":
                yield node.lineno, target


def upward_imports(root: Path) -> list[str]:
    known, wrong = modules(root), []
    for module, path in known.items():
        here = unit(module, path)
        for line, target in imports(path, root, known):
            there = unit(target, known.get(target, path))
            if here != there and floor(there) >= floor(here):
                wrong.append(f"{module}:{line} imports {target} ({there} is not below {here})")
    return wrong


def cycles(root: Path) -> list[str]:
    known = modules(root)
    graph = {m: {t for _, t in imports(p, root, known) if t in known and t != m} for m, p in known.items()}
    state, stack, found = {}, [], []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == "open":
                found.append(" -> ".join(stack[stack.index(t):] + [t]))
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)
    return found


def unexplained_inner_imports(root: Path) -> list[str]:
    """Imports inside functions that are ours (they would hide a cycle) or carry no comment."""
    wrong = []
    for module, path in modules(root).items():
        text = path.read_text()
        lines, tree = text.splitlines(), ast.parse(text)
        inner = functions_nodes(tree)
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) in inner:
                line = lines[node.lineno - 1]
                ours = "idefics_jax" in line or (isinstance(node, ast.ImportFrom) and node.level)
                if ours or "#" not in line:
                    wrong.append(f"{module}:{node.lineno}: {line.strip()}")
    return wrong


def test_every_module_has_a_floor():
    for module, path in modules(PACKAGE).items():
        assert any(unit(module, path) in names for names in FLOORS), f"{module}: add its package to FLOORS"


def test_imports_point_down():
    wrong = upward_imports(PACKAGE)
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles():
    found = cycles(PACKAGE)
    assert not found, "\n".join(found)


def test_imports_inside_functions_say_why():
    """Only an optional or heavy dependency is imported where it is used, with a comment saying why."""
    wrong = unexplained_inner_imports(PACKAGE)
    assert not wrong, "imports inside functions without a reason:\n" + "\n".join(wrong)


def test_the_checks_find_what_they_look_for(tmp_path):
    """On a made-up package: a model importing training, two kernels importing each other (one of
    them inside a function) are each found."""
    root = tmp_path / "idefics_jax"
    files = {"__init__.py": "", "models/__init__.py": "", "train/__init__.py": "", "kernels/__init__.py": "",
             "train/loop.py": "", "models/idefics2.py": "from idefics_jax.train.loop import x\n",
             "kernels/a.py": "from idefics_jax.kernels import b\n",
             "kernels/b.py": "def f():\n    from idefics_jax.kernels import a  # a reason, but ours\n"}
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    assert upward_imports(root) == ["idefics_jax.models.idefics2:1 imports idefics_jax.train.loop "
                                    "(train is not below models)"]
    assert cycles(root) == ["idefics_jax.kernels.a -> idefics_jax.kernels.b -> idefics_jax.kernels.a"]
    assert unexplained_inner_imports(root) == ["idefics_jax.kernels.b:2: from idefics_jax.kernels import a  "
                                               "# a reason, but ours"]
