"""The continuous-batching decode loop: concurrent requests share decode steps and answer exactly
as one greedy request decoded alone by a plain forward pass would, with genuine logprobs;
cancelled, failing and unloaded requests leave without touching the others."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch

from tests.servers import serve
from tests.trainer.conftest import INTENT_SYSTEM
from trainer.cpu_share import CPU_BF16_MIN_HIDDEN, cpu_has_bf16
from trainer.generation import (
    ChatResult,
    SamplingParams,
    StudentModels,
    UnknownModel,
    decode_dtype,
    eos_ids,
)
from trainer.student_server import create_student_app

EMAILS = [
    "refund my invoice",
    "the app shows an error after login and crashes every time I reset my password",
    "pricing for a demo",
    "you are a winner, claim the free prize",
    "hello team, my account needs a receipt for the last payment please",
    "upgrade plan",
]
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, logprobs=True, top_logprobs=3)


def chat(email: str) -> list[dict[str, Any]]:
    return [{"role": "system", "content": INTENT_SYSTEM}, {"role": "user", "content": email}]


@pytest.fixture(scope="module")
def varied_model(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with louder random weights: its greedy answers vary token by token and end
    at different lengths (the plain tiny model repeats one token), so equality means something."""
    import shutil

    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("varied-model")
    shutil.copytree(tiny_model, out, dirs_exist_ok=True)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.normal_(0.0, 0.35, generator=generator)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def models(varied_model: Path, intent_lora: Path) -> Iterator[StudentModels]:
    loaded = StudentModels(str(varied_model), served_name="tiny-base")
    loaded.load("intent@v1", str(intent_lora))
    yield loaded
    loaded.close()


def reference(
    models: StudentModels, name: str, email: str, max_tokens: int
) -> list[tuple[int, torch.Tensor]]:
    """Greedy decoding the plain way: the whole sequence through the model for every token, no
    cache, no batch. Each answer token with the log-softmax it was chosen from."""
    prompt = models.prompt_ids(name, chat(email), None)
    out: list[tuple[int, torch.Tensor]] = []
    with models.lock, torch.inference_mode():
        model, tokenizer = models.select(name)
        try:
            stops = eos_ids(model, tokenizer)
            ids = list(prompt)
            for _ in range(max_tokens):
                logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, -1].float(), -1)
                token = int(torch.argmax(logp))
                if token in stops:
                    break
                out.append((token, logp))
                ids.append(token)
        finally:
            models.restore()
    return out


def submit_together(
    models: StudentModels, jobs: list[tuple[str, str]], params: SamplingParams
) -> list[ChatResult]:
    # Holding the models' lock keeps the loop from stepping while the requests queue, so they
    # are decoded together (the first ones admitted, the rest joining their running batch).
    with models.lock:
        futures = [models.submit(name, chat(email), None, params) for name, email in jobs]
    return [f.result(timeout=120) for f in futures]


def check_against_reference(models: StudentModels, name: str, email: str, result: ChatResult) -> None:
    expected = reference(models, name, email, GREEDY.max_tokens or 0)
    (choice,) = result.choices
    tokenizer = models.tokenizer_for(name)
    assert choice.text == tokenizer.decode([t for t, _ in expected], skip_special_tokens=False)
    assert choice.completion_tokens == len(expected)
    assert choice.logprobs is not None and len(choice.logprobs) == len(expected)
    for entry, (token, logp) in zip(choice.logprobs, expected, strict=True):
        assert entry["logprob"] == pytest.approx(float(logp[token]), abs=1e-4)
        assert entry["token"] == tokenizer.decode([token], skip_special_tokens=False)
        top = torch.topk(logp, 3)
        assert [e["logprob"] for e in entry["top_logprobs"]] == pytest.approx(top.values.tolist(), abs=1e-4)
        assert entry["top_logprobs"][0]["token"] == entry["token"]


def test_concurrent_requests_share_decode_steps_and_match_unbatched_greedy(models: StudentModels) -> None:
    before = models.stats.steps, models.stats.rows, models.stats.prefix_tokens
    results = submit_together(models, [("tiny-base", e) for e in EMAILS], GREEDY)
    steps, rows = models.stats.steps - before[0], models.stats.rows - before[1]
    assert rows > steps  # more than one sequence per forward: the requests were batched
    assert models.stats.max_batch >= 2
    # The shared system prompt was computed once, then taken from the prefix cache.
    shared = len(models.prompt_ids("tiny-base", [{"role": "system", "content": INTENT_SYSTEM}], None))
    assert models.stats.prefix_tokens - before[2] >= (len(EMAILS) - 1) * (shared - 8)
    for email, result in zip(EMAILS, results, strict=True):
        check_against_reference(models, "tiny-base", email, result)


