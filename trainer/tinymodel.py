"""A small causal LM built from nothing: a byte-level BPE tokenizer trained on given texts, a
randomly initialised Llama-style model, saved as a local directory that loads with
``AutoTokenizer``/``AutoModelForCausalLM.from_pretrained`` exactly like a hub id does.

Tests use it (no hub, no GPU), and so does the offline demo, whose student is a small
model trained from scratch on the reference tasks (hence the configurable size).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from trainer.chat_format import (
    CHAT_TEMPLATE,
    IM_END,
    IM_START,
    PAD,
    TOOL_CALL_CLOSE,
    TOOL_CALL_OPEN,
    parse_arguments,
)


@dataclass(frozen=True)
class TinyModelSpec:
    """Size of the model and its tokenizer. The defaults train in seconds on one CPU core."""

    vocab_size: int = 1024
    """Target BPE vocabulary (the 256 byte symbols and the special tokens included)."""
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 128
    max_position_embeddings: int = 1024
    """Longest sequence the model accepts (prompt and answer together)."""
    tie_word_embeddings: bool = True
    seed: int = 0
    """Seeds the weight initialisation, so the same spec and texts give the same model."""


# The template's fixed strings, so the tokenizer has merges for them whatever texts it is given.
_TEMPLATE_TEXTS = [
    "system\n",
    "user\n",
    "assistant\n",
    "tool\n",
    "# Tools\n<tools>\n</tools>\n",
    'To call a function, answer with {"name": ..., "arguments": ...} blocks.',
    '{"name": "", "arguments": {}}',
    '{"type": "function", "function": {"name": "", "description": "", "parameters": '
    '{"type": "object", "properties": {}, "required": []}}}',
]


def conversation_texts(conversations: Iterable[dict[str, Any]]) -> Iterator[str]:
    """The strings a tokenizer should learn from OpenAI-format examples
    (``{"messages": [...], "tools": [...]}``, as ``dataset.export_jsonl`` writes them)."""
    for conversation in conversations:
        for tool in conversation.get("tools") or []:
            yield json.dumps(tool, ensure_ascii=False)
        for message in conversation.get("messages") or []:
            content = message.get("content")
            if isinstance(content, str):
                yield content
            elif isinstance(content, list):
                yield "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
            for call in message.get("tool_calls") or []:
                fn = call.get("function") or {}
                arguments = parse_arguments(fn.get("arguments", "{}"))
                yield json.dumps({"name": fn.get("name", ""), "arguments": arguments}, ensure_ascii=False)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1024) -> Any:
    """Train a byte-level BPE tokenizer on ``texts`` and wrap it as a ``PreTrainedTokenizerFast``
    with ChatML special tokens and the reference chat template (tools included).

    Byte-level means any text encodes, including characters the texts never showed.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    # Untrimmed offsets: the loss mask maps characters of the rendered chat to tokens.
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    bpe = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[PAD, IM_START, IM_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )

    def corpus() -> Iterator[str]:
        yield from _TEMPLATE_TEXTS
        yield from texts

    tokenizer.train_from_iterator(corpus(), trainer=bpe)
    # Tool-call markers are single tokens (as in Qwen), but not special: decoding keeps them.
    tokenizer.add_tokens(
        [
            AddedToken(TOOL_CALL_OPEN, special=False, normalized=False),
            AddedToken(TOOL_CALL_CLOSE, special=False, normalized=False),
        ]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=IM_END,
        pad_token=PAD,
        unk_token=None,
        bos_token=None,
        chat_template=CHAT_TEMPLATE,
        model_max_length=1_000_000,
        clean_up_tokenization_spaces=False,
    )


def build_tiny_model(out_dir: str | Path, texts: Iterable[str], spec: TinyModelSpec | None = None) -> Path:
    """Train a tokenizer on ``texts``, initialise a Llama-style model of ``spec``'s size, and save
    both to ``out_dir`` (config, safetensors weights, tokenizer with chat template)."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    spec = spec or TinyModelSpec()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(texts, spec.vocab_size)
    eos_id = tokenizer.convert_tokens_to_ids(IM_END)
    pad_id = tokenizer.convert_tokens_to_ids(PAD)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=spec.tie_word_embeddings,
        bos_token_id=None,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
    )
    torch.manual_seed(spec.seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=eos_id, pad_token_id=pad_id)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "distillgate_tinymodel.json").write_text(json.dumps(asdict(spec), indent=2) + "\n")
    return out
