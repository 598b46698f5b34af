"""Run the Node tests of the network adapter, static/loco-network.js (tests/js/).

They start their own live server (tests/live_server.py) with this interpreter,
on a fresh database of the engine under test.
Without Node the test is skipped, unless LOCO_REQUIRE_TOOLS=1 (as in CI),
so that a missing install cannot pass silently.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_the_network_adapter_passes_its_node_tests(engine):
    node = shutil.which("node")
    if node is None:
        reason = "node is not installed: the tests of static/loco-network.js in tests/js/ need Node 20 or newer"
        if os.environ.get("LOCO_REQUIRE_TOOLS") == "1":
            pytest.fail(f"{reason} (LOCO_REQUIRE_TOOLS=1)")
        pytest.skip(reason)
    # Files, not the directory: Node 21+ no longer searches a directory given to --test.
    files = [str(path.relative_to(ROOT)) for path in sorted((ROOT / "tests" / "js").glob("*.test.mjs"))]
    assert files, "no tests/js/*.test.mjs"
    result = subprocess.run(
        [node, "--test", *files],
        cwd=ROOT,
        env={**os.environ, "PYTHON": sys.executable, "LOCO_TEST_ENGINE": engine},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, f"node --test failed:\n{result.stdout}\n{result.stderr}"
