"""The benchmark's CPU accounting: whose each process is, CPU per unit of work, the floor made of the
ceilings' parts and the overhead factor (orders_bench.cpu, and the pure parts of orders_bench.system)."""

from __future__ import annotations

import pytest

from orders_bench.cpu import Floor, cpu_rounds, describe_floor, floor_of, median_floor, render_cpu, unit_cpu
from orders_bench.stats import Spread, summarize_rounds
from orders_bench.system import ProcessCpu, owners, spent

CEILINGS = {
    "echo": {"unit_cpu_us": 400.0},
    "pg-insert": {"unit_cpu_us": 250.0},
    "redis-multi": {"unit_cpu_us": 25.0},
    "redis-get": {"unit_cpu_us": 80.0},
}


def test_cpu_per_unit_sums_the_parts_of_the_path_and_names_each() -> None:
    used = {"write_service": 0.5, "postgres": 0.2, "client0": 0.1, "client1": 0.1, "bench": 3.0, "naive_write": 1.0}
    parts = ("write_service", "postgres", "client")
    figures = unit_cpu(used, 1000, parts)
    assert figures["unit_cpu_us_write_service"] == pytest.approx(500.0)
    assert figures["unit_cpu_us_client0"] == pytest.approx(100.0)
    assert figures["unit_cpu_us"] == pytest.approx(900.0)  # not the benchmark's own, nor another path's
    assert "unit_cpu_us_bench" not in figures
    assert "unit_cpu_us_naive_write" not in figures
    assert unit_cpu(used, 0, parts) == {}
    assert unit_cpu({}, 10, parts) == {}


def test_the_floor_is_a_call_an_insert_and_a_set_per_projection_or_a_call_and_a_get() -> None:
    floor = floor_of(CEILINGS, sets_per_event=2)
    assert floor == Floor(400.0, 250.0, 25.0, 80.0, 2)
    assert floor.command_us == pytest.approx(400 + 250 + 2 * 25)
    assert floor.query_us == pytest.approx(400 + 80)
    assert "= 700 µs" in describe_floor(floor)
    assert "= 480 µs" in describe_floor(floor)


def test_no_floor_without_every_ceiling() -> None:
    partial = {name: figures for name, figures in CEILINGS.items() if name != "redis-get"}
    assert floor_of(partial, 2) is None
    assert floor_of({**CEILINGS, "echo": {"rate": 1.0}}, 2) is None


def test_overhead_factors_per_round_against_that_rounds_floor() -> None:
    rounds = {name: [figures, {"unit_cpu_us": 2 * figures["unit_cpu_us"]}] for name, figures in CEILINGS.items()}
    rounds["create"] = [{"unit_cpu_us": 1050.0}, {"unit_cpu_us": 1400.0}]
    rounds["naive-get"] = [{"unit_cpu_us": 960.0}, {"rate": 5.0}]
    found = cpu_rounds(rounds, sets_per_event=2)
    assert found[0] == pytest.approx(
        {"floor_command_us": 700.0, "floor_query_us": 480.0, "overhead_create": 1.5, "overhead_naive-get": 2.0}
    )
    assert found[1]["overhead_create"] == pytest.approx(1.0)  # the second round's floor is twice as high
    assert "overhead_naive-get" not in found[1]


def test_rounds_without_the_ceilings_give_no_cpu_figures() -> None:
    assert cpu_rounds({"create": [{"unit_cpu_us": 1000.0}]}, 2) == []
    assert cpu_rounds({}, 2) == []


def test_the_cpu_table_shows_each_path_against_its_floor() -> None:
    summaries = summarize_rounds([{"unit_cpu_us": 1050.0, "unit_cpu_us_write_service": 700.0, "unit_cpu_us_pg": 0.0}])
    cpu = summarize_rounds([{"floor_command_us": 700.0, "overhead_create": 1.5}])
    echo = {"unit_cpu_us": Spread(400.0, 400.0, 400.0)}
    table = render_cpu([("echo", "gRPC echo", echo), ("create", "CreateOrder", summaries)], cpu, {"write_service": "w"})
    lines = table.splitlines()
    assert lines[2].split() == ["gRPC", "echo", "400"]  # a ceiling: no floor of its own
    assert "1,050" in lines[3]
    assert "700" in lines[3]
    assert "1.50x" in lines[3]
    assert lines[3].endswith("w 700")  # idle processes left out
    assert median_floor({name: summarize_rounds([f]) for name, f in CEILINGS.items()}, 2) == floor_of(CEILINGS, 2)


def test_a_named_process_owns_its_children_but_the_benchmark_only_itself() -> None:
    table = {
        10: ProcessCpu(1, 1.0, None),  # the benchmark
        11: ProcessCpu(10, 2.0, None),  # a write service of several processes
        12: ProcessCpu(11, 3.0, None),  # ... its child
        13: ProcessCpu(12, 0.5, None),  # ... and grandchild
        14: ProcessCpu(10, 4.0, None),  # a rebuild's worker, started by the benchmark: nobody's
        15: ProcessCpu(1, 5.0, "postgres"),
        16: ProcessCpu(1, 6.0, None),  # someone else's
    }
    found = owners(table, {"bench": 10, "write_service": 11}, trees=["write_service"])
    assert found == {10: "bench", 11: "write_service", 12: "write_service", 13: "write_service", 15: "postgres"}


def test_cpu_spent_counts_newborn_processes_from_zero() -> None:
    first = {1: ("write_service", 10.0), 2: ("postgres", 5.0)}
    last = {1: ("write_service", 10.5), 2: ("postgres", 5.25), 3: ("postgres", 0.25)}
    assert spent(first, last) == {"write_service": 0.5, "postgres": 0.5}