def test_base_and_adapter_requests_in_one_loop_each_answer_as_alone(models: StudentModels) -> None:
    jobs = [(name, e) for e in EMAILS[:4] for name in ("tiny-base", "intent@v1")]
    models.stats.max_batch = 0
    results = submit_together(models, jobs, GREEDY)
    # One batch for the base and its adapter (peft's adapter_names per row): a step held rows of
    # both, more than the four of either.
    assert models.stats.max_batch > 4
    for (name, email), result in zip(jobs, results, strict=True):
        check_against_reference(models, name, email, result)
    alone = {name: reference(models, name, EMAILS[0], 12) for name in ("tiny-base", "intent@v1")}
    assert alone["tiny-base"] != alone["intent@v1"] or not torch.equal(
        alone["tiny-base"][0][1], alone["intent@v1"][0][1]
    )  # the adapter changes the answer: the two kinds of row really differ


def test_n_choices_share_one_prefill_and_a_seed_repeats(models: StudentModels) -> None:
    params = SamplingParams(temperature=1.0, max_tokens=6, seed=5, n=3)
    prefills = models.stats.prefills
    first = models.chat("intent@v1", chat(EMAILS[1]), None, params)
    assert models.stats.prefills == prefills + 1
    second = submit_together(models, [("intent@v1", EMAILS[1]), ("tiny-base", EMAILS[2])], params)[0]
    assert [c.text for c in first.choices] == [c.text for c in second.choices]
    assert len(first.choices) == 3


def test_without_prefix_caching_a_repeated_request_is_bitwise_the_same(varied_model: Path) -> None:
    with StudentModels(str(varied_model), prefix_caching=False) as plain:
        first, second = (plain.chat(plain.base_name, chat(EMAILS[1]), None, GREEDY) for _ in range(2))
        assert plain.stats.prefix_tokens == 0
    assert first.choices[0].logprobs == second.choices[0].logprobs


def test_a_cancelled_request_leaves_and_the_others_finish(models: StudentModels) -> None:
    pieces: list[str] = []

    def stop_after_one(_index: int, delta: str, _logprobs: list[dict[str, Any]]) -> bool:
        pieces.append(delta)
        return False

    cancelled = models.stats.cancelled
    long = SamplingParams(temperature=0.0, max_tokens=40)
    with models.lock:
        victim = models.submit("tiny-base", chat(EMAILS[1]), None, long, on_text=stop_after_one)
        other = models.submit("tiny-base", chat(EMAILS[0]), None, GREEDY)
    result = victim.result(timeout=60)
    assert len(pieces) == 1 and result.choices == []
    assert models.stats.cancelled == cancelled + 1
    check_against_reference(models, "tiny-base", EMAILS[0], other.result(timeout=60))
    assert models.loop.running == 0


def test_a_failing_request_fails_alone(models: StudentModels) -> None:
    def broken(_index: int, _delta: str, _logprobs: list[dict[str, Any]]) -> bool:
        raise RuntimeError("the client's callback broke")

    failed = models.stats.failed
    with models.lock:
        bad = models.submit("tiny-base", chat(EMAILS[3]), None, GREEDY, on_text=broken)
        good = [models.submit("tiny-base", chat(e), None, GREEDY) for e in EMAILS[:3]]
    with pytest.raises(RuntimeError, match="callback broke"):
        bad.result(timeout=60)
    assert models.stats.failed == failed + 1
    for email, future in zip(EMAILS[:3], good, strict=True):
        check_against_reference(models, "tiny-base", email, future.result(timeout=60))


def test_unloading_an_adapter_ends_its_answers_with_unknown_model(
    models: StudentModels, intent_lora: Path
) -> None:
    models.load("doomed@v1", str(intent_lora))
    long = SamplingParams(temperature=0.0, max_tokens=200)
    started = threading.Event()

    def note(_index: int, _delta: str, _logprobs: list[dict[str, Any]]) -> bool:
        started.set()
        return True

    # A neighbour on the same base decodes in the same batch as the doomed adapter's rows.
    neighbour_params = SamplingParams(temperature=0.0, max_tokens=40)
    with models.lock:
        doomed: Future[ChatResult] = models.submit("doomed@v1", chat(EMAILS[1]), None, long, on_text=note)
        neighbour = models.submit("intent@v1", chat(EMAILS[4]), None, neighbour_params)
    assert started.wait(60)
    models.unload("doomed@v1")
    with pytest.raises(UnknownModel, match="unloaded while answering"):
        doomed.result(timeout=60)
    (answer,) = neighbour.result(timeout=60).choices
    expected = reference(models, "intent@v1", EMAILS[4], 40)
    assert answer.text == models.tokenizer.decode([t for t, _ in expected], skip_special_tokens=False)
    check_against_reference(
        models, "intent@v1", EMAILS[0], models.chat("intent@v1", chat(EMAILS[0]), None, GREEDY)
    )


