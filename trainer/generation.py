"""Answering chats with a local base model and the adapters loaded on it (transformers + peft).

One ``StudentModels`` holds the base model, any number of LoRA adapters on it (one peft
model, switched per request), and full fine-tuned models loaded as if they were adapters.
All model work is serialised by one lock, so adapters never interfere; callers run it in a
worker thread. The embedded student server and the offline evaluation both use it, so a
student is scored exactly the way it is served.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainer.base_model import resolve_base_model
from trainer.chat_format import IM_END, TOOL_CALL_OPEN, ParsedAnswer, parse_tool_calls, template_messages


class GenerationError(Exception):
    """Base for the errors a caller can turn into a client-facing answer."""


class AdapterNotFound(GenerationError):
    """No adapter or model directory at the path."""


class AdapterLoadError(GenerationError):
    """Something is at the path, but it does not load onto this base model."""


class AdapterExists(GenerationError):
    """The name is taken (by the base model or a loaded adapter)."""


class UnknownModel(GenerationError):
    """A request named neither the base model nor a loaded adapter."""


class ContextTooLong(GenerationError):
    """The prompt (plus the requested answer length) does not fit the model's context."""


@dataclass(frozen=True)
class SamplingParams:
    """How to decode; ``temperature == 0`` is greedy (argmax), the same on every call."""

    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int | None = None
    """Longest answer; ``None`` fills the rest of the context window."""
    seed: int | None = None
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


@dataclass
class ChatResult:
    prompt_tokens: int
    choices: list[Generation] = field(default_factory=list)


@dataclass
class _Entry:
    kind: str  # "lora" | "full"
    path: str
    model: Any = None
    tokenizer: Any = None


# Receives each new piece of text as it is decoded; returning False stops the generation.
TextCallback = Callable[[int, str], bool]
# Receives each finished choice.
ChoiceCallback = Callable[[int, "Generation"], None]


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
    ) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        base = resolve_base_model(base_model)
        self.base_path = base_model
        self.base_name = served_name or base_model
        self.device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        self.max_lora_rank = max_lora_rank
        self.lock = threading.Lock()
        self.tokenizer = AutoTokenizer.from_pretrained(base.path)
        dtype = torch.bfloat16 if self.device.startswith("cuda") else torch.float32
        model: Any = AutoModelForCausalLM.from_pretrained(base.path, dtype=dtype)
        self._base = model.to(self.device).eval()
        self._peft: Any = None
        self.adapters: dict[str, _Entry] = {}
        self.max_model_len = max_model_len or int(getattr(self._base.config, "max_position_embeddings", 2048))

    # -- adapters ----------------------------------------------------------------------------
    def has(self, name: str) -> bool:
        return name == self.base_name or name in self.adapters

    def load(self, name: str, path: str, *, replace: bool = False) -> str:
        """Load the adapter (or full model) at ``path`` under ``name``; returns ``lora`` or ``full``.

        Blocking; raises ``AdapterNotFound``, ``AdapterExists`` (unless ``replace``) or ``AdapterLoadError``.
        """
        import torch
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
                    dtype = torch.bfloat16 if self.device.startswith("cuda") else torch.float32
                    model: Any = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
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
        """Forget an adapter; False when no adapter of that name is loaded."""
        with self.lock:
            entry = self.adapters.pop(name, None)
            if entry is None:
                return False
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

    def chat(
        self,
        name: str,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None,
        params: SamplingParams,
        on_text: TextCallback | None = None,
        on_choice: ChoiceCallback | None = None,
    ) -> ChatResult:
        """Answer a chat with ``params.n`` choices. Blocking: run it in a worker thread.

        ``on_text(choice_index, delta)`` is called as text is decoded (for streaming); when it
        returns False the current choice ends early and no further choice starts.
        ``on_choice(choice_index, generation)`` is called as each choice finishes.
        """
        import torch

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
        generator = torch.Generator(device="cpu")
        if params.seed is not None:
            generator.manual_seed(params.seed)
        else:
            generator.seed()
        result = ChatResult(prompt_tokens=len(prompt))
        with self.lock:
            model, tokenizer = self._select(name)
            try:
                for index in range(params.n):
                    emit = (lambda delta, i=index: on_text(i, delta)) if on_text else None
                    generation, cancelled = _decode(
                        model, tokenizer, prompt, params, max_tokens, generator, emit, self.device
                    )
                    result.choices.append(generation)
                    if on_choice is not None and not cancelled:
                        on_choice(index, generation)
                    if cancelled:
                        break
            finally:
                self._restore()
        return result

    def _select(self, name: str) -> tuple[Any, Any]:
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

    def _restore(self) -> None:
        if self._peft is not None:
            self._peft.base_model.enable_adapter_layers()


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


def _decode(
    model: Any,
    tokenizer: Any,
    prompt: list[int],
    params: SamplingParams,
    max_tokens: int,
    generator: Any,
    emit: Callable[[str], bool] | None,
    device: str,
) -> tuple[Generation, bool]:
    """Sample one answer token by token with a KV cache; returns it and whether it was cancelled."""
    import torch

    stop_ids = eos_ids(model, tokenizer)
    hold = max((len(s) for s in params.stop), default=1) - 1
    out_ids: list[int] = []
    logprobs: list[dict[str, Any]] | None = [] if params.logprobs else None
    sent = 0
    text = ""
    finish = "length"
    cancelled = False
    past = None
    next_input = torch.tensor([prompt], device=device)
    with torch.no_grad():
        for _ in range(max_tokens):
            out = model(input_ids=next_input, past_key_values=past, use_cache=True)
            past = out.past_key_values
            logits = out.logits[0, -1].float()
            token = _choose(logits, params, generator)
            if token in stop_ids:
                finish = "stop"
                break
            if logprobs is not None:
                logprobs.append(_logprob_entry(tokenizer, logits, token, params.top_logprobs))
            out_ids.append(token)
            text = tokenizer.decode(out_ids, skip_special_tokens=False)
            cut = _first_stop(text, params.stop)
            if cut is not None:
                text, finish = text[:cut], "stop"
                break
            # Hold back a partly decoded character and anything that may be the start of a stop string.
            ready = len(text) - hold if not text.endswith("\ufffd") else len(text.rstrip("\ufffd")) - hold
            if emit is not None and ready > sent:
                if not emit(text[sent:ready]):
                    cancelled = True
                    break
                sent = ready
            next_input = torch.tensor([[token]], device=device)
    if emit is not None and not cancelled and len(text) > sent:
        cancelled = not emit(text[sent:])
    return Generation(text, finish, len(out_ids), logprobs), cancelled


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


def _logprob_entry(tokenizer: Any, logits: Any, token: int, top: int) -> dict[str, Any]:
    import torch

    logp = torch.log_softmax(logits, dim=-1)

    def entry(t: int) -> dict[str, Any]:
        piece = tokenizer.decode([t], skip_special_tokens=False)
        return {"token": piece, "logprob": float(logp[t]), "bytes": list(piece.encode("utf-8"))}

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
