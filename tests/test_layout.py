"""The repository's layout rules (issue 11), checked on the source with `ast`, no imports run.

- The product packages (`cyphonic/`, `appliance/`: what the appliance image installs) never
  import the development tooling (`lab`) or the tests (`tests`), not even lazily inside a
  function, and never touch `sys.path`.
- No product module or package is a benchmark or a demo: those live in `lab/bench/` and
  `lab/demo/`.
- The root project's wheel carries the product packages only (lab/ is its own distribution,
  lab/pyproject.toml, installed in the development venv; tests/ is never installed).
- Nothing in the repository edits `sys.path`: the lab, the tests and the scripts find
  `cyphonic`, `appliance` and `lab` through the installed packages.
"""

from __future__ import annotations

import ast
import os
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRODUCT = ("cyphonic", "appliance")
DEV_ONLY = ("lab", "tests")
SKIP_DIRS = {".git", ".venv", "build", "__pycache__", ".pytest_cache", ".hypothesis"}


def _modules(*tops: str) -> list[str]:
    out = []
    for top in tops:
        for dirpath, dirnames, filenames in os.walk(os.path.join(ROOT, top)):
            dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS and not d.endswith(".egg-info")]
            out += [os.path.join(dirpath, f) for f in filenames if f.endswith(".py")]
    return sorted(out)


def _tree(path: str) -> ast.Module:
    with open(path, encoding="utf-8") as f:
        return ast.parse(f.read(), filename=path)


def _rel(path: str) -> str:
    return os.path.relpath(path, ROOT)


def _imported(tree: ast.Module) -> list[tuple[int, str]]:
    """Every module name imported anywhere in the tree (top level, functions, `try` blocks),
    including `importlib.import_module("...")` and `__import__("...")` with a literal name."""
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append((node.lineno, node.module))
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and (isinstance(node.func, ast.Name) and node.func.id == "__import__"
                   or isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")):
            names.append((node.lineno, node.args[0].value))
    return names


def _sys_path_uses(tree: ast.Module) -> list[ast.AST]:
    """`sys.path` (any use) and `from sys import path`."""
    uses = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and node.attr == "path" and isinstance(node.value, ast.Name)
                and node.value.id == "sys"):
            uses.append(node)
        elif isinstance(node, ast.ImportFrom) and node.module == "sys" and any(a.name == "path" for a in node.names):
            uses.append(node)
    return uses


def _sys_path_edits(tree: ast.Module) -> list[int]:
    """Lines that change `sys.path`: assignment (also to a slice or item), augmented assignment,
    deletion, or a mutating method call; and any `from sys import path`."""
    def is_sys_path(n: ast.AST) -> bool:
        if isinstance(n, ast.Subscript):
            n = n.value
        return (isinstance(n, ast.Attribute) and n.attr == "path" and isinstance(n.value, ast.Name)
                and n.value.id == "sys")

    lines = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign, ast.Delete)):
            targets = node.targets if isinstance(node, (ast.Assign, ast.Delete)) else [node.target]
            lines += [node.lineno for t in targets if is_sys_path(t)]
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and is_sys_path(node.func.value)
              and node.func.attr in ("insert", "append", "extend", "remove", "pop", "clear", "__setitem__",
                                     "__iadd__", "sort", "reverse")):
            lines.append(node.lineno)
        elif isinstance(node, ast.ImportFrom) and node.module == "sys" and any(a.name == "path" for a in node.names):
            lines.append(node.lineno)
    return lines


def test_product_never_imports_the_lab_or_the_tests():
    bad = []
    modules = _modules(*PRODUCT)
    assert len(modules) > 20, "found too few product modules: the check looks in the wrong place"
    for path in modules:
        for line, name in _imported(_tree(path)):
            if name.split(".")[0] in DEV_ONLY:
                bad.append(f"{_rel(path)}:{line}: imports {name}")
    assert not bad, "product code imports development tooling:\n" + "\n".join(bad)


def test_product_never_touches_sys_path():
    bad = [f"{_rel(p)}:{n.lineno}" for p in _modules(*PRODUCT) for n in _sys_path_uses(_tree(p))]
    assert not bad, "product code touches sys.path (find modules through the installed packages):\n" + "\n".join(bad)


def test_nothing_in_the_repository_edits_sys_path():
    tops = [d for d in sorted(os.listdir(ROOT)) if os.path.isdir(os.path.join(ROOT, d))
            and d not in SKIP_DIRS and not d.startswith(".") and not d.endswith(".egg-info")]
    modules = _modules(*tops)
    assert any(_rel(p).startswith("lab" + os.sep) for p in modules)
    bad = [f"{_rel(p)}:{line}" for p in modules for line in _sys_path_edits(_tree(p))]
    assert not bad, "sys.path edits (install the package instead: `make venv`):\n" + "\n".join(bad)


def test_no_benchmark_or_demo_in_the_product():
    bad = []
    for top in PRODUCT:
        for dirpath, dirnames, filenames in os.walk(os.path.join(ROOT, top)):
            dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS]
            for name in dirnames + [f[:-3] for f in filenames if f.endswith(".py")]:
                if {"bench", "benchmark", "demo"} & set(name.lower().split("_")):
                    bad.append(_rel(os.path.join(dirpath, name)))
    assert not bad, "benchmarks and demos belong in lab/bench/ and lab/demo/: " + ", ".join(bad)


def test_root_project_ships_the_product_packages_only():
    from setuptools import find_packages
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)
    tool = project["tool"]["setuptools"]
    find = tool.get("packages", {}).get("find") if isinstance(tool.get("packages"), dict) else None
    assert find is not None and "package-dir" not in tool, "expected [tool.setuptools.packages.find]: update this test"
    packages = find_packages(ROOT, include=find.get("include", ("*",)), exclude=find.get("exclude", ()))
    assert {"cyphonic", "appliance"} <= set(packages)
    stray = [p for p in packages if p.split(".")[0] not in PRODUCT]
    assert not stray, f"the root project's wheel would carry {stray}"
    for script, target in project["project"]["scripts"].items():
        assert target.split(".")[0] in PRODUCT, f"{script} = {target}: not a product entry point"
        assert not {"bench", "demo"} & set(script.split("-")), f"{script}: belongs to lab/pyproject.toml"