@pytest.fixture(scope="module")
def server(models: StudentModels) -> Iterator[str]:
    with serve(create_student_app(models)) as running:
        yield running.url


def test_logprobs_plain_and_streamed_in_openai_shape(models: StudentModels, server: str) -> None:
    client = openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)
    messages: Any = chat(EMAILS[4])
    plain = client.chat.completions.create(
        model="tiny-base", messages=messages, max_tokens=12, temperature=0, logprobs=True, top_logprobs=3
    )
    raw = httpx.post(
        server + "/v1/chat/completions",
        json={
            "model": "tiny-base",
            "messages": messages,
            "max_tokens": 12,
            "temperature": 0,
            "logprobs": True,
        },
        timeout=60,
    ).json()
    assert set(raw["choices"][0]["logprobs"]) == {"content", "refusal"}
    entry = raw["choices"][0]["logprobs"]["content"][0]
    assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"} and entry["top_logprobs"] == []
    assert bytes(entry["bytes"]).decode("utf-8", "replace") == entry["token"]

    expected = reference(models, "tiny-base", EMAILS[4], 12)
    content = plain.choices[0].logprobs.content if plain.choices[0].logprobs else None
    assert content is not None and len(content) == len(expected)
    for got, (token, logp) in zip(content, expected, strict=True):
        assert got.logprob == pytest.approx(float(logp[token]), abs=1e-4)
        assert [t.logprob for t in got.top_logprobs] == pytest.approx(
            torch.topk(logp, 3).values.tolist(), abs=1e-4
        )

    chunks = list(
        client.chat.completions.create(
            model="tiny-base",
            messages=messages,
            max_tokens=12,
            temperature=0,
            logprobs=True,
            top_logprobs=3,
            stream=True,
        )
    )
    streamed = [
        e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content or []
    ]
    # (each request may start from another's cached prefix: logprobs agree to rounding)
    assert [e.token for e in streamed] == [e.token for e in content]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in content], abs=1e-4)
    for c in chunks:  # each content delta carries the logprobs of the tokens that make it up
        if c.choices and c.choices[0].delta.content and c.choices[0].logprobs:
            pieces = "".join(e.token for e in c.choices[0].logprobs.content or [])
            assert pieces.startswith(c.choices[0].delta.content) or c.choices[0].delta.content.startswith(
                pieces
            )
    assert (
        "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        == plain.choices[0].message.content
    )


def test_a_client_that_disconnects_mid_stream_is_cancelled(models: StudentModels, server: str) -> None:
    cancelled = models.stats.cancelled
    body = {
        "model": "tiny-base",
        "messages": chat(EMAILS[1]),
        "max_tokens": 300,
        "temperature": 0,
        "stream": True,
    }
    with httpx.stream("POST", server + "/v1/chat/completions", json=body, timeout=60) as response:
        for line in response.iter_lines():
            if '"content"' in line:
                break
    deadline = time.monotonic() + 60
    while models.stats.cancelled == cancelled and time.monotonic() < deadline:
        time.sleep(0.05)
    assert models.stats.cancelled == cancelled + 1
    while models.loop.running and time.monotonic() < deadline:
        time.sleep(0.05)
    assert models.loop.running == 0


