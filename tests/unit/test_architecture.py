"""The import rules of docs/architecture.md, as import-linter contracts (pyproject.toml): they hold for
the code as it is, and each one fails when a file breaks it. The check runs `lint-imports` on a copy
of the packages, so a broken copy never touches the real tree."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("orders", "write_service", "read_service", "sync_worker", "orders_bench")
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(tree: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(tree)}  # before the editable install, so the copy is the one read
    command = [str(LINT_IMPORTS), "--no-cache"]
    return subprocess.run(command, check=False, cwd=tree, env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    copy = tmp_path_factory.mktemp("tree")
    for package in PACKAGES:
        shutil.copytree(ROOT / package, copy / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", copy)
    return copy


def test_the_code_keeps_every_contract(tree: Path) -> None:
    """lint-imports passes on the code as it is."""
    result = lint_imports(tree)

    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "line", "contract"),
    [
        ("orders/domain/status.py", "import redis", "The domain is pure"),
        ("orders/domain/events.py", "import orders.store.views", "The domain is pure"),
        ("read_service/watch.py", "import sync_worker.lease", "No service imports another"),
        ("write_service/servicer.py", "import orders.client", "Servers never load the client library"),
        ("orders/server/grpc_server.py", "import orders.cli.format", "Servers never load the client library"),
        ("orders/tools/local.py", "import write_service.main", "The shared core does not name the service packages"),
        ("orders/store/views.py", "import orders.server.tasks", "Arrows point one way"),
    ],
)
def test_a_forbidden_import_breaks_its_contract(tree: Path, module: str, line: str, contract: str) -> None:
    """Each rule bites: one forbidden import added to one module breaks the contract that forbids it."""
    path = tree / module
    original = path.read_text()
    path.write_text(original + f"\n{line}  # noqa\n")
    try:
        result = lint_imports(tree)
    finally:
        path.write_text(original)

    assert result.returncode != 0
    broken = result.stdout.split("Broken contracts", 1)[-1]
    assert contract in broken, result.stdout
