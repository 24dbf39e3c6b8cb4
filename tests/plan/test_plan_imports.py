"""plan/ only computes from numbers: importing it never loads torch or the runtime."""

import json
import subprocess
import sys

RUNTIME = ("torch", "selfhost.layers", "selfhost.models", "selfhost.engine", "selfhost.quant", "selfhost.llm")


def test_importing_every_plan_module_loads_no_runtime():
    code = (
        "import importlib, json, pkgutil, sys\n"
        "import selfhost.plan as plan\n"
        "names = [m.name for m in pkgutil.iter_modules(plan.__path__, 'selfhost.plan.')]\n"
        "for name in names: importlib.import_module(name)\n"
        "print(json.dumps({'modules': names, 'loaded': sorted(sys.modules)}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    report = json.loads(out.stdout)
    assert "selfhost.plan.fit" in report["modules"] and "selfhost.plan.cost" in report["modules"]
    runtime = [m for m in report["loaded"] if m.split(".")[0] == "torch" or m.startswith(RUNTIME)]
    assert runtime == []


def _imports(path):
    """Every module a file imports, at the top or inside a function ('selfhost.LLM' for names of the package)."""
    import ast

    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.append(node.module)
            if node.module == "selfhost":
                found += [f"selfhost.{alias.name}" for alias in node.names]
    return found


def test_no_plan_module_imports_the_runtime_even_lazily():
    from pathlib import Path

    import selfhost.plan as plan

    heavy = RUNTIME + ("selfhost.LLM", "selfhost.AsyncEngine")
    for path in Path(plan.__path__[0]).glob("*.py"):
        bad = [name for name in _imports(path) if name.split(".")[0] == "torch" or name.startswith(heavy)]
        assert bad == [], f"{path.name} imports {bad}"