def test_smollm2_served_as_a_teacher_gives_genuine_top_logprobs(smollm2: str) -> None:
    """The real teacher of the soft-label tests: SmolLM2-135M-Instruct behind the student server.
    Its top-k logprobs are the model's own distribution (one teacher-forced forward agrees), the
    stream carries the same entries, and the entries' bytes spell the answer. Served in float32:
    in bf16 (``auto`` on a CPU with native bf16) the prefix-cached and the full forward round
    differently, up to 0.05 nats apart."""
    question: Any = [{"role": "user", "content": "What is the capital of France?"}]
    with (
        StudentModels(smollm2, served_name="smollm2", dtype="float32") as teacher,
        serve(create_student_app(teacher)) as running,
    ):
        client = openai.OpenAI(base_url=running.url + "/v1", api_key="unused", max_retries=0)
        asked: dict[str, Any] = {"model": "smollm2", "messages": question, "max_tokens": 10, "temperature": 0}
        plain = client.chat.completions.create(**asked, logprobs=True, top_logprobs=5)
        chunks = list(client.chat.completions.create(**asked, logprobs=True, top_logprobs=5, stream=True))

        answer = plain.choices[0].message.content or ""
        assert "Paris" in answer
        content = plain.choices[0].logprobs.content if plain.choices[0].logprobs else None
        assert content and all(len(e.top_logprobs) == 5 for e in content)
        assert bytes(b for e in content for b in e.bytes or []).decode("utf-8") == answer
        streamed = [
            e
            for c in chunks
            if c.choices and c.choices[0].logprobs
            for e in c.choices[0].logprobs.content or []
        ]
        # The stream's prompt came from the prefix cache: the same tokens, logprobs to rounding.
        assert [e.token for e in streamed] == [e.token for e in content]
        assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in content], abs=1e-4)

        prompt = teacher.prompt_ids("smollm2", question, None)
        answer_ids = teacher.tokenizer(answer, add_special_tokens=False)["input_ids"]
        with teacher.lock, torch.inference_mode():
            model, _ = teacher.select("smollm2")
            logits = model(input_ids=torch.tensor([prompt + answer_ids])).logits[0].float()
        logp = torch.log_softmax(logits[len(prompt) - 1 : len(prompt) - 1 + len(answer_ids)], -1)
        assert len(content) == len(answer_ids)
        for entry, token, row in zip(content, answer_ids, logp, strict=True):
            assert entry.logprob == pytest.approx(float(row[token]), abs=2e-3)
            top = torch.topk(row, 5)
            assert [t.logprob for t in entry.top_logprobs] == pytest.approx(top.values.tolist(), abs=2e-3)
            assert entry.top_logprobs[0].token == entry.token


def test_concurrent_http_requests_are_decoded_together(models: StudentModels, server: str) -> None:
    client = openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)
    answers: dict[str, str | None] = {}

    def ask(email: str) -> None:
        messages: Any = chat(email)
        r = client.chat.completions.create(model="tiny-base", messages=messages, max_tokens=12, temperature=0)
        answers[email] = r.choices[0].message.content

    before = models.stats.requests, models.stats.steps, models.stats.rows
    threads = [threading.Thread(target=ask, args=(e,)) for e in EMAILS[:4]]
    with models.lock:  # the loop cannot step until all four have arrived
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while models.stats.requests < before[0] + 4 and time.monotonic() < deadline:
            time.sleep(0.01)
    for t in threads:
        t.join(60)
    assert models.stats.rows - before[2] > models.stats.steps - before[1]
    for email in EMAILS[:4]:
        alone = models.chat("tiny-base", chat(email), None, SamplingParams(temperature=0.0, max_tokens=12))
        assert answers[email] == alone.choices[0].text


def test_decode_dtype_auto_follows_the_device_and_the_width() -> None:
    assert decode_dtype("auto", "cuda:0", 64) == torch.bfloat16
    assert decode_dtype("auto", "cpu", 64) == torch.float32  # narrow: casts cost more than they save
    wide = torch.bfloat16 if cpu_has_bf16() else torch.float32
    assert decode_dtype("auto", "cpu", CPU_BF16_MIN_HIDDEN) == wide
    assert decode_dtype("float", "cpu", 4096) == torch.float32
    assert decode_dtype("half", "cuda", 64) == torch.float16
    assert decode_dtype("bfloat16", "cpu", 64) == torch.bfloat16
    with pytest.raises(ValueError, match="dtype must be auto or one of"):
        decode_dtype("fp8", "cpu", 64)


def test_bf16_weights_answer_with_fp32_adapters_and_fp32_logprobs(
    varied_model: Path, intent_lora: Path
) -> None:
    """Forced bf16 on a CPU: the base's weights are bf16, the adapter's stay fp32 (peft casts
    their input), the adapter changes the answer, and logprobs (scored in fp32) form a
    distribution. (This loud random model's answers are not compared with fp32's: its
    near-tied logits flip under bf16 rounding.)"""
    with StudentModels(str(varied_model), served_name="tiny-base", dtype="bfloat16") as bf16:
        bf16.load("intent@v1", str(intent_lora))
        assert bf16.dtype == torch.bfloat16
        weights = dict(bf16._peft.named_parameters())
        assert {p.dtype for n, p in weights.items() if "lora_" not in n} == {torch.bfloat16}
        assert {p.dtype for n, p in weights.items() if "lora_" in n} == {torch.float32}
        base = bf16.chat("tiny-base", chat(EMAILS[0]), None, GREEDY).choices[0]
        tuned = bf16.chat("intent@v1", chat(EMAILS[0]), None, GREEDY).choices[0]
    assert base.completion_tokens > 0 and tuned.completion_tokens > 0
    assert tuned.text != base.text
    for entry in tuned.logprobs or []:
        total = sum(math.exp(e["logprob"]) for e in entry["top_logprobs"])
        assert entry["logprob"] <= 0.0 and total <= 1.0 + 1e-5
