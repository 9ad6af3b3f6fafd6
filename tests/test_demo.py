"""``moerge demo``: tiny experts trained in seconds; routed answers are the right expert's, the static merge's
are not (the README's first command must show what routing buys)."""

from __future__ import annotations

from pathlib import Path

import pytest

from moerge.demo import demo_prompts, format_rows, run_demo


def test_demo_routes_to_the_right_expert(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rows = run_demo(tmp_path / "demo")
    prompts = demo_prompts()
    assert [r["prompt"] for r in rows] == [p for _, p, _ in prompts]
    for row in rows:
        assert row["route"] == row["task"], row  # the router picks the prompt's expert
        assert row["routed"] == row["expert"], row  # and the routed model answers exactly as that expert
        assert row["merge"] != row["expert"], row  # the static merge of the three does not
    legible = [r for r in rows if r["expert"] == r["right"]]
    assert len(legible) >= len(rows) - 1  # the experts answer their toy task (right on all but at most one)
    out = capsys.readouterr().out
    assert "routed = expert alone on 6/6 prompts" in out and "static merge" in out
    assert format_rows(rows).count("\n") >= len(rows) + 2
