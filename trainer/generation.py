"""Answering chats with a local base model and the adapters loaded on it (transformers + peft).

One ``StudentModels`` holds the base model, any number of LoRA adapters on it (one peft
model), and full fine-tuned models loaded as if they were adapters. Every answer is decoded by
one continuous-batching loop on its own thread: requests join the running batch of their model
between decode steps and leave it when they finish, so concurrent shadow traffic and a whole
held-out set are decoded together, with the KV cache. The base model and all its adapters share
one batch, as in vLLM's multi-LoRA batching: one forward of the base weights per step, each row
through its own adapter (peft's ``adapter_names``); a full model steps on its own. The embedded
student server and the offline evaluation both use it, so a student is scored exactly the way
it is served.

Why a thread of its own: torch ops issued from an asyncio event loop's thread ran ~4x slower
than the same ops on a dedicated thread on a loaded 2-core machine (measured), and one owner of
the model state needs no lock per request — only adapter loads wait for the step in progress.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from trainer.base_model import resolve_base_model
from trainer.chat_format import IM_END, TOOL_CALL_OPEN, ParsedAnswer, parse_tool_calls, template_messages
from trainer.cpu_share import CPU_BF16_MIN_HIDDEN, CpuShare, cpu_has_bf16


class GenerationError(Exception):
    """Base for the errors a caller can turn into a client-facing answer."""


class AdapterNotFound(GenerationError):
    """No adapter or model directory at the path."""


class AdapterLoadError(GenerationError):
    """Something is at the path, but it does not load onto this base model."""


class AdapterExists(GenerationError):
    """The name is taken (by the base model or a loaded adapter)."""


class UnknownModel(GenerationError):
    """A request named neither the base model nor a loaded adapter (or it was unloaded mid-answer)."""


class ContextTooLong(GenerationError):
    """The prompt (plus the requested answer length) does not fit the model's context."""


class DecodeLoopClosed(GenerationError):
    """The models were closed while the request waited or decoded."""


@dataclass(frozen=True)
class SamplingParams:
    """How to decode; ``temperature == 0`` is greedy (argmax), the same on every call."""

    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int | None = None
    """Longest answer; ``None`` fills the rest of the context window."""
    seed: int | None = None
    """Choice ``i`` samples from a generator seeded ``seed + i``: the same seed, the same answers,
    whatever else shares the batch."""
    stop: tuple[str, ...] = ()
    n: int = 1
    logprobs: bool = False
    top_logprobs: int = 0


@dataclass
class Generation:
    """One choice: the text, why it ended, its token count and (if asked) its log-probabilities."""

    text: str
    finish_reason: str
    """``stop`` (end-of-turn token or a stop string) or ``length``."""
    completion_tokens: int
    logprobs: list[dict[str, Any]] | None = None
    """OpenAI's ``logprobs.content``: per answer token ``{token, logprob, bytes, top_logprobs}``,
    log-probabilities of the model's own distribution (before temperature and top-p)."""


@dataclass
class ChatResult:
    prompt_tokens: int
    choices: list[Generation] = field(default_factory=list)
    decode_s: float = 0.0
    """Seconds from joining the decode loop (prefill) to the last choice's end: the answer's own
    latency, without the time it queued behind other requests."""


@dataclass
class GenerationStats:
    """What the decode loop did, cumulative: how much it batched (tests and the bench read it)."""

    requests: int = 0
    prefills: int = 0
    steps: int = 0
    """Decode forwards (one per model with running sequences, per loop iteration)."""
    rows: int = 0
    """Sequences advanced by those forwards: ``rows / steps`` is the mean batch."""
    max_batch: int = 0
    prefix_tokens: int = 0
    """Prompt tokens not recomputed: taken from a recent prompt's cache."""
    tokens: int = 0
    cancelled: int = 0
    failed: int = 0


@dataclass
class _Entry:
    kind: str  # "lora" | "full"
    path: str
    model: Any = None
    tokenizer: Any = None


# Receives each new piece of text as it is decoded, with the logprob entries of the tokens that
# completed it (empty unless asked for); returning False cancels the request.
TextCallback = Callable[[int, str, list[dict[str, Any]]], bool]
# Receives each finished choice.
ChoiceCallback = Callable[[int, "Generation"], None]


DTYPES = {
    "float32": "float32",
    "float": "float32",
    "bfloat16": "bfloat16",
    "float16": "float16",
    "half": "float16",
}
"""``--dtype`` names (vLLM's) besides ``auto``, each to its torch dtype."""


