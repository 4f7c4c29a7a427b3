"""CPU per operation, the floor made of the ceilings' parts, and the overhead factor (pure, no I/O;
tests/unit/test_bench_cpu.py).

Every measurement reports the CPU seconds its processes spent within its measured window, per unit
of work done in that window: `unit_cpu_us_<process>` for each process of its path and their sum
`unit_cpu_us`. From the ceilings of the same round:

- a gRPC call costs the echo ceiling's unit (echo server plus client);
- storing a command's event costs the raw INSERT ceiling's unit (PostgreSQL plus client);
- making an event visible costs one SET per projection (`sets_per_event`) at the MULTI ceiling's
  unit (Redis plus client, per SET);
- answering a query from Redis costs the GET ceiling's unit (Redis plus client).

floor per command = echo + INSERT + sets_per_event x SET; floor per query = echo + GET. The
overhead factor is a measurement's CPU per unit over its floor, per round; the median over rounds
is what counts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from orders_bench.stats import Figures, Spread, aligned

CPU = "cpu"  # the derived measurement's name in the rounds and summaries
TOTAL = "unit_cpu_us"
PER_PROCESS = "unit_cpu_us_"
# The measurements compared with each floor.
COMMANDS = ("create", "create-x2", "naive-create", "lifecycle")
QUERIES = ("get", "get-x2", "naive-get")


def _belongs(owner: str, parts: Sequence[str]) -> bool:
    """Whether a process is one of `parts`; the client processes are client, or client0, client1, ..."""
    return owner in parts or ("client" in parts and owner.removeprefix("client").isdigit())


def unit_cpu(used: Mapping[str, float], units: int, parts: Sequence[str]) -> Figures:
    """CPU µs per unit of work of each process of `parts`, and their sum; empty without work."""
    if units <= 0 or not used:
        return {}
    mine = {owner: seconds for owner, seconds in used.items() if _belongs(owner, parts)}
    figures = {f"{PER_PROCESS}{owner}": 1e6 * seconds / units for owner, seconds in mine.items()}
    figures[TOTAL] = 1e6 * sum(mine.values()) / units
    return figures


@dataclass(frozen=True)
class Floor:
    """A round's floor per command and per query, in µs of CPU, with the parts they are made of."""

    call_us: float
    insert_us: float
    set_us: float
    get_us: float
    sets_per_event: int

    @property
    def command_us(self) -> float:
        return self.call_us + self.insert_us + self.sets_per_event * self.set_us

    @property
    def query_us(self) -> float:
        return self.call_us + self.get_us


def floor_of(round_figures: Mapping[str, Figures], sets_per_event: int) -> Floor | None:
    """The floor from one round's ceilings; None unless all four were measured with CPU figures."""
    needed = ("echo", "pg-insert", "redis-multi", "redis-get")
    if any(TOTAL not in round_figures.get(name, {}) for name in needed):
        return None
    call, insert, multi, get = (round_figures[name][TOTAL] for name in needed)
    return Floor(call, insert, multi, get, sets_per_event)


def median_floor(summaries: Mapping[str, Mapping[str, Spread]], sets_per_event: int) -> Floor | None:
    """The floor from the ceilings' medians over the rounds, to show what it is made of."""
    medians = {name: {k: v.median for k, v in figures.items()} for name, figures in summaries.items()}
    return floor_of(medians, sets_per_event)


def cpu_rounds(rounds: Mapping[str, Sequence[Figures]], sets_per_event: int) -> list[Figures]:
    """Per round: the floors, and each command's and query's measurement's overhead factor."""
    found: list[Figures] = []
    count = max((len(r) for r in rounds.values()), default=0)
    for index in range(count):
        this = {name: figures[index] for name, figures in rounds.items() if index < len(figures)}
        floor = floor_of(this, sets_per_event)
        if floor is None:
            continue
        figures: Figures = {"floor_command_us": floor.command_us, "floor_query_us": floor.query_us}
        for names, per in ((COMMANDS, floor.command_us), (QUERIES, floor.query_us)):
            for name in names:
                if TOTAL in this.get(name, {}) and per > 0:
                    figures[f"overhead_{name}"] = this[name][TOTAL] / per
        found.append(figures)
    return found


def _us(value: float) -> str:
    return f"{value:,.0f}" if value >= 10 else f"{value:.1f}"


def render_cpu(
    rows: Sequence[tuple[str, str, Mapping[str, Spread]]], cpu: Mapping[str, Spread], short: Mapping[str, str]
) -> str:
    """The CPU table: (measurement name, label, its summary) per row, with the floor it is compared
    with and the overhead factor (both computed per round, then the median). `short` names processes."""
    lines = [["CPU per unit (µs, medians over rounds)", "all", "floor", "factor", "by process"]]
    for name, label, figures in rows:
        if TOTAL not in figures:
            continue
        floor = cpu.get("floor_command_us" if name in COMMANDS else "floor_query_us")
        factor = cpu.get(f"overhead_{name}")
        by_process = sorted(
            ((k.removeprefix(PER_PROCESS), v.median) for k, v in figures.items() if k.startswith(PER_PROCESS)),
            key=lambda item: -item[1],
        )
        by_process = [(owner, us) for owner, us in by_process if us > 0]  # idle in the window
        lines.append(
            [
                label,
                _us(figures[TOTAL].median),
                _us(floor.median) if floor and factor else "",
                f"{factor.median:.2f}x" if factor else "",
                ", ".join(f"{short.get(owner, owner)} {_us(us)}" for owner, us in by_process),
            ]
        )
    return aligned(lines)


def describe_floor(floor: Floor) -> str:
    """What the floors are made of, in µs of CPU (from the parts' medians; the table's floor and
    factor are each round's own, then their median, so they may differ a little)."""
    return (
        "the parts' medians over the rounds: "
        f"floor per command = gRPC call {_us(floor.call_us)} + INSERT transaction {_us(floor.insert_us)}"
        f" + {floor.sets_per_event} x SET {_us(floor.set_us)} = {_us(floor.command_us)} µs;"
        f" floor per query = gRPC call {_us(floor.call_us)} + GET {_us(floor.get_us)} = {_us(floor.query_us)} µs"
    )
