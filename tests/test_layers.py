"""The import layers hold (.importlinter), and no module hides an upward import inside a function."""

import ast
import subprocess
import sys
from pathlib import Path

import interleaf

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = Path(interleaf.__file__).parent
LAZY_ALLOWED = {"cli.py"}  # the entry point imports each verb's machinery when the verb runs


def test_import_contracts_are_kept():
    lint = Path(sys.executable).with_name("lint-imports")
    done = subprocess.run([str(lint), "--config", str(ROOT / ".importlinter")], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "broken" in done.stdout and " 0 broken" in done.stdout


def test_no_function_local_imports_of_interleaf():
    found = []
    for file in sorted(PACKAGE.rglob("*.py")):
        if file.relative_to(PACKAGE).as_posix() in LAZY_ALLOWED:
            continue
        tree = ast.parse(file.read_text())
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for inner in ast.walk(node):
                names = []
                if isinstance(inner, ast.ImportFrom) and inner.module and inner.level == 0:
                    names = [inner.module]
                elif isinstance(inner, ast.Import):
                    names = [a.name for a in inner.names]
                if any(n == "interleaf" or n.startswith("interleaf.") for n in names):
                    found.append(f"{file.relative_to(PACKAGE)}:{inner.lineno}")
    assert not found, f"function-local imports of interleaf modules: {found}"