def decode_dtype(dtype: str, device: str, hidden_size: int | None) -> Any:
    """The torch dtype the weights are decoded in: ``dtype`` when named, else (``auto``) bf16 on
    a GPU and on a CPU with native bf16 matmuls for a model at least ``CPU_BF16_MIN_HIDDEN``
    wide, fp32 otherwise. Measured (SmolLM2-135M-Instruct, greedy, 48 tokens, 2-core EPYC with
    AVX512-BF16, ``bench/generation_throughput.py --dtype``): one sequence 11.7 -> 16.8 tokens/s,
    four at once 31.2 -> 56.3 on two threads, 30.2 -> 44.2 on one (transformers' ``generate``;
    our decode loop: 12.7 -> 12.7 one at a time, 28.2 -> 35.3 batched). Logits are scored in fp32
    either way and LoRA adapters keep fp32 weights (peft casts their input), but bf16 weights
    round: the same token's logprob from a prefix-cached and from a full forward differed by up
    to 0.05 nats on SmolLM2 (0 in float32), so a teacher whose logprobs must be exact serves in
    float32."""
    import torch

    if dtype != "auto":
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be auto or one of {', '.join(DTYPES)}, got {dtype!r}")
        return getattr(torch, DTYPES[dtype])
    if device.startswith("cuda"):
        return torch.bfloat16
    wide = (hidden_size or 0) >= CPU_BF16_MIN_HIDDEN
    return torch.bfloat16 if wide and cpu_has_bf16() else torch.float32


BASE_GROUP = "\x00base"
"""The decode batch of the base model and its LoRA adapters (no served name holds a NUL)."""


