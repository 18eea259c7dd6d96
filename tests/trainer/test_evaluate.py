"""Offline evaluation: a student's greedy answers on held-out prompts scored against the teacher's."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.trainer.conftest import intent_records, weather_call, weather_records
from trainer.dataset import DatasetOptions, select_examples
from trainer.evaluate import (
    evaluate,
    evaluate_adapter,
    evaluate_base_and_adapter,
    exact_match,
    response_of,
    teacher_answer_tokens,
)
from trainer.generation import StudentModels


def test_exact_match_normalises_text_and_compares_tool_calls() -> None:
    assert exact_match(response_of({"content": "Billing "}), response_of({"content": " billing"})) == 1.0
    assert exact_match(response_of({"content": "billing"}), response_of({"content": "sales"})) == 0.0
    paris = {"content": None, "tool_calls": [weather_call("Paris")]}
    spaced = {
        "content": None,
        "tool_calls": [{"function": {"name": "get_weather", "arguments": '{ "city":"Paris" }'}}],
    }
    rome = {"content": None, "tool_calls": [weather_call("Rome")]}
    assert exact_match(response_of(paris), response_of(spaced)) == 1.0
    assert exact_match(response_of(paris), response_of(rome)) == 0.0
    assert exact_match(response_of(paris), response_of({"content": None})) == 0.0


def test_a_student_that_learned_the_answer_agrees_and_the_base_does_not(
    tiny_model: Path, weather_full: Path
) -> None:
    (example,) = select_examples(weather_records("weather", 1), DatasetOptions(holdout=0.0)).train
    trained = evaluate_adapter(str(tiny_model), str(weather_full), [example])
    assert trained.n == 1 and trained.agreement == 1.0 and trained.pass_rate == 1.0
    assert trained.samples[0].student == trained.samples[0].teacher
    base = evaluate_adapter(str(tiny_model), None, [example], max_tokens=8)
    assert base.agreement == 0.0 and base.model == str(tiny_model)


def test_custom_and_router_scorers(tiny_model: Path, weather_full: Path) -> None:
    examples = select_examples(
        weather_records("weather", 2), DatasetOptions(holdout=0.0)
    ).train  # Paris, Berlin
    models = StudentModels(str(tiny_model))
    models.load("weather@v1", str(weather_full))
    seen: list[tuple[dict[str, Any], dict[str, Any]]] = []

    def half(teacher: dict[str, Any], student: dict[str, Any]) -> float:
        seen.append((teacher, student))
        return 0.5

    result = evaluate(models, "weather@v1", examples, scorer=half, pass_score=0.6)
    assert result.scorer == "half" and result.agreement == 0.5 and result.pass_rate == 0.0 and len(seen) == 2
    assert seen[0][0] == response_of(examples[0].answer)  # the teacher's recorded answer
    assert seen[0][1]["choices"][0]["finish_reason"] == "tool_calls"

    scorers = pytest.importorskip("router.scorers")
    assert hasattr(scorers, "score")
    by_router = evaluate(models, "weather@v1", examples, scorer="tool_call")
    exact = evaluate(models, "weather@v1", examples)
    assert by_router.scorer == "tool_call" and exact.scorer == "exact"
    assert exact.agreement == 0.5  # memorised Paris; answers Berlin with Paris too
    assert by_router.agreement >= exact.agreement


def test_an_intent_student_is_scored_on_every_held_out_prompt(tiny_model: Path, intent_lora: Path) -> None:
    holdout = select_examples(
        list(reversed(intent_records("intent", 40))), DatasetOptions(holdout=0.25)
    ).holdout
    result = evaluate_adapter(str(tiny_model), str(intent_lora), holdout, max_tokens=4, keep_samples=3)
    assert result.n == len(holdout) > 0 and len(result.samples) == 3
    assert 0.0 <= result.agreement <= 1.0 and result.latency_ms_p50 > 0
    assert result.metrics()["n"] == len(holdout)


def test_held_out_prompts_are_batched_and_capped_near_the_teachers_length(
    tiny_model: Path, intent_lora: Path
) -> None:
    holdout = select_examples(intent_records("intent", 40), DatasetOptions(holdout=0.25)).holdout
    with StudentModels(str(tiny_model)) as models:
        teacher = [teacher_answer_tokens(models.tokenizer, e) for e in holdout]
        assert all(0 < t < 8 for t in teacher)  # one word and the end-of-turn token
        capped = evaluate(models, models.base_name, holdout, answer_slack=2)
        # The untrained base never ends a turn: every answer runs to its cap, none to 512.
        assert capped.completion_tokens == sum(t + 2 for t in teacher)
        assert models.stats.max_batch > 1 and models.stats.rows > models.stats.steps
        uncapped = evaluate(models, models.base_name, holdout[:2], answer_slack=None, max_tokens=20)
        assert uncapped.completion_tokens == 40
        assert capped.metrics()["completion_tokens"] == capped.completion_tokens and capped.wall_s > 0


def test_the_base_and_the_adapter_answered_together_score_as_apart(
    tiny_model: Path, intent_lora: Path
) -> None:
    """The scheduler's comparison (one model load, both models in the same decode batches) gives
    each model the answers and scores it gets evaluated alone."""
    holdout = select_examples(intent_records("intent", 40), DatasetOptions(holdout=0.25)).holdout
    base, tuned = evaluate_base_and_adapter(str(tiny_model), str(intent_lora), holdout, max_tokens=4)
    alone_base = evaluate_adapter(str(tiny_model), None, holdout, max_tokens=4)
    alone_tuned = evaluate_adapter(str(tiny_model), str(intent_lora), holdout, max_tokens=4)
    assert tuned.model == "candidate" and base.model != tuned.model
    for together, alone in ((base, alone_base), (tuned, alone_tuned)):
        assert together.n == alone.n == len(holdout)
        assert together.agreement == alone.agreement and together.pass_rate == alone.pass_rate
        assert together.completion_tokens == alone.completion_tokens
        assert [s.student for s in together.samples] == [s.student for s in alone.samples]
    assert [s.student for s in tuned.samples] != [s.student for s in base.samples]  # two models answered
