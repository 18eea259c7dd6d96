"""The pure parts of the pages: samples the gate still needs, answer diffs, SVG plots."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from gateway.console.diff import answer_text, side_by_side
from gateway.console.plots import Chart, Series, render
from gateway.console.views import samples_needed
from router.gate import wilson_interval


def test_samples_needed_is_the_least_that_clears_the_bound() -> None:
    for passed, n, minimum, threshold in [
        (0, 0, 20, 0.8),
        (18, 20, 20, 0.8),
        (20, 40, 20, 0.9),
        (50, 50, 20, 0.8),
    ]:
        k = samples_needed(passed, n, minimum, threshold, 0.95)
        assert k is not None and n + k >= minimum
        assert wilson_interval(passed + k, n + k, 0.95)[0] >= threshold - 1e-12
        if k > max(0, minimum - n):
            assert wilson_interval(passed + k - 1, n + k - 1, 0.95)[0] < threshold
    assert samples_needed(50, 50, 20, 0.8, 0.95) == 0
    assert samples_needed(0, 10**6, 1, 0.99, 0.95) is None


def test_json_answers_are_compared_field_by_field() -> None:
    teacher = {"choices": [{"message": {"content": '{"b": 1, "a": [1, 2]}'}}]}
    student = {"choices": [{"message": {"content": '{"a": [1, 2], "b": 2}'}}]}
    rows = side_by_side(answer_text(teacher), answer_text(student))
    assert [(r.tag, r.teacher, r.student) for r in rows if r.tag != "equal"] == [
        ("replace", '  "b": 1', '  "b": 2')
    ]
    tool = {"choices": [{"message": {"tool_calls": [{"function": {"name": "f", "arguments": '{"x": 1}'}}]}}]}
    assert answer_text(tool) == 'tool f:\n{\n  "x": 1\n}'
    assert answer_text(None) == ""


def test_a_chart_is_well_formed_svg_with_its_text_escaped() -> None:
    chart = Chart(
        "a <b> & c",
        "step",
        "loss",
        [Series("train", [(1, 2.0), (2, 1.0), (3, 0.5)]), Series("held-out", [(3, 0.7)], css="s3")],
        marks=[(0.8, "threshold")],
    )
    svg = ET.fromstring(render(chart))
    assert svg.tag.endswith("svg")
    texts = [t.text for t in svg.iter() if t.tag.endswith("text")]
    assert "a <b> & c" in texts
    assert len([e for e in svg.iter() if e.tag.endswith("polyline")]) == 2
    empty = ET.fromstring(render(Chart("nothing", "x", "y", [Series("s", [])])))
    assert "no data yet" in [t.text for t in empty.iter() if t.tag.endswith("text")]