class StudentModels:
    """A base model plus adapters, addressed by name like vLLM: the base model's name or a ``lora_name``."""

    def __init__(
        self,
        base_model: str,
        *,
        served_name: str | None = None,
        device: str = "auto",
        max_lora_rank: int = 64,
        max_model_len: int | None = None,
        max_batch: int = 32,
        prefix_caching: bool = True,
        threads: int | Literal["auto"] | None = None,
        dtype: str = "auto",
    ) -> None:
        """``threads``: torch threads of the decode loop on a CPU (None: the process's count;
        ``auto``: the cores other processes leave, checked at most once a second,
        ``trainer.cpu_share``). ``dtype``: the weights' precision (``decode_dtype``)."""
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        base = resolve_base_model(base_model)
        self.base_path = base_model
        self.base_name = served_name or base_model
        self.device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        self.max_lora_rank = max_lora_rank
        self.lock = threading.Lock()
        """Held by the decode loop for each step and by adapter loads and unloads."""
        self.tokenizer = AutoTokenizer.from_pretrained(base.path)
        config = AutoConfig.from_pretrained(base.path)
        self.dtype = decode_dtype(dtype, self.device, getattr(config, "hidden_size", None))
        model: Any = AutoModelForCausalLM.from_pretrained(base.path, dtype=self.dtype)
        self._base = model.to(self.device).eval()
        self._peft: Any = None
        self.adapters: dict[str, _Entry] = {}
        self.max_model_len = max_model_len or int(getattr(self._base.config, "max_position_embeddings", 2048))
        share = None
        if not self.device.startswith("cuda") and threads is not None:
            # A fixed count never moves: its share never looks again.
            share = (
                CpuShare(min_interval_s=1.0)
                if threads == "auto"
                else CpuShare(cores=int(threads), min_interval_s=float("inf"))
            )
        self.loop = DecodeLoop(self, max_batch=max_batch, prefix_caching=prefix_caching, cpu_share=share)

    @property
    def stats(self) -> GenerationStats:
        return self.loop.stats

    def close(self) -> None:
        """Stop the decode loop; waiting and running requests fail with ``DecodeLoopClosed``."""
        self.loop.close()

    def __enter__(self) -> StudentModels:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # -- adapters ----------------------------------------------------------------------------
    def has(self, name: str) -> bool:
        return name == self.base_name or name in self.adapters

    def load(self, name: str, path: str, *, replace: bool = False) -> str:
        """Load the adapter (or full model) at ``path`` under ``name``; returns ``lora`` or ``full``.

        Blocking; raises ``AdapterNotFound``, ``AdapterExists`` (unless ``replace``) or ``AdapterLoadError``.
        """
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if name == self.base_name or (name in self.adapters and not replace):
            raise AdapterExists(f"The lora adapter '{name}' has already been loaded.")
        where = Path(path)
        if (where / "adapter_config.json").is_file():
            kind = "lora"
        elif (where / "config.json").is_file():
            kind = "full"
        else:
            raise AdapterNotFound(f"Loading lora {name} failed: No adapter found for {path}")
        if name in self.adapters:
            self.unload(name)
        with self.lock:
            if kind == "full":
                try:
                    model: Any = AutoModelForCausalLM.from_pretrained(path, dtype=self.dtype)
                    model = model.to(self.device).eval()
                    has_tokenizer = (where / "tokenizer_config.json").is_file()
                    tokenizer = AutoTokenizer.from_pretrained(path) if has_tokenizer else self.tokenizer
                except Exception as exc:
                    raise AdapterLoadError(f"Loading model {name} from {path} failed: {exc}") from exc
                self.adapters[name] = _Entry("full", path, model, tokenizer)
                return kind
            self._check_lora_config(where)
            try:
                self._load_lora(name, path)
            except Exception as exc:
                raise AdapterLoadError(f"Loading lora {name} failed: {exc}") from exc
            self.adapters[name] = _Entry("lora", path)
            return kind

    def _check_lora_config(self, where: Path) -> None:
        try:
            config = json.loads((where / "adapter_config.json").read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise AdapterLoadError(f"adapter_config.json at {where} is not readable: {exc}") from exc
        rank = int(config.get("r") or 0)
        if rank > self.max_lora_rank:
            raise AdapterLoadError(f"LoRA rank {rank} is greater than max_lora_rank {self.max_lora_rank}.")
        if config.get("peft_type", "LORA") != "LORA":
            raise AdapterLoadError(f"only LoRA adapters load here, not {config.get('peft_type')}")

    def _load_lora(self, name: str, path: str) -> None:
        from peft import PeftModel

        if self._peft is None:
            self._peft = PeftModel.from_pretrained(self._base, path, adapter_name=name)
            self._peft.eval()
        else:
            self._peft.load_adapter(path, adapter_name=name)

    def unload(self, name: str) -> bool:
        """Forget an adapter; False when no adapter of that name is loaded. Answers it was still
        decoding end with ``UnknownModel``."""
        with self.lock:
            entry = self.adapters.pop(name, None)
            if entry is None:
                return False
            self.loop.drop_model(name, UnknownModel(f"The model `{name}` was unloaded while answering."))
            if entry.kind == "lora":
                self._peft.delete_adapter(name)
                if not any(e.kind == "lora" for e in self.adapters.values()):
                    # peft cannot run without an adapter: give the clean base model back.
                    self._base = self._peft.unload()
                    self._peft = None
            return True

    # -- generation --------------------------------------------------------------------------
    def tokenizer_for(self, name: str) -> Any:
        entry = self.adapters.get(name)
        return entry.tokenizer if entry is not None and entry.kind == "full" else self.tokenizer

    def prompt_ids(
        self, name: str, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None
    ) -> list[int]:
        """The chat rendered with the model's template and generation prompt, as the trainer renders it."""
        tokenizer = self.tokenizer_for(name)
        text = tokenizer.apply_chat_template(
            template_messages(messages), tools=tools or None, tokenize=False, add_generation_prompt=True
        )
        return list(tokenizer(str(text), add_special_tokens=False)["input_ids"])

    def submit(
        self,
        name: str,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None,
        params: SamplingParams,
        on_text: TextCallback | None = None,
        on_choice: ChoiceCallback | None = None,
    ) -> Future[ChatResult]:
        """Queue a chat for ``params.n`` choices; the future resolves when all have ended.

        Raises ``UnknownModel`` and ``ContextTooLong`` at once. Callbacks run on the decode
        loop's thread and must not block: ``on_text(choice_index, delta, logprobs)`` as text is
        decoded (returning False cancels the request), ``on_choice(choice_index, generation)``
        as each choice ends. A callback that raises fails its own request only. Cancelled
        requests resolve with the choices that had ended.
        """
        if not self.has(name):
            raise UnknownModel(f"The model `{name}` does not exist.")
        prompt = self.prompt_ids(name, messages, tools)
        if len(prompt) >= self.max_model_len or (
            params.max_tokens is not None and len(prompt) + params.max_tokens > self.max_model_len
        ):
            raise ContextTooLong(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{len(prompt) + (params.max_tokens or 0)} tokens ({len(prompt)} in the messages, "
                f"{params.max_tokens or 0} in the completion). Please reduce the length of the messages or completion."
            )
        max_tokens = params.max_tokens or self.max_model_len - len(prompt)
        request = DecodeRequest(name, prompt, params, max_tokens, on_text, on_choice)
        self.loop.submit(request)
        return request.future

    def chat(
        self,
        name: str,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None,
        params: SamplingParams,
        on_text: TextCallback | None = None,
        on_choice: ChoiceCallback | None = None,
    ) -> ChatResult:
        """``submit`` and wait: blocking (other callers' requests share the batch meanwhile)."""
        return self.submit(name, messages, tools, params, on_text, on_choice).result()

    def cancel(self, future: Future[ChatResult]) -> None:
        """Stop a submitted request at the next decode step (a client that went away)."""
        request = getattr(future, "decode_request", None)
        if isinstance(request, DecodeRequest):
            request.cancelled.set()
            self.loop.wake()

    def group(self, name: str) -> str:
        """The batch ``name``'s sequences decode in: the base model and its LoRA adapters share
        one (``BASE_GROUP``: one forward of the base weights per step for all of them, each row
        through its own adapter, like vLLM's multi-LoRA batches); a full model has its own."""
        entry = self.adapters.get(name)
        return name if entry is not None and entry.kind == "full" else BASE_GROUP

    def select_rows(self, group: str, names: list[str]) -> tuple[Any, dict[str, Any]]:
        """The model object for one decode step of ``group`` whose rows answer as ``names``, and
        the extra forward arguments: peft's ``adapter_names`` (one per row, ``__base__`` for the
        base model) when the rows mix models. Call with ``lock`` held, ``restore`` after."""
        first = names[0]
        if group != BASE_GROUP or self._peft is None or all(n == first for n in names):
            return self.select(first)[0], {}
        self._peft.base_model.enable_adapter_layers()
        return self._peft, {"adapter_names": [n if n in self.adapters else "__base__" for n in names]}

    def select(self, name: str) -> tuple[Any, Any]:
        """The model object and tokenizer that answer as ``name``, with peft switched to it.
        Call with ``lock`` held."""
        entry = self.adapters.get(name)
        if entry is None:  # the base model
            if self._peft is not None:
                self._peft.base_model.disable_adapter_layers()
                return self._peft, self.tokenizer
            return self._base, self.tokenizer
        if entry.kind == "full":
            return entry.model, entry.tokenizer
        self._peft.base_model.enable_adapter_layers()
        self._peft.set_adapter(name)
        return self._peft, self.tokenizer

    def restore(self) -> None:
        if self._peft is not None:
            self._peft.base_model.enable_adapter_layers()


class DecodeRequest:
    """One chat in the decode loop: its prompt, how to sample, where its text goes, its future."""

    def __init__(
        self,
        name: str,
        prompt: list[int],
        params: SamplingParams,
        max_tokens: int,
        on_text: TextCallback | None,
        on_choice: ChoiceCallback | None,
    ) -> None:
        self.name, self.prompt, self.params, self.max_tokens = name, prompt, params, max_tokens
        self.on_text, self.on_choice = on_text, on_choice
        self.future: Future[ChatResult] = Future()
        self.future.decode_request = self  # type: ignore[attr-defined]
        self.cancelled = threading.Event()
        self.choices: list[Generation | None] = [None] * params.n
        self.remaining = params.n
        self.started = 0.0
        self.over = False

    def finish(self) -> None:
        if self.over:
            return
        self.over = True
        done = [c for c in self.choices if c is not None]
        elapsed = time.perf_counter() - self.started if self.started else 0.0
        self.future.set_result(ChatResult(len(self.prompt), done, elapsed))

    def fail(self, exc: BaseException) -> None:
        if self.over:
            return
        self.over = True
        self.future.set_exception(exc)


class _Sequence:
    """One choice being decoded: a row of its model's batch."""

    def __init__(self, request: DecodeRequest, index: int, stop_ids: set[int], tokenizer: Any) -> None:
        import torch

        self.request, self.index, self.stop_ids, self.tokenizer = request, index, stop_ids, tokenizer
        params = request.params
        self.generator = torch.Generator(device="cpu")
        if params.seed is not None:
            self.generator.manual_seed(params.seed + index)
        else:
            self.generator.seed()
        self.hold = max((len(s) for s in params.stop), default=1) - 1
        self.tokens: list[int] = []
        self.text = ""
        self.sent = 0
        self.logprobs: list[dict[str, Any]] | None = [] if params.logprobs else None
        self.unsent: list[dict[str, Any]] = []
        self.position = len(request.prompt)
        """Position id of the next input token (the last sampled one)."""
        self.done = False

    def emit(self, delta: str) -> None:
        on_text = self.request.on_text
        pieces, self.unsent = self.unsent, []
        if on_text is not None and not on_text(self.index, delta, pieces):
            self.request.cancelled.set()

    def advance(self, token: int, entry: dict[str, Any] | None) -> None:
        """Take the sampled token: end the choice on an end-of-turn token, a stop string or the
        length limit, else send what text is safe to send."""
        if token in self.stop_ids:
            return self.end("stop")
        if self.logprobs is not None and entry is not None:
            self.logprobs.append(entry)
            self.unsent.append(entry)
        self.tokens.append(token)
        self.text = self.tokenizer.decode(self.tokens, skip_special_tokens=False)
        cut = _first_stop(self.text, self.request.params.stop)
        if cut is not None:
            self.text = self.text[:cut]
            return self.end("stop")
        if len(self.tokens) >= self.request.max_tokens:
            return self.end("length")
        # Hold back a partly decoded character and anything that may be the start of a stop string.
        text = self.text.rstrip("\ufffd") if self.text.endswith("\ufffd") else self.text
        ready = len(text) - self.hold
        if ready > self.sent:
            sent, self.sent = self.sent, ready
            self.emit(self.text[sent:ready])
        return None

    def end(self, finish: str) -> None:
        self.done = True
        request = self.request
        if request.cancelled.is_set() or request.over:
            return
        if len(self.text) > self.sent or self.unsent:
            sent, self.sent = self.sent, len(self.text)
            self.emit(self.text[sent:])
            if request.cancelled.is_set():
                return
        generation = Generation(self.text, finish, len(self.tokens), self.logprobs)
        request.choices[self.index] = generation
        if request.on_choice is not None:
            request.on_choice(self.index, generation)
        request.remaining -= 1
        if request.remaining == 0:
            request.finish()


class _Batch:
    """The running sequences of one group of models (``StudentModels.group``: a base model with
    its adapters, or one full model), their KV cache rows left-padded to one length."""

    def __init__(self, group: str, batchable: bool) -> None:
        self.group = group
        self.batchable = batchable
        self.seqs: list[_Sequence] = []
        self.cache: Any = None
        self.mask: Any = None
        """``[rows, cache length]``: 1 for a real cached token, 0 for padding."""

    def join(self, seqs: list[_Sequence], cache: Any, length: int) -> None:
        import torch

        mask = torch.ones(len(seqs), length, dtype=torch.long, device=_cache_device(cache))
        if self.cache is None:
            self.seqs, self.cache, self.mask = list(seqs), cache, mask
            return
        have = self.mask.shape[1]
        width = max(have, length)
        for mine, theirs in zip(self.cache.layers, cache.layers, strict=True):
            mine.keys = torch.cat([_pad_left(mine.keys, width), _pad_left(theirs.keys, width)])
            mine.values = torch.cat([_pad_left(mine.values, width), _pad_left(theirs.values, width)])
        self.mask = torch.cat([_pad_left(self.mask, width), _pad_left(mask, width)])
        self.seqs.extend(seqs)

    def compact(self) -> None:
        """Drop ended rows, and cache columns that only padding still uses."""
        import torch

        keep = [i for i, s in enumerate(self.seqs) if not s.done]
        if len(keep) == len(self.seqs):
            return
        self.seqs = [self.seqs[i] for i in keep]
        if not keep:
            self.cache = self.mask = None
            return
        index = torch.tensor(keep, device=self.mask.device)
        self.mask = self.mask[index]
        first = int(torch.argmax(self.mask.any(dim=0).to(torch.int8)))
        for layer in self.cache.layers:
            layer.keys = layer.keys[index, :, first:]
            layer.values = layer.values[index, :, first:]
        self.mask = self.mask[:, first:]


class PrefixCache:
    """The KV cache of each model's last few prompts, so that a new prompt sharing a long
    beginning with one of them (the same system prompt, the same tool list) computes only the
    rest. Like vLLM's prefix caching, this is not bitwise: a prompt computed in two pieces gets
    logprobs equal to rounding (~1e-5 in fp32), the same greedy tokens in practice; turn it off
    (``prefix_caching=False``) for bitwise-repeatable answers. Cached tensors are never written in place (the cache grows and shrinks by new
    tensors), so entries are shared without copies."""

    MIN_TOKENS = 8
    """Shorter shared beginnings are recomputed: copying them costs about what they save."""

    def __init__(self, entries: int = 8) -> None:
        self.entries = entries
        self._by_model: dict[str, list[tuple[list[int], list[tuple[Any, Any]]]]] = {}

    def lookup(self, name: str, prompt: list[int]) -> tuple[int, Any]:
        """How many leading prompt tokens are cached, and a fresh cache holding just them (or None)."""
        from transformers import DynamicCache

        best, layers = 0, None
        for tokens, kv in self._by_model.get(name, []):
            shared = _shared_prefix(tokens, prompt, len(prompt) - 1)  # the last token is needed for logits
            if shared > best:
                best, layers = shared, kv
        if layers is None or best < self.MIN_TOKENS:
            return 0, None
        return best, DynamicCache(ddp_cache_data=[(k[:, :, :best], v[:, :, :best]) for k, v in layers])

    def remember(self, name: str, prompt: list[int], cache: Any) -> None:
        layers = getattr(cache, "layers", None)
        if not layers or not all(type(layer).__name__ == "DynamicLayer" for layer in layers):
            return
        if self.entries == 0:
            return
        kv = [(layer.keys, layer.values) for layer in layers]
        kept = [e for e in self._by_model.get(name, []) if prompt[: len(e[0])] != e[0]]
        self._by_model[name] = [(list(prompt), kv), *kept][: self.entries]

    def forget(self, name: str) -> None:
        self._by_model.pop(name, None)


def _shared_prefix(a: list[int], b: list[int], limit: int) -> int:
    n = min(len(a), len(b), limit)
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class DecodeLoop:
    """The continuous-batching loop: admits waiting requests (one prefill each, shared by its
    ``n`` choices), then advances every model's batch by one token, then repeats.

    Failures stay with their request: a prefill, a sampling step or a callback that raises fails
    that request; a batched forward that raises fails the requests of that batch; the loop goes on.
    """

    def __init__(
        self,
        models: StudentModels,
        *,
        max_batch: int = 32,
        prefix_caching: bool = True,
        cpu_share: CpuShare | None = None,
    ) -> None:
        self.models = models
        self.cpu_share = cpu_share
        """Moves the loop's torch threads to the cores other processes leave (``threads="auto"``)."""
        self.max_batch = max_batch
        """Most sequences decoding at once (all models together); more wait their turn."""
        self.stats = GenerationStats()
        self._waiting: list[DecodeRequest] = []
        self._batches: list[_Batch] = []
        self._prefixes = PrefixCache(entries=8 if prefix_caching else 0)
        self._wake = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="distillgate-decode", daemon=True)
        self._thread.start()

    @property
    def running(self) -> int:
        """Sequences decoding now."""
        return sum(len(b.seqs) for b in self._batches)

    def submit(self, request: DecodeRequest) -> None:
        with self._wake:
            if self._closed:
                raise DecodeLoopClosed("the student models are closed")
            self._waiting.append(request)
            self.stats.requests += 1
            self._wake.notify()

    def wake(self) -> None:
        with self._wake:
            self._wake.notify()

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join(timeout=60)

    def drop_model(self, name: str, exc: BaseException) -> None:
        """Fail every request decoding or waiting on ``name``, and forget its cached prompts.
        Call with the models' lock held."""
        self._prefixes.forget(name)
        for batch in self._batches:
            for seq in batch.seqs:
                if seq.request.name == name:
                    self._fail(seq.request, exc)
            batch.compact()  # its rows leave now: the next step must not name the adapter
        self._batches = [b for b in self._batches if b.seqs]
        with self._wake:
            waiting = [r for r in self._waiting if r.name == name]
            self._waiting = [r for r in self._waiting if r.name != name]
        for request in waiting:
            self._fail(request, exc)

    # -- the loop ----------------------------------------------------------------------------
    def _run(self) -> None:
        import torch

        if self.cpu_share is not None:
            torch.set_num_threads(self.cpu_share.threads)  # this thread runs the ops
        with torch.inference_mode():
            while True:
                if self.cpu_share is not None:
                    self.cpu_share.pick()
                with self._wake:
                    while not self._closed and not self._batches and not self._waiting:
                        self._wake.wait()
                    if self._closed:
                        break
                    room = self.max_batch - self.running
                    admit: list[DecodeRequest] = []
                    while self._waiting and (room >= self._waiting[0].params.n or room == self.max_batch):
                        request = self._waiting.pop(0)
                        room -= request.params.n
                        admit.append(request)
                with self.models.lock:
                    # Nothing a request brings may end the loop: whatever escapes a prefill or
                    # a step fails the requests it touched, and the loop goes on.
                    for request in admit:
                        try:
                            self._prefill(request)
                        except Exception as exc:
                            self._fail(request, exc)
                    for batch in list(self._batches):
                        try:
                            self._step(batch)
                        except Exception as exc:
                            for seq in batch.seqs:
                                self._fail(seq.request, exc)
                            batch.seqs, batch.cache, batch.mask = [], None, None
                    self._batches = [b for b in self._batches if b.seqs]
        closed = DecodeLoopClosed("the student models were closed")
        for batch in self._batches:
            for seq in batch.seqs:
                self._fail(seq.request, closed)
        with self._wake:
            waiting, self._waiting = self._waiting, []
        for request in waiting:
            self._fail(request, closed)

    def _fail(self, request: DecodeRequest, exc: BaseException) -> None:
        if not request.over:
            self.stats.failed += 1
        request.fail(exc)
        for batch in self._batches:
            for seq in batch.seqs:
                if seq.request is request:
                    seq.done = True

    def _cancel(self, request: DecodeRequest) -> None:
        """End a request whose client went away: its rows leave at the next compaction."""
        if not request.over:
            self.stats.cancelled += 1
            request.finish()
        for batch in self._batches:
            for seq in batch.seqs:
                if seq.request is request:
                    seq.done = True

    def _prefill(self, request: DecodeRequest) -> None:
        import torch

        if request.cancelled.is_set():
            self._cancel(request)
            return
        request.started = time.perf_counter()
        try:
            if not self.models.has(request.name):
                raise UnknownModel(f"The model `{request.name}` does not exist.")
            model, tokenizer = self.models.select(request.name)
            try:
                out = self._prefill_forward(model, request)
            finally:
                self.models.restore()
            self.stats.prefills += 1
            cache = out.past_key_values
            self._prefixes.remember(request.name, request.prompt, cache)
            n = request.params.n
            if n > 1:  # the prompt's cache is computed once and shared by every choice
                cache.batch_repeat_interleave(n)
            stops = eos_ids(model, tokenizer)
            seqs = [_Sequence(request, i, stops, tokenizer) for i in range(n)]
            logits = out.logits[0, -1].float().expand(n, -1)
            self._sample(seqs, logits)
        except Exception as exc:
            self._fail(request, exc)
            return
        alive = [i for i, s in enumerate(seqs) if not s.done]
        if not alive or request.over:
            return
        if len(alive) < n:
            cache.batch_select_indices(torch.tensor(alive, device=self.models.device))
            seqs = [seqs[i] for i in alive]
        batchable = all(type(layer).__name__ == "DynamicLayer" for layer in getattr(cache, "layers", []))
        group = self.models.group(request.name)
        batch = next((b for b in self._batches if b.group == group and b.batchable and batchable), None)
        if batch is None:
            batch = _Batch(group, batchable and hasattr(cache, "layers"))
            self._batches.append(batch)
        batch.join(seqs, cache, len(request.prompt))

    def _prefill_forward(self, model: Any, request: DecodeRequest) -> Any:
        """The prompt through the model, starting from the longest cached prefix it shares with
        a recent prompt of the same model (a task's system prompt and tools, typically)."""
        import torch

        device = self.models.device
        reused, cache = self._prefixes.lookup(request.name, request.prompt)
        rest = request.prompt[reused:]
        kwargs: dict[str, Any] = {}
        if cache is not None:
            self.stats.prefix_tokens += reused
            positions = torch.arange(reused, len(request.prompt), device=device).unsqueeze(0)
            kwargs = {"cache": cache, "position_ids": positions}
        ids = torch.tensor([rest], device=device)
        return model(input_ids=ids, use_cache=True, logits_to_keep=1, **kwargs)

    def _step(self, batch: _Batch) -> None:
        import torch

        for seq in batch.seqs:
            if seq.request.cancelled.is_set():
                self._cancel(seq.request)
        batch.compact()
        if not batch.seqs:
            return
        rows = len(batch.seqs)
        device = batch.mask.device
        try:
            model, extra = self.models.select_rows(batch.group, [s.request.name for s in batch.seqs])
            try:
                ids = torch.tensor([[s.tokens[-1]] for s in batch.seqs], device=device)
                positions = torch.tensor([[s.position] for s in batch.seqs], device=device)
                batch.mask = torch.cat(
                    [batch.mask, torch.ones(rows, 1, dtype=batch.mask.dtype, device=device)], 1
                )
                out = model(
                    input_ids=ids,
                    attention_mask=batch.mask,
                    position_ids=positions,
                    cache=batch.cache,
                    use_cache=True,
                    **extra,
                )
            finally:
                self.models.restore()
        except Exception as exc:
            for seq in batch.seqs:
                self._fail(seq.request, exc)
            batch.seqs, batch.cache, batch.mask = [], None, None
            return
        self.stats.steps += 1
        self.stats.rows += rows
        self.stats.max_batch = max(self.stats.max_batch, rows)
        for seq in batch.seqs:
            seq.position += 1
        self._sample(batch.seqs, out.logits[:, -1].float())
        batch.compact()

    def _sample(self, seqs: list[_Sequence], logits: Any) -> None:
        """Choose each row's next token and hand it to its sequence; a row that fails fails its request."""
        import torch

        greedy = torch.argmax(logits, dim=-1).tolist()
        want = [s.request.params.top_logprobs if s.logprobs is not None else -1 for s in seqs]
        logp = torch.log_softmax(logits, dim=-1) if max(want) >= 0 else None
        for row, seq in enumerate(seqs):
            if seq.done or seq.request.over:
                seq.done = True
                continue
            try:
                params = seq.request.params
                token = (
                    greedy[row] if params.temperature <= 0 else _choose(logits[row], params, seq.generator)
                )
                entry = None
                if logp is not None and want[row] >= 0:
                    entry = _logprob_entry(seq.tokenizer, logp[row], token, want[row])
                self.stats.tokens += 1
                seq.advance(token, entry)
            except Exception as exc:
                self._fail(seq.request, exc)
            if seq.request.cancelled.is_set() or seq.request.over:
                if seq.request.cancelled.is_set():
                    self._cancel(seq.request)
                for other in seqs:
                    if other.request is seq.request:
                        other.done = True


def _pad_left(tensor: Any, width: int) -> Any:
    """Zero columns in front along the sequence axis (dim 2 of a cache tensor, dim 1 of a mask)."""
    import torch

    dim = 2 if tensor.dim() == 4 else 1
    missing = width - tensor.shape[dim]
    if missing <= 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([torch.zeros(shape, dtype=tensor.dtype, device=tensor.device), tensor], dim=dim)


def _cache_device(cache: Any) -> Any:
    layers = getattr(cache, "layers", None)
    if layers:
        return layers[0].keys.device
    return "cpu"


def eos_ids(model: Any, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    for value in (
        tokenizer.eos_token_id,
        getattr(model.generation_config, "eos_token_id", None),
        tokenizer.convert_tokens_to_ids(IM_END) if IM_END in tokenizer.get_vocab() else None,
    ):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(v for v in value if isinstance(v, int))
    return ids


def _choose(logits: Any, params: SamplingParams, generator: Any) -> int:
    import torch

    if params.temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < params.top_p
        sorted_probs = torch.where(keep, sorted_probs, torch.zeros_like(sorted_probs))
        choice = torch.multinomial(sorted_probs / sorted_probs.sum(), 1, generator=generator)
        return int(order[choice])
    return int(torch.multinomial(probs, 1, generator=generator))


def token_bytes(tokenizer: Any, token: int) -> list[int]:
    """The token's own UTF-8 bytes, as OpenAI's ``bytes`` field has them: for byte-level BPE the
    raw bytes (a piece of a multi-byte character stays a piece), else the decoded text's."""
    piece = tokenizer.convert_ids_to_tokens(token)
    table = _byte_decoder()
    if isinstance(piece, str) and piece and all(ch in table for ch in piece) and _is_byte_level(tokenizer):
        return [table[ch] for ch in piece]
    return list(tokenizer.decode([token], skip_special_tokens=False).encode("utf-8"))


def _is_byte_level(tokenizer: Any) -> bool:
    cached = getattr(tokenizer, "_distillgate_byte_level", None)
    if cached is None:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        described = json.loads(backend.to_str()) if backend is not None else {}
        cached = "ByteLevel" in json.dumps(described.get("decoder") or {})
        tokenizer._distillgate_byte_level = cached
    return bool(cached)


_BYTE_DECODER: dict[str, int] = {}


def _byte_decoder() -> dict[str, int]:
    """GPT-2's printable stand-ins for the 256 byte values, reversed."""
    if not _BYTE_DECODER:
        printable = [
            *range(ord("!"), ord("~") + 1),
            *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1),
        ]
        codes = printable[:]
        extra = 0
        for b in range(256):
            if b not in printable:
                printable.append(b)
                codes.append(256 + extra)
                extra += 1
        _BYTE_DECODER.update({chr(c): b for b, c in zip(printable, codes, strict=True)})
    return _BYTE_DECODER


def _logprob_entry(tokenizer: Any, logp: Any, token: int, top: int) -> dict[str, Any]:
    import torch

    def entry(t: int) -> dict[str, Any]:
        piece = tokenizer.decode([t], skip_special_tokens=False)
        return {"token": piece, "logprob": float(logp[t]), "bytes": token_bytes(tokenizer, t)}

    item = entry(token)
    item["top_logprobs"] = [entry(int(t)) for t in torch.topk(logp, top).indices] if top > 0 else []
    return item


def _first_stop(text: str, stops: tuple[str, ...]) -> int | None:
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(hits) if hits else None


def split_answer(text: str, tools_active: bool) -> ParsedAnswer:
    """Generated text as OpenAI message parts: tool calls are parsed only when the request offered tools."""
    if tools_active and TOOL_CALL_OPEN in text:
        return parse_tool_calls(text)
    return ParsedAnswer(text, [])
