"""End to end on a tiny model: answer, score, review with the project's own server as the judge, summarize."""

from __future__ import annotations

import pytest
from full_path import full_path
from serving_fixtures import write_tiny_checkpoint


@pytest.mark.slow
def test_answer_score_review_summarize(tmp_path):
    model = write_tiny_checkpoint(tmp_path / "tiny" / "stage2")
    out = full_path(str(model), tmp_path / "work")
    sqa = out["sqa_result"]
    assert sqa["count"] == 6 and set(sqa["results"]) == {str(100 + i) for i in range(6)}
    assert all(v in (-1, 0, 1, 2) for v in sqa["results"].values())
    reviews = out["reviews"]
    assert [r["question_id"] for r in reviews] == list(range(6))
    for r in reviews:
        assert r["judge_model"] == "judge-under-test"
        assert r["judge_model_version"] == "judge-under-test"  # what the server reports
        assert len(r["tuple"]) == 2 and isinstance(r["content"], str)
        assert r["answer2_id"] == out["bench_answers"][r["question_id"]]["answer_id"]
