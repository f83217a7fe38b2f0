"""The benchmark report: the raw JSON of a run draws the same chart again, and a figure held against two
peers stays two rows (with its spread and its target) instead of being merged."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from PIL import Image

from bench.report import Figure, Outcome, Result, Target, outcomes_from_json, write_chart, write_markdown


def _results() -> list[Result]:
    tokens = Figure([80.0, 84.0, 86.0])
    return [
        Result("llm", "tokens, 8 streams", "tok/s", tokens, peer="server",
               peer_value=Figure([36.0, 40.0, 38.0]), ratio=Figure([2.2, 2.1, 2.3]),
               target=Target("ratio", ">=", 3.0)),
        Result("llm", "tokens, 8 streams", "tok/s", tokens, peer="ceiling",
               peer_value=Figure([90.0, 99.0, 97.0]), ratio=Figure([0.89, 0.85, 0.89]),
               target=Target("ratio", ">=", 0.85)),
        Result("load", "failed streams", "errors", Figure([0.0]), target=Target("value", "<=", 0.0)),
    ]  # fmt: skip


def test_a_run_json_draws_the_chart_again(tmp_path: Path) -> None:
    outcomes = [
        Outcome("llm", _results(), "details", memory_mib={"broker": {"start": 1, "peak": 2, "end": 2}})
    ]
    raw = {
        "profile": "full",
        "machine": {"cpu": "test"},
        "results": [dataclasses.asdict(r) for o in outcomes for r in o.results],
        "memory_mib": outcomes[0].memory_mib,
    }
    again = outcomes_from_json(json.loads(json.dumps(raw)))
    assert [dataclasses.asdict(r) for r in again[0].results] == raw["results"]
    assert [r.verdict for r in again[0].results] == ["MISS", "PASS", "PASS"]
    write_chart(tmp_path / "chart.png", again, "test")
    with Image.open(tmp_path / "chart.png") as chart:
        assert chart.size[0] > 500 and chart.size[1] > 400
    write_markdown(tmp_path / "report.md", outcomes, {}, {"cpu": "test"}, "full")
    table = (tmp_path / "report.md").read_text()
    assert table.count("tokens, 8 streams") >= 2 and "**MISS**" in table and "**PASS**" in table


def test_rows_of_one_figure_against_two_peers_stay_apart(tmp_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bench.report import _ratio_panel

    figure, axes = plt.subplots()
    _ratio_panel(axes, [r for r in _results() if r.is_rate])
    labels = [tick.get_text() for tick in axes.get_yticklabels()]
    plt.close(figure)
    assert len(labels) == 2 and labels[0] != labels[1]
