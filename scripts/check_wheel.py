"""Builds the wheel and checks that the generated stubs ship in it with their type information.

    python scripts/check_wheel.py

Checks: every generated module in orders/v1 is in the wheel with its .pyi, byte for byte as
committed; py.typed is there; every console script is declared; and mypy, given only the
installed wheel, types the stubs (a wrong field type in a request is an error).
Exits 1 with one line per problem.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {"orders", "orders-local", "orders-migrate", "orders-admin", "orders-write-service", "orders-read-service"}

TYPED_USE = """
from orders.v1 import commands_pb2
request = commands_pb2.CreateOrderRequest(customer_id="alice", currency_code="EUR")
version: int = request.expected_version
"""
MISTYPED_USE = """
from orders.v1 import commands_pb2
commands_pb2.CreateOrderRequest(customer_id=42)
"""


def build_wheel(out: Path) -> Path:
    command = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(out), str(ROOT)]
    subprocess.run(command, check=True)
    return next(out.glob("orders_cqrs-*.whl"))


def content_problems(wheel: zipfile.ZipFile) -> list[str]:
    names = set(wheel.namelist())
    migrations = [path.relative_to(ROOT).as_posix() for path in (ROOT / "orders/store/migrations").glob("*.sql")]
    problems = [f"missing {name}" for name in ("orders/py.typed", *migrations) if name not in names]
    for module in sorted((ROOT / "orders" / "v1").glob("*_pb2*.py")):
        for path in (module, module.with_suffix(".pyi")):
            name = path.relative_to(ROOT).as_posix()
            if name not in names:
                problems.append(f"missing {name}")
            elif wheel.read(name) != path.read_bytes():
                problems.append(f"{name} in the wheel differs from the committed file")
    entry_points = next((wheel.read(n).decode() for n in names if n.endswith("entry_points.txt")), "")
    declared = {line.split("=")[0].strip() for line in entry_points.splitlines() if "=" in line}
    problems += [f"console script {script} not declared" for script in sorted(SCRIPTS - declared)]
    return problems


def mypy(site: Path, code: str) -> subprocess.CompletedProcess[str]:
    """mypy on `code`, finding `orders` only in `site` (the installed wheel)."""
    with tempfile.TemporaryDirectory() as work:
        snippet = Path(work) / "snippet.py"
        snippet.write_text(code)
        env = {**os.environ, "MYPYPATH": str(site)}
        command = [sys.executable, "-m", "mypy", "--strict", "--no-incremental", "--config-file=", str(snippet)]
        return subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, check=False)


def typing_problems(wheel_path: Path, site: Path) -> list[str]:
    install = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(site), str(wheel_path)]
    subprocess.run(install, check=True)
    problems = []
    typed = mypy(site, TYPED_USE)
    if typed.returncode != 0:
        problems.append(f"mypy refuses correct use of the installed stubs: {typed.stdout.strip()}")
    mistyped = mypy(site, MISTYPED_USE)
    if mistyped.returncode == 0 or "customer_id" not in mistyped.stdout:
        problems.append(f"mypy accepts an int for a string field: the stubs carry no types ({mistyped.stdout.strip()})")
    return problems


def main() -> None:
    with tempfile.TemporaryDirectory() as work:
        wheel_path = build_wheel(Path(work) / "dist")
        with zipfile.ZipFile(wheel_path) as wheel:
            problems = content_problems(wheel)
        problems += typing_problems(wheel_path, Path(work) / "site")
    for problem in problems:
        print(f"check_wheel: {problem}", file=sys.stderr)
    if problems:
        sys.exit(1)
    print(f"check_wheel: {wheel_path.name} ships the typed stubs and the console scripts")


if __name__ == "__main__":
    main()
