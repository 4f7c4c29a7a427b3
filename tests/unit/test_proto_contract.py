"""The protos are held to buf's rules, and a wire- or stub-breaking change fails the check.

`buf breaking` compares the protos with `protos/released.binpb`, the image of the last
released API (docs/api.md). The tests below also prove that the check bites:
each known kind of breaking change, made to a copy of the protos, is refused.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.helpers import require_tools

ROOT = Path(__file__).resolve().parents[2]
RELEASED = ROOT / "protos" / "released.binpb"
BUF = shutil.which("buf")


@pytest.fixture(autouse=True)
def _buf() -> None:
    require_tools("buf", hint="pip install buf-bin")


def buf(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    assert BUF is not None
    return subprocess.run([BUF, *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False)


def test_protos_pass_buf_lint() -> None:
    """buf's STANDARD lint rules pass, with only the exceptions documented in buf.yaml."""
    result = buf("lint")
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_protos_are_buf_formatted() -> None:
    """The protos are in buf's canonical format (`buf format -w` fixes them)."""
    result = buf("format", "-d", "--exit-code")
    assert (result.returncode, result.stdout) == (0, "")


def test_protos_are_compatible_with_the_released_api() -> None:
    """No change since the last release breaks the wire format or generated code."""
    result = buf("breaking", "--against", str(RELEASED))
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


BREAKING_EDITS = {
    "renumbered field": ("commands.proto", "int64 version = 2;", "int64 version = 12;"),
    "deleted field": ("types.proto", "  string line2 = 3;\n", ""),
    "changed field type": ("types.proto", "int64 minor_units = 2;", "int32 minor_units = 2;"),
    "renamed enum value": ("types.proto", "ORDER_STATUS_SHIPPED = 3;", "ORDER_STATUS_SENT = 3;"),
    "deleted rpc": ("queries.proto", "  rpc ListOrders(ListOrdersRequest) returns (ListOrdersResponse);\n", ""),
    "streaming changed": ("queries.proto", "returns (stream WatchOrderResponse)", "returns (WatchOrderResponse)"),
}


@pytest.mark.parametrize("edit", BREAKING_EDITS, ids=list(BREAKING_EDITS))
def test_a_breaking_change_fails_the_check(tmp_path: Path, edit: str) -> None:
    """Each kind of breaking change, made to a copy of the protos, makes `buf breaking` fail."""
    file_name, old, new = BREAKING_EDITS[edit]
    shutil.copytree(ROOT / "protos", tmp_path / "protos")
    shutil.copy(ROOT / "buf.yaml", tmp_path / "buf.yaml")
    proto = tmp_path / "protos" / "orders" / "v1" / file_name
    text = proto.read_text()
    assert old in text, f"the edit no longer applies to {file_name}"
    proto.write_text(text.replace(old, new, 1))

    result = buf("breaking", "--against", str(RELEASED), cwd=tmp_path)

    assert result.returncode != 0, f"{edit} was not detected"
