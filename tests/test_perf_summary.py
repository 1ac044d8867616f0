"""perf/summary.py: the README's performance table from benchmarks' JSON lines."""

from __future__ import annotations

import json

from perf.summary import main, render

RECORDS = [
    {"machine": "box", "cpus": 2, "cpu": "Some CPU", "memory_gib": 24.0, "kernel": "6.18",
     "python": "3.11.7", "date": "2026-11-27 10:00 UTC"},
    {"bench": "agents", "workload": "ask_p50", "system": "astra", "value": 30.0, "unit": "us"},
    {"bench": "agents", "workload": "ask_p50", "system": "mp_pipe", "value": 40.0, "unit": "us"},
    {"bench": "agents", "workload": "ask_p50", "system": "ray", "value": None, "unit": "us",
     "skipped": "not installed"},
    {"bench": "agents", "workload": "ask_async_20k", "system": "astra", "value": 100000.0,
     "unit": "calls/s"},
    {"bench": "agents", "workload": "ask_async_20k", "system": "mp_pipe", "value": 200000.0,
     "unit": "calls/s"},
    {"bench": "agents", "workload": "odd_one", "system": "astra", "value": 5.0, "unit": "ms"},
]  # fmt: skip


def test_the_table_sets_each_headline_beside_its_peers_with_ratios() -> None:
    text = render(RECORDS)
    assert "on `box`: 2 CPUs (Some CPU)" in text
    rows = [line for line in text.splitlines() if line.startswith(("| agent", "| 20,000"))]
    assert rows == [
        "| agent ask, p50 | 30.0 us | mp_pipe 40.0 us (**0.75x**); ray: not installed |",
        "| 20,000 asks in flight, to 1 agent | 100,000 calls/s | mp_pipe 200,000 calls/s (0.5x) |",
    ]
    assert "odd_one" not in text  # not a headline
    assert "odd_one" in render(RECORDS, every=True)


def test_ratios_read_as_multiples_or_fractions() -> None:
    from perf.summary import _ratio

    assert [_ratio(r) for r in (2.104, 61.7, 1903.0, 0.75, 0.065, 5.9e-6)] == [
        "2.1x",
        "62x",
        "1,903x",
        "0.75x",
        "1/15",
        "1/170,000",
    ]


def test_a_saved_run_renders_without_running_anything(tmp_path, capsys) -> None:
    saved = tmp_path / "run.jsonl"
    saved.write_text("".join(json.dumps(r) + "\n" for r in RECORDS) + "not json\n")
    assert main(["--from", str(saved)]) == 0
    assert "| agent ask, p50 | 30.0 us |" in capsys.readouterr().out
