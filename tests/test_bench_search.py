"""``pystage-bench search`` on tiny settings: the three ways, their table and JSON, the same choice both ways."""
from __future__ import annotations

import json

from pystage.bench import search


def test_search_bench_runs_the_three_ways(tmp_path, capsys) -> None:
    out = tmp_path / "search.json"
    assert search.main(["--n", "100", "--n-val", "50", "--width", "4", "--draws", "2", "--repeats", "1",
                        "--model", "cnn2", "--tmp", str(tmp_path), "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert text.splitlines()[0].startswith("device: cpu") and "python -m pystage.bench.search" in text
    assert "population / sequential" in text
    d = json.loads(out.read_text())
    assert [r["way"] for r in d["rows"]] == ["one", "sequential", "population"]
    assert [r["trials"] for r in d["rows"]] == ["1/1", "3/3", "3/3"]  # two stages, draws + the start point
    assert d["same_choice"] and d["population_ran"]
    assert d["population_vs_sequential"] == d["rows"][2]["search_s"] / d["rows"][1]["search_s"]
    assert all(r["search_s"] > 0 and r["fit_s"] >= r["search_s"] for r in d["rows"])
    assert [p.name for p in tmp_path.iterdir()] == ["search.json"]  # temporary stores removed
