"""The embedded student server speaks vLLM's contract: checked over HTTP with httpx and the openai SDK."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam, ChatCompletionToolUnionParam

from tests.servers import ServerThread, serve
from tests.trainer.conftest import INTENT_SYSTEM, WEATHER_TOOL
from trainer.generation import StudentModels
from trainer.student_server import create_student_app

WEATHER_PROMPT: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "What is the weather in Paris? (request 0)"}
]
INTENT_PROMPT: list[ChatCompletionMessageParam] = [
    {"role": "system", "content": INTENT_SYSTEM},
    {"role": "user", "content": "refund my invoice"},
]
# The same tool as the SDK types it (the trainer's helpers take plain dicts).
WEATHER_TOOLS: list[ChatCompletionToolUnionParam] = [
    {"type": "function", "function": WEATHER_TOOL["function"]}
]


@pytest.fixture(scope="module")
def student(tiny_model: Path) -> Iterator[ServerThread]:
    with serve(create_student_app(StudentModels(str(tiny_model), served_name="tiny-base"))) as server:
        yield server


@pytest.fixture(scope="module")
def client(student: ServerThread) -> openai.OpenAI:
    return openai.OpenAI(base_url=student.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def loaded(student: ServerThread, intent_lora: Path, weather_full: Path) -> dict[str, str]:
    """``intent@v1`` (LoRA) and ``weather@v1`` (a full model, our extension) loaded over HTTP."""
    adapters = {"intent@v1": str(intent_lora), "weather@v1": str(weather_full)}
    for name, path in adapters.items():
        r = httpx.post(student.url + "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path})
        assert r.status_code == 200, r.text
    return adapters


def post(student: ServerThread, path: str, body: Any) -> httpx.Response:
    return httpx.post(student.url + path, json=body, timeout=60)


def test_health_is_200(student: ServerThread) -> None:
    assert httpx.get(student.url + "/health").status_code == 200


def test_models_lists_the_base_model_without_parent(student: ServerThread, tiny_model: Path) -> None:
    data = httpx.get(student.url + "/v1/models").json()
    base = next(m for m in data["data"] if m["id"] == "tiny-base")
    assert data["object"] == "list"
    assert base["object"] == "model" and base["parent"] is None and base["root"] == str(tiny_model)
    assert base["max_model_len"] == 512


def test_load_answers_200_plain_text_and_lists_the_adapter(
    student: ServerThread, intent_lora: Path, client: openai.OpenAI
) -> None:
    r = post(student, "/v1/load_lora_adapter", {"lora_name": "probe@v1", "lora_path": str(intent_lora)})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    assert r.text == "Success: LoRA adapter 'probe@v1' added successfully."
    cards = {m.id: m for m in client.models.list().data}
    assert cards["probe@v1"].model_extra is not None
    assert cards["probe@v1"].model_extra["parent"] == "tiny-base"
    assert cards["probe@v1"].model_extra["root"] == str(intent_lora)

    again = post(student, "/v1/load_lora_adapter", {"lora_name": "probe@v1", "lora_path": str(intent_lora)})
    assert again.status_code == 400
    error = again.json()["error"]
    assert "has already been loaded" in error["message"] and error["code"] == 400
    assert set(error) == {"message", "type", "param", "code"}

    inplace = post(
        student,
        "/v1/load_lora_adapter",
        {"lora_name": "probe@v1", "lora_path": str(intent_lora), "load_inplace": True},
    )
    assert inplace.status_code == 200

    gone = post(student, "/v1/unload_lora_adapter", {"lora_name": "probe@v1"})
    assert gone.status_code == 200 and gone.text == "Success: LoRA adapter 'probe@v1' removed successfully."
    assert "probe@v1" not in {m.id for m in client.models.list().data}
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="probe@v1", messages=INTENT_PROMPT, max_tokens=2)


def test_load_from_a_path_without_adapter_is_404(student: ServerThread, tmp_path: Path) -> None:
    for path in (str(tmp_path / "missing"), str(tmp_path)):
        r = post(student, "/v1/load_lora_adapter", {"lora_name": "ghost", "lora_path": path})
        assert r.status_code == 404
        assert (
            r.json()["error"]["type"] == "NotFoundError"
            and "No adapter found" in r.json()["error"]["message"]
        )


def test_load_with_a_missing_field_is_400(student: ServerThread) -> None:
    for body in ({"lora_name": "x"}, {"lora_path": "/tmp"}, {"lora_name": "", "lora_path": "/tmp"}):
        r = post(student, "/v1/load_lora_adapter", body)
        assert r.status_code == 400
        assert r.json()["error"]["message"] == "Both 'lora_name' and 'lora_path' must be provided."
    assert httpx.post(student.url + "/v1/load_lora_adapter", content=b"{not json").status_code == 400


def test_load_of_an_incompatible_adapter_is_400(student: ServerThread, tmp_path: Path) -> None:
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 512}))
    r = post(student, "/v1/load_lora_adapter", {"lora_name": "huge", "lora_path": str(tmp_path)})
    assert r.status_code == 400 and "max_lora_rank" in r.json()["error"]["message"]


def test_unload_of_an_unknown_adapter_is_404(student: ServerThread) -> None:
    r = post(student, "/v1/unload_lora_adapter", {"lora_name": "never-loaded"})
    assert r.status_code == 404
    assert r.json()["error"] == {
        "message": "The lora adapter 'never-loaded' cannot be found.",
        "type": "NotFoundError",
        "param": None,
        "code": 404,
    }
    assert post(student, "/v1/unload_lora_adapter", {}).status_code == 400


def test_unknown_model_is_404_through_the_sdk(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="nobody@v9", messages=INTENT_PROMPT)
    assert info.value.status_code == 404
    assert info.value.body == {
        "message": "The model `nobody@v9` does not exist.",
        "type": "NotFoundError",
        "param": "model",
        "code": 404,
    }


def test_chat_with_an_adapter_plain_and_streamed(client: openai.OpenAI, loaded: dict[str, str]) -> None:
    plain = client.chat.completions.create(
        model="intent@v1", messages=INTENT_PROMPT, max_tokens=8, temperature=0
    )
    assert plain.model == "intent@v1" and plain.object == "chat.completion"
    choice = plain.choices[0]
    assert choice.finish_reason in ("stop", "length") and choice.message.role == "assistant"
    assert plain.usage is not None and plain.usage.prompt_tokens > 0
    assert plain.usage.total_tokens == plain.usage.prompt_tokens + plain.usage.completion_tokens
    assert 0 < plain.usage.completion_tokens <= 8 or choice.finish_reason == "stop"

    chunks = list(
        client.chat.completions.create(
            model="intent@v1",
            messages=INTENT_PROMPT,
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == (choice.message.content or "")
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [choice.finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage == plain.usage


def test_sampling_seed_n_and_logprobs(client: openai.OpenAI, loaded: dict[str, str]) -> None:
    def sample(seed: int) -> list[str | None]:
        r = client.chat.completions.create(
            model="intent@v1", messages=INTENT_PROMPT, max_tokens=6, temperature=1.0, seed=seed, n=3
        )
        assert [c.index for c in r.choices] == [0, 1, 2]
        return [c.message.content for c in r.choices]

    assert sample(11) == sample(11)
    r = client.chat.completions.create(
        model="tiny-base", messages=INTENT_PROMPT, max_tokens=3, temperature=0, logprobs=True, top_logprobs=2
    )
    assert r.choices[0].logprobs is not None and r.usage is not None
    content = r.choices[0].logprobs.content
    assert content and len(content) == r.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].logprob >= entry.logprob - 1e-6  # greedy picks the most likely token


def test_a_full_model_answers_with_tool_calls(client: openai.OpenAI, loaded: dict[str, str]) -> None:
    r = client.chat.completions.create(
        model="weather@v1", messages=WEATHER_PROMPT, tools=WEATHER_TOOLS, temperature=0, max_tokens=40
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls or []
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}

    chunks = list(
        client.chat.completions.create(
            model="weather@v1",
            messages=WEATHER_PROMPT,
            tools=WEATHER_TOOLS,
            temperature=0,
            max_tokens=40,
            stream=True,
        )
    )
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(d.content or "" for d in deltas) == ""  # the call is not leaked as text
    calls = [tc for d in deltas for tc in d.tool_calls or []]
    assert len(calls) == 1 and calls[0].function is not None
    assert calls[0].function.name == "get_weather" and json.loads(calls[0].function.arguments or "") == {
        "city": "Paris"
    }
    assert chunks[-1].choices[0].finish_reason == "tool_calls"

    # Without tools in the request, the same text is plain content (nothing to call).
    plain = client.chat.completions.create(
        model="weather@v1", messages=WEATHER_PROMPT, temperature=0, max_tokens=40
    )
    assert not plain.choices[0].message.tool_calls


def test_stop_strings_end_the_answer(client: openai.OpenAI, loaded: dict[str, str]) -> None:
    r = client.chat.completions.create(
        model="weather@v1",
        messages=WEATHER_PROMPT,
        tools=WEATHER_TOOLS,
        temperature=0,
        max_tokens=40,
        stop=["get_"],
    )
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content == '<tool_call>\n{"name": "'  # a cut call is no call


def test_adapters_do_not_interfere(client: openai.OpenAI, loaded: dict[str, str]) -> None:
    def first_logprob(model: str) -> float:
        r = client.chat.completions.create(
            model=model, messages=WEATHER_PROMPT, max_tokens=1, temperature=0, logprobs=True
        )
        logprobs = r.choices[0].logprobs
        assert logprobs is not None and logprobs.content is not None
        return logprobs.content[0].logprob

    models = ["tiny-base", "intent@v1", "weather@v1"]
    alone = {m: first_logprob(m) for m in models}
    assert len(set(alone.values())) == 3  # three different models answered
    with ThreadPoolExecutor(6) as pool:
        mixed = list(pool.map(first_logprob, models * 4))
    assert mixed == [alone[m] for m in models * 4]


def test_bad_requests_are_400(student: ServerThread, loaded: dict[str, str]) -> None:
    r = httpx.post(student.url + "/v1/chat/completions", content=b"nope", timeout=30)
    assert r.status_code == 400 and r.json()["error"]["type"] == "BadRequestError"
    r = post(student, "/v1/chat/completions", {"model": "intent@v1"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = post(
        student,
        "/v1/chat/completions",
        {"model": "intent@v1", "messages": INTENT_PROMPT, "max_tokens": 10_000},
    )
    assert r.status_code == 400 and "maximum context length is 512" in r.json()["error"]["message"]


def test_api_key_guards_v1_routes(tiny_model: Path) -> None:
    app = create_student_app(StudentModels(str(tiny_model)), api_key="student-secret")
    with serve(app) as server:
        assert httpx.get(server.url + "/v1/models").status_code == 401
        ok = httpx.get(server.url + "/v1/models", headers={"Authorization": "Bearer student-secret"})
        assert ok.status_code == 200
        assert httpx.get(server.url + "/health").status_code == 200


def test_auto_threads_answer_on_the_cores_other_processes_leave(tiny_model: Path) -> None:
    import subprocess
    import sys
    import time

    models = StudentModels(str(tiny_model), threads="auto")
    share = models.loop.cpu_share
    assert share is not None and share.min_interval_s == 1.0
    busy = subprocess.Popen(
        [sys.executable, "-c", "import time\nend = time.monotonic() + 30\nwhile time.monotonic() < end: pass"]
    )
    try:
        with serve(create_student_app(models)) as server:
            client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
            messages: list[ChatCompletionMessageParam] = [
                {"role": "system", "content": INTENT_SYSTEM},
                {"role": "user", "content": "my card was charged twice"},
            ]
            deadline = time.monotonic() + 20
            while share.threads == share.cores and time.monotonic() < deadline:
                answer = client.chat.completions.create(
                    model=str(tiny_model), messages=messages, max_tokens=4
                )
                assert answer.choices[0].message.content is not None
                time.sleep(0.3)
            # Another process kept a core busy: the decode loop left it (on a 1-core machine, 1 anyway).
            assert share.threads == max(1, share.cores - 1)
    finally:
        busy.kill()
        busy.wait()


def test_a_fixed_thread_count_never_moves(tiny_model: Path) -> None:
    models = StudentModels(str(tiny_model), threads=1)
    share = models.loop.cpu_share
    assert share is not None and share.threads == 1 and share.pick() == 1 and share.changes == 0
    models.close()
