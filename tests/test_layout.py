"""The code's shape, as a learner meets it: app.py is the protocol in one
sitting, and the machinery beside it says, module by module, what it adds
and which tests prove it. (How fast and durable it is: the other tests.)"""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MACHINERY = sorted((ROOT / "machinery").glob("*.py"))


def test_app_py_imports_no_machinery_of_threads_locks_or_engines():
    """app.py is the protocol; threads, file locks, the PostgreSQL driver and
    the OpenAPI builder live in machinery/."""
    tree = ast.parse((ROOT / "app.py").read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert not imported & {"threading", "fcntl", "psycopg", "apispec", "sqlite3", "concurrent", "multiprocessing"}, imported


def test_app_py_is_read_in_one_sitting():
    assert len((ROOT / "app.py").read_text().splitlines()) <= 650


def test_each_machinery_module_says_what_it_adds_and_names_tests_that_exist():
    assert len(MACHINERY) >= 8
    for module in MACHINERY:
        text = module.read_text()
        assert len(text.splitlines()) <= 300, module.name
        opening = ast.get_docstring(ast.parse(text))
        assert opening, f"{module.name} opens with no docstring"
        if module.name == "__init__.py":
            continue
        named = re.findall(r"tests/(test_\w+\.py|contract\.py)", opening)
        assert named, f"{module.name} names no test that proves it"
        missing = [name for name in named if not (ROOT / "tests" / name).exists()]
        assert not missing, f"{module.name} names tests that do not exist: {missing}"
