"""The examples the docs show run as printed, against the real services.

- Every complete Python program (a ```python block that ends in `asyncio.run(main())`) in the README
  and docs/api.md runs in a fresh interpreter, with only the two service addresses replaced, and
  prints what its comments promise.
- The `orders` session of docs/cli.md runs command by command, as separate processes, and prints
  what the page shows. Tokens and times differ from run to run: times are compared as a pattern, and
  each token the page shows stands for the one the same command really printed, also where a later
  command passes it on (`--token`).
"""

from __future__ import annotations

import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from orders.tools.processes import child_environment, script_command
from tests.helpers import run_to_end
from tests.integration.conftest import System

ROOT = Path(__file__).resolve().parents[2]
CLI_PAGE = ROOT / "docs" / "cli.md"
WRITE_ADDRESS, READ_ADDRESS = "127.0.0.1:50051", "127.0.0.1:50052"  # the addresses the docs use
# What each page's program prints, as a pattern of its whole output.
PROGRAM_OUTPUT = {
    "README.md": r"\S+ 3 360\n",  # order id, the apples' quantity, the total in minor units
    "docs/api.md": r"ORDER_NOT_PENDING\n",
}
TIME = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\dZ")
RESULT_TOKEN = re.compile(r"(?<=, token )\d+-\d+$")


def python_programs(page: str) -> list[str]:
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / page).read_text(), flags=re.S)
    return [block for block in blocks if block.rstrip().endswith("asyncio.run(main())")]


@pytest.mark.parametrize("page", sorted(PROGRAM_OUTPUT))
async def test_python_program_runs_as_printed(system: System, page: str) -> None:
    """The page holds one complete program; it runs to its end and prints what it says it prints."""
    [program] = python_programs(page)
    program = program.replace(WRITE_ADDRESS, f"127.0.0.1:{system.write_port}")
    program = program.replace(READ_ADDRESS, f"127.0.0.1:{system.read_port}")

    status, out, err = await run_to_end([sys.executable, "-c", program])

    assert status == 0, err
    assert re.fullmatch(PROGRAM_OUTPUT[page], out), out


@dataclass(frozen=True)
class Step:
    argv: list[str]  # after `orders`
    shown: list[str]  # the lines the page shows after the command


def cli_session() -> list[Step]:
    """Every `$ orders ...` line of the page's indented transcripts, with the lines shown after it.
    A transcript ends at the first line that is neither indented nor blank."""
    steps: list[Step] = []
    in_transcript = False
    for line in CLI_PAGE.read_text().splitlines():
        if line.startswith("    $ orders "):
            steps.append(Step(shlex.split(line.removeprefix("    $ orders ")), []))
            in_transcript = True
        elif line and not line.startswith("    "):
            in_transcript = False
        elif in_transcript:
            steps[-1].shown.append(line.removeprefix("    "))  # a blank line inside a transcript stays
    return [Step(step.argv, trim(step.shown)) for step in steps]


def trim(lines: list[str]) -> list[str]:
    while lines and lines[-1] == "":
        lines = lines[:-1]
    return lines


async def test_cli_session_prints_what_the_page_shows(system: System) -> None:
    """Each command of docs/cli.md prints the lines shown under it (stdout, then stderr), and exits 0
    exactly when it shows no `orders:` error line."""
    env = child_environment(
        {
            "ORDERS_WRITE_ADDRESS": f"127.0.0.1:{system.write_port}",
            "ORDERS_READ_ADDRESS": f"127.0.0.1:{system.read_port}",
        }
    )
    real_tokens: dict[str, str] = {}  # token shown on the page -> token printed in this run
    steps = cli_session()
    assert len(steps) >= 10

    for step in steps:
        argv = [real_tokens.get(arg, arg) for arg in step.argv]
        status, out, err = await run_to_end(script_command("orders", *argv), env)
        printed = trim((out + err).splitlines())
        for shown, got in zip(step.shown, printed, strict=False):
            page_token, run_token = RESULT_TOKEN.search(shown), RESULT_TOKEN.search(got)
            if page_token and run_token:
                real_tokens[page_token.group()] = run_token.group()

        assert [masked(line, real_tokens) for line in step.shown] == [TIME.sub("<time>", line) for line in printed]
        assert (status == 0) == (not any(line.startswith("orders:") for line in step.shown)), (argv, status)


def masked(shown: str, real_tokens: dict[str, str]) -> str:
    """A line of the page as this run prints it: its token replaced by the real one, times masked."""
    shown = RESULT_TOKEN.sub(lambda token: real_tokens.get(token.group(), token.group()), shown)
    return TIME.sub("<time>", shown)
