"""Supervised fine-tuning of a student on teacher demonstrations: LoRA (peft) or full.

A plain torch loop (AdamW, linear warmup then linear decay, gradient clipping) over packed
sequences from ``trainer.collate``; held-out loss before, during (for early stopping) and
after training. LoRA runs save only the adapter (``adapter_config.json`` +
``adapter_model.safetensors``, the layout vLLM loads); full runs save the whole model and its
tokenizer.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from router.policy import SoftLabelPolicy, TrainPolicy
from trainer import fast_finetune
from trainer.base_model import resolve_base_model
from trainer.collate import (
    IGNORE_INDEX,
    AssistantTurns,
    Collator,
    Conversation,
    PackedSequence,
    pack,
    tokenize_example,
)
from trainer.cpu_share import CPU_BF16_MIN_HIDDEN, MIN_WINDOW_S, CpuShare, cpu_has_bf16
from trainer.distributed import World, all_sum, data_parallel, from_main, no_sync, process_group
from trainer.fast_path import FastPath, make_optimizer, prepare_model
from trainer.kd import AlignStats, token_mapper
from trainer.loss import labelled_loss_sum
from trainer.memory_plan import SHARE, available_bytes, plan_memory

if TYPE_CHECKING:
    import torch

_POLICY = TrainPolicy()
_SOFT = SoftLabelPolicy()
POLICY_FIELDS = (
    "method",
    "epochs",
    "learning_rate",
    "batch_tokens",
    "max_seq_len",
    "lora_rank",
    "lora_alpha",
    "lora_dropout",
    "lora_targets",
    "share_prefix",
    "cpu_threads",
)
"""Hyper-parameters a task's ``train`` policy sets: declared (and documented) once, in
``router.policy.TrainPolicy``, whose defaults are also ``FinetuneConfig``'s."""


WARMUP_STEPS = 2
"""Steps left out of ``FinetuneResult.steady_tokens_per_s``: compilation and first-use costs."""


@dataclass
class FinetuneConfig:
    """Hyper-parameters of one fine-tuning run (the policy's ``train`` section supplies most)."""

    method: Literal["lora", "full"] = _POLICY.method
    """Policy ``train.method`` (as are the next eight fields: ``TrainPolicy`` documents them)."""
    lora_rank: int = _POLICY.lora_rank
    lora_alpha: int = _POLICY.lora_alpha
    lora_dropout: float = _POLICY.lora_dropout
    lora_targets: list[str] | str = _POLICY.lora_targets
    learning_rate: float = _POLICY.learning_rate
    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""
    warmup_ratio: float = 0.03
    """Share of the optimizer steps spent warming the learning rate up from 0 (at least one step)."""
    max_grad_norm: float = 1.0
    """Gradients are clipped to this global norm; 0 disables clipping."""
    epochs: float = _POLICY.epochs
    max_steps: int | None = None
    """Upper bound on optimizer steps, whatever ``epochs`` says (benchmarks, smoke runs)."""
    batch_tokens: int = _POLICY.batch_tokens
    """Tokens (padding included) per forward/backward pass: packed sequences are grouped up to it,
    at least one per micro-batch."""
    gradient_accumulation_steps: int = 1
    """Micro-batches (rows on the CUDA fast path) summed into one optimizer step, over all ranks:
    at least one per rank, so the same config makes the same steps at any world size."""
    max_seq_len: int = _POLICY.max_seq_len
    packing: bool = True
    """Concatenate several examples per sequence (attention and labels stay per example)."""
    share_prefix: bool = _POLICY.share_prefix
    """Policy ``train.share_prefix``. CPU path, with ``packing``: lay out the tokens a sequence's
    examples begin with (template header, system prompt) once and let each example attend to them
    (``trainer.collate``): the same losses and gradients as without, for a fraction of the
    tokens. Off by default: more examples then fit a sequence, so an epoch makes fewer optimizer
    steps and recipes tuned without it under-train (the tiny-model tests did)."""
    cpu_threads: int | Literal["auto"] | None = _POLICY.cpu_threads
    """Policy ``train.cpu_threads``: torch threads of a CPU run (None: the process's count;
    ``auto``: the cores other processes leave free, checked between steps, ``trainer.cpu_share``)."""
    assistant_turns: AssistantTurns = "last"
    """Which assistant turns carry loss: ``last`` (the record's teacher answer) or ``all``."""
    eval_every: int = 0
    """Held-out loss every N optimizer steps; 0 means once per epoch."""
    early_stopping_patience: int = 3
    """Stop after this many evaluations without improving the held-out loss by
    ``early_stopping_min_delta``; the best weights are kept. 0 disables early stopping."""
    early_stopping_min_delta: float = 0.0
    seed: int = 0
    """Seeds python, torch and the data order: same data, config and hardware give the same weights."""
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """``auto``: bf16 autocast (LoRA bases loaded in bf16) where it pays, on a GPU that supports it
    or a CPU with native bf16 matmuls (``use_bf16`` has the numbers); ``bf16`` / ``fp32`` force it."""
    device: str = "auto"
    """``auto`` (CUDA if available, else CPU), ``cpu``, ``cuda``, ``cuda:1`` …"""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about a third more compute. The
    memory check turns it on when the run would not fit otherwise."""
    row_tokens: int | None = None
    """CUDA LoRA runs (``trainer.fast_finetune``): the width of a packed row; None sizes it from
    free memory and the data. Unused on the CPU path."""
    memory_limit: int | None = None
    """Bytes the run may hold resident (CPU) or on the device (GPU); ``None``: what the machine
    (or its cgroup) has available when training starts. See ``trainer.memory_plan``."""
    kd_weight: float = _SOFT.weight
    """Policy ``soft_labels.weight`` (``SoftLabelPolicy`` documents it): the KL term's share of the
    loss on answer tokens with soft labels; 0 trains on the hard labels alone."""

    @classmethod
    def from_policy(
        cls, train: TrainPolicy, soft_labels: SoftLabelPolicy | None = None, **overrides: Any
    ) -> FinetuneConfig:
        """The run configuration a task's ``train`` (and ``soft_labels``) policy asks for."""
        values: dict[str, Any] = {name: getattr(train, name) for name in POLICY_FIELDS}
        if soft_labels is not None:
            values["kd_weight"] = soft_labels.weight
        values.update(overrides)
        return cls(**values)


@dataclass(frozen=True)
class FinetuneProgress:
    """What a progress callback sees after every optimizer step."""

    step: int
    total_steps: int
    epoch: float
    train_loss: float
    eval_loss: float | None
    tokens_per_s: float
    tokens: int = 0
    """Record tokens trained on so far (all ranks together)."""


ProgressCallback = Callable[[FinetuneProgress], None]


@dataclass
class FinetuneResult:
    """Losses, sizes and timings of a run; ``metrics()`` is what the adapter registry stores."""

    out_dir: str
    method: str
    device: str
    precision: str
    eval_loss_before: float | None
    eval_loss_after: float | None
    train_losses: list[tuple[int, float]] = field(default_factory=list)
    """(optimizer step, mean loss of its tokens)."""
    eval_losses: list[tuple[int, float]] = field(default_factory=list)
    steps: int = 0
    total_steps: int = 0
    stopped_early: bool = False
    train_examples: int = 0
    eval_examples: int = 0
    dropped_too_long: int = 0
    sequences: int = 0
    """Packed training sequences per epoch (rows of ``row_tokens`` on the CUDA fast path)."""
    fast_path: bool = False
    """Trained through ``trainer.fast_finetune`` (CUDA, LoRA, bf16)."""
    row_tokens: int = 0
    world_size: int = 1
    """Data-parallel ranks (``torchrun``) the run was spread over."""
    tokens: int = 0
    """Tokens that went through forward and backward passes (padding excluded)."""
    trained_tokens: int = 0
    """Tokens that carried loss (assistant tokens), summed over epochs."""
    train_s: float = 0.0
    warmup_s: float = 0.0
    """Of ``train_s``, the first ``WARMUP_STEPS`` steps (compilation on the CUDA fast path)."""
    warmup_tokens: int = 0
    wall_s: float = 0.0
    batch_tokens: int = 0
    """Tokens per micro-batch the run used (the memory check may lower the configured one)."""
    gradient_checkpointing: bool = False
    estimated_peak_bytes: int = 0
    """What the memory check expected the run to hold at its peak."""
    peak_rss_bytes: int = 0
    """This process's peak resident memory when the run ended (CPU runs; the process's whole life)."""
    trainable_parameters: int = 0
    total_parameters: int = 0
    soft_labels: dict[str, Any] = field(default_factory=dict)
    """Alignment coverage of the teacher's soft labels (``trainer.kd.AlignStats``) per dataset:
    ``train`` and ``eval``."""

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.train_s if self.train_s > 0 else 0.0

    @property
    def steady_tokens_per_s(self) -> float:
        """Tokens per second after the first ``WARMUP_STEPS`` steps (all of them if no more ran)."""
        seconds = self.train_s - self.warmup_s
        if self.steps <= WARMUP_STEPS or seconds <= 0:
            return self.tokens_per_s
        return (self.tokens - self.warmup_tokens) / seconds

    def metrics(self) -> dict[str, Any]:
        data = asdict(self)
        del data["out_dir"]  # the registry records where the files end up
        data["tokens_per_s"] = round(self.tokens_per_s, 1)
        data["steady_tokens_per_s"] = round(self.steady_tokens_per_s, 1)
        data["train_losses"] = [[s, round(v, 5)] for s, v in self.train_losses]
        data["eval_losses"] = [[s, round(v, 5)] for s, v in self.eval_losses]
        return data


def pick_device(requested: str = "auto") -> str:
    import torch

    if requested != "auto":
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"


def use_bf16(precision: str, device: str, hidden_size: int | None = None, method: str = "lora") -> bool:
    """bf16 autocast (LoRA bases loaded in bf16) where it pays: on a GPU that supports it, and on
    a CPU with native bf16 matmuls for a LoRA run on a model at least ``CPU_BF16_MIN_HIDDEN``
    wide. Measured (SmolLM2-135M LoRA, classify-email, 512-token micro-batches, 2 threads, quiet
    2-core Xeon with AMX): fp32 166-168 tokens/s, bf16 236-262 (1.5x), peak 2.6 -> 1.8 GB
    (``bench/student_recipe.py --speed``). ``bf16`` / ``fp32`` force either."""
    import torch

    if precision == "bf16":
        return True
    if precision == "fp32":
        return False
    if device.startswith("cuda"):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return (
        device.startswith("cpu")
        and method == "lora"
        and (hidden_size or 0) >= CPU_BF16_MIN_HIDDEN
        and cpu_has_bf16()
    )


def finetune(
    base_model: str | Path,
    train_examples: Sequence[Conversation],
    eval_examples: Sequence[Conversation],
    out_dir: str | Path,
    config: FinetuneConfig | None = None,
    *,
    progress: bool | ProgressCallback = False,
) -> FinetuneResult:
    """Fine-tune ``base_model`` (hub id or local path) on ``train_examples`` and save to ``out_dir``.

    ``eval_examples`` (held out, never trained on) measure the loss before and after, and drive
    early stopping. ``progress=True`` draws a rich progress bar; a callable receives a
    ``FinetuneProgress`` after every optimizer step instead.
    """
    config = config or FinetuneConfig()
    world = World.from_env()
    device = world.device(pick_device(config.device))
    with (
        process_group(world, device),
        _cpu_threads(config.cpu_threads if device.startswith("cpu") else None) as share,
    ):
        return _finetune(
            base_model, train_examples, eval_examples, out_dir, config, progress, world, device, share
        )


@contextlib.contextmanager
def _cpu_threads(threads: int | Literal["auto"] | None) -> Generator[CpuShare | None, None, None]:
    """Torch's intra-op threads set to ``threads`` for the run (and back after it); ``auto``
    yields the ``CpuShare`` that moves them between steps."""
    if not threads:
        yield None
        return
    import torch

    before = torch.get_num_threads()
    share = CpuShare(probe_s=MIN_WINDOW_S) if threads == "auto" else None
    torch.set_num_threads(share.threads if share is not None else int(threads))
    try:
        yield share
    finally:
        torch.set_num_threads(before)


def _finetune(
    base_model: str | Path,
    train_examples: Sequence[Conversation],
    eval_examples: Sequence[Conversation],
    out_dir: str | Path,
    config: FinetuneConfig,
    progress: bool | ProgressCallback,
    world: World,
    device: str,
    share: CpuShare | None = None,
) -> FinetuneResult:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    _seed_everything(config.seed)
    base = resolve_base_model(base_model)
    model_config = AutoConfig.from_pretrained(base.path)
    bf16 = use_bf16(config.precision, device, getattr(model_config, "hidden_size", None), config.method)
    fast = fast_finetune.applies(config, device, bf16)
    tokenizer = AutoTokenizer.from_pretrained(base.path)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    train_align, eval_align = AlignStats(), AlignStats()
    train_tok, dropped_train = _tokenize(tokenizer, train_examples, config, train_align)
    eval_tok, dropped_eval = _tokenize(tokenizer, eval_examples, config, eval_align)
    if not train_tok:
        raise ValueError("no training example fits max_seq_len (or none was given)")
    random.Random(config.seed).shuffle(train_tok)
    longest = max(len(t) for t in [*train_tok, *eval_tok])
    if world.distributed and config.memory_limit is None and device.startswith("cpu"):
        # Every rank of a CPU job holds its own model in the machine's one memory.
        config = replace(config, memory_limit=int(available_bytes() * SHARE) // world.size)
    memory = plan_memory(model_config, config, bf16=bf16, device=device, longest_record=longest)

    load_dtype = torch.bfloat16 if (bf16 and config.method == "lora") else torch.float32
    model: Any = AutoModelForCausalLM.from_pretrained(base.path, dtype=load_dtype)
    model.config.use_cache = False
    if config.method == "lora":
        from peft import LoraConfig, get_peft_model

        targets = config.lora_targets
        peft_config = LoraConfig(
            r=config.lora_rank,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=targets if isinstance(targets, str) else list(targets),
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, peft_config)
        # The adapter names the base model as the user did (what vLLM serves), not a cache path.
        model.peft_config["default"].base_model_name_or_path = base.name
    if memory.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        if config.method == "lora":
            model.enable_input_require_grads()
    model.to(device)
    autocast_device = "cuda" if device.startswith("cuda") else "cpu"
    autocast = (
        (lambda: torch.autocast(autocast_device, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    )

    per_step = _ceil_to(max(world.size, config.gradient_accumulation_steps, 1), world.size)
    switches, width = FastPath(), 0
    if fast:
        switches = fast_finetune.fast_path(config, device)
        fast_finetune.raise_compile_limits()
        model = prepare_model(model, switches)
        width = fast_finetune.plan_width(
            model_config, train_tok, config, torch.cuda.mem_get_info(torch.device(device))[0], world.size
        )
    source: _StepSource = (
        fast_finetune.RowSteps(
            train_tok,
            eval_tok,
            width,
            pad_id,
            config.max_seq_len,
            device,
            switches,
            per_step,
            kd_weight=config.kd_weight,
        )
        if fast
        else _SequenceSteps(
            pack(train_tok, memory.sequence_tokens, packing=config.packing, share_prefix=config.share_prefix),
            pack(eval_tok, memory.sequence_tokens, packing=config.packing, share_prefix=config.share_prefix),
            Collator(pad_id),
            memory.batch_tokens,
            per_step,
            device,
            config.kd_weight,
        )
    )
    # What forward and backward go through: the model's loss as a module, in DDP beyond one rank.
    trained = data_parallel(model, source.loss_sum, world)

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(trainable, config.learning_rate, config.weight_decay, switches)
    data_rng = random.Random(config.seed + 1)
    first_epoch = source.epoch(data_rng)
    steps_per_epoch = max(1, math.ceil(len(first_epoch) / source.units_per_step))
    total_steps = max(1, math.ceil(steps_per_epoch * config.epochs))
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    warmup = max(1, int(config.warmup_ratio * total_steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, warmup, total_steps))
    eval_every = config.eval_every or steps_per_epoch

    result = FinetuneResult(
        out_dir=str(out_dir),
        method=config.method,
        device=device,
        precision="bf16" if bf16 else "fp32",
        eval_loss_before=None,
        eval_loss_after=None,
        total_steps=total_steps,
        train_examples=len(train_tok),
        eval_examples=len(eval_tok),
        dropped_too_long=dropped_train + dropped_eval,
        sequences=source.sequences,
        fast_path=fast,
        row_tokens=width,
        world_size=world.size,
        batch_tokens=width or memory.batch_tokens,
        gradient_checkpointing=memory.gradient_checkpointing,
        estimated_peak_bytes=memory.estimated_peak_bytes,
        trainable_parameters=sum(p.numel() for p in trainable),
        total_parameters=sum(p.numel() for p in model.parameters()),
        soft_labels={"train": train_align.as_dict(), "eval": eval_align.as_dict()}
        if train_align.examples_with_soft_labels or eval_align.examples_with_soft_labels
        else {},
    )

    def held_out_loss() -> float | None:
        # Only rank 0 evaluates (on the model itself, not through DDP); the others follow it.
        return source.held_out(model, autocast) if world.main else None

    result.eval_loss_before = held_out_loss()
    best_loss = result.eval_loss_before
    best_state: dict[str, torch.Tensor] | None = None
    bad_evals = 0
    step = 0
    train_time = 0.0
    reporter = _reporter(progress if world.main else False, total_steps)
    epoch_units: list[Any] | None = first_epoch

    with reporter as report:
        while step < total_steps and not result.stopped_early:
            units = epoch_units if epoch_units is not None else source.epoch(data_rng)
            epoch_units = None
            for k in range(0, len(units), source.units_per_step):
                if step >= total_steps:
                    break
                group = units[k : k + source.units_per_step]
                t0 = time.perf_counter()
                trained.train()
                n_labels = sum(source.labelled(u) for u in group)
                loss_sum = _train_step(trained, group, n_labels, world, autocast)
                if config.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                train_loss = float(loss_sum) / max(1, n_labels)
                train_time += time.perf_counter() - t0
                result.tokens += sum(source.tokens(u) for u in group)
                result.trained_tokens += n_labels
                result.train_losses.append((step, train_loss))
                if share is not None:
                    share.pick()
                if step == WARMUP_STEPS:
                    result.warmup_s, result.warmup_tokens = train_time, result.tokens

                eval_loss = None
                if source.has_eval and (step % eval_every == 0 or step == total_steps):
                    stop = False
                    if world.main:
                        eval_loss = held_out_loss()
                        assert eval_loss is not None
                        result.eval_losses.append((step, eval_loss))
                        if best_loss is None or eval_loss < best_loss - config.early_stopping_min_delta:
                            best_loss, bad_evals = eval_loss, 0
                            best_state = _trainable_state(model)
                        else:
                            bad_evals += 1
                            stop = bool(
                                config.early_stopping_patience and bad_evals >= config.early_stopping_patience
                            )
                    result.stopped_early = from_main([float(stop)], world, device)[0] > 0
                report(
                    FinetuneProgress(
                        step,
                        total_steps,
                        step / steps_per_epoch,
                        train_loss,
                        eval_loss,
                        result.tokens / train_time if train_time else 0.0,
                        result.tokens,
                    )
                )
                if result.stopped_early:
                    break

    result.steps = step
    result.train_s = train_time
    result.peak_rss_bytes = peak_rss_bytes()
    if not world.main:
        return result  # rank 0 keeps the best weights, saves and reports
    if source.has_eval:
        last = result.eval_losses[-1][1] if result.eval_losses else result.eval_loss_before
        if best_state is not None and best_loss is not None and last is not None and best_loss < last:
            _load_trainable_state(model, best_state)
        result.eval_loss_after = best_loss if best_state is not None else last
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (model.get_base_model() if config.method == "lora" else model).config.use_cache = True  # for generation
    model.save_pretrained(out)
    if config.method == "full":
        tokenizer.save_pretrained(out)
    result.wall_s = time.perf_counter() - started
    (out / "distillgate_training.json").write_text(
        json.dumps(
            {"base_model": str(base_model), "config": asdict(config), "metrics": result.metrics()},
            indent=2,
            default=str,
        )
        + "\n"
    )
    return result


class _StepSource(Protocol):
    """Where the loop's optimizer steps come from: units (micro-batches of packed sequences, or
    rows on the CUDA fast path) in epoch order, ``units_per_step`` of them a step over all ranks
    (the same on every rank: the order comes from the shared seed), one a forward pass."""

    @property
    def units_per_step(self) -> int: ...

    @property
    def has_eval(self) -> bool: ...

    @property
    def sequences(self) -> int: ...

    def epoch(self, rng: random.Random) -> list[Any]: ...

    def loss_sum(self, model: Any, unit: Any) -> torch.Tensor: ...

    def labelled(self, unit: Any) -> int: ...

    def tokens(self, unit: Any) -> int: ...

    def held_out(self, model: Any, autocast: Callable[[], Any]) -> float | None: ...


@dataclass
class _SequenceSteps:
    """The CPU path's steps: packed sequences (``trainer.collate``) in micro-batches of
    ``batch_tokens`` (padding included), ``accumulation`` micro-batches a step."""

    train: list[PackedSequence]
    eval: list[PackedSequence]
    collator: Collator
    batch_tokens: int
    accumulation: int
    device: str
    kd_weight: float = 0.0
    """The KL term's share where a batch has soft labels (held-out loss stays cross-entropy)."""

    @property
    def units_per_step(self) -> int:
        return self.accumulation

    @property
    def has_eval(self) -> bool:
        return bool(self.eval)

    @property
    def sequences(self) -> int:
        return len(self.train)

    def epoch(self, rng: random.Random) -> list[list[PackedSequence]]:
        order = list(range(len(self.train)))
        rng.shuffle(order)
        return micro_batches([self.train[i] for i in order], self.batch_tokens)

    def loss_sum(self, model: Any, unit: list[PackedSequence]) -> torch.Tensor:
        inputs = {k: v.to(self.device) for k, v in self.collator(unit).items()}
        return labelled_loss_sum(model, **inputs, kd_weight=self.kd_weight)

    @staticmethod
    def labelled(unit: list[PackedSequence]) -> int:
        return sum(_label_count(seq) for seq in unit)

    @staticmethod
    def tokens(unit: list[PackedSequence]) -> int:
        return sum(len(seq) for seq in unit)

    def held_out(self, model: Any, autocast: Callable[[], Any]) -> float | None:
        if not self.eval:
            return None
        return evaluate_loss(model, self.eval, self.collator, self.batch_tokens, self.device, autocast)


def _train_step(
    trained: Any, group: Sequence[Any], n_labels: int, world: World, autocast: Callable[[], Any]
) -> torch.Tensor:
    """Forward and backward over this rank's share of one step; returns the step's summed loss
    over all ranks. Every labelled token weighs the same whichever pass or rank holds it: DDP
    averages gradients over ranks, so each rank's sum is scaled by the world size to undo that."""
    mine = world.shard(group)
    weight = 1.0
    if not mine:  # fewer units than ranks: a pass that counts nothing keeps DDP's collectives paired
        mine, weight = list(group[:1]), 0.0
    scale = weight * world.size / max(1, n_labels)
    total: torch.Tensor | None = None
    for j, unit in enumerate(mine):
        with no_sync(trained, last=j == len(mine) - 1):
            with autocast():
                summed = trained(unit)
            (summed * scale).backward()
        part = summed.detach().float() * weight
        total = part if total is None else total + part
    assert total is not None
    return all_sum(total, world)


def _ceil_to(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over labelled positions (position t predicts label t+1)."""
    import torch.nn.functional as F

    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    return F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


def evaluate_loss(
    model: Any,
    sequences: Sequence[PackedSequence],
    collator: Collator,
    batch_tokens: int,
    device: str,
    autocast: Callable[[], Any] = contextlib.nullcontext,
) -> float:
    """Mean loss per labelled token over ``sequences`` (token-weighted, not batch-weighted)."""
    import torch

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in micro_batches(list(sequences), batch_tokens):
            inputs = {name: v.to(device) for name, v in collator(batch).items()}
            with autocast():
                total += float(labelled_loss_sum(model, **inputs))
            count += sum(_label_count(seq) for seq in batch)
    return total / max(1, count)


def micro_batches(sequences: Sequence[PackedSequence], batch_tokens: int) -> list[list[PackedSequence]]:
    """Consecutive packed sequences grouped so that each group, padded to its longest, holds at
    most ``batch_tokens`` tokens (a sequence longer than that goes alone)."""
    batches: list[list[PackedSequence]] = []
    current: list[PackedSequence] = []
    width = 0
    for seq in sequences:
        grown = max(width, len(seq))
        if current and grown * (len(current) + 1) > batch_tokens:
            batches.append(current)
            current, grown = [], len(seq)
        current.append(seq)
        width = grown
    if current:
        batches.append(current)
    return batches


def peak_rss_bytes() -> int:
    """This process's peak resident set size (Linux reports kilobytes)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _tokenize(
    tokenizer: Any, examples: Sequence[Conversation], config: FinetuneConfig, stats: AlignStats
) -> tuple[list[Any], int]:
    out, dropped = [], 0
    id_of = token_mapper(tokenizer)
    for example in examples:
        tokenized = tokenize_example(
            tokenizer,
            example.messages,
            example.tools,
            turns=config.assistant_turns,
            teacher=getattr(example, "teacher", None),  # trainer.dataset.Example's soft labels
            id_of=id_of,
            stats=stats,
        )
        if len(tokenized) > config.max_seq_len or tokenized.trained_tokens == 0:
            dropped += 1
            continue
        out.append(tokenized)
    return out, dropped


def _label_count(seq: PackedSequence) -> int:
    # Position 0 is never a target (nothing precedes it), matching token_loss_sum's shift.
    return sum(1 for label in seq.labels[1:] if label != IGNORE_INDEX)


def _lr_factor(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def _seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def _trainable_state(model: Any) -> dict[str, Any]:
    return {name: p.detach().to("cpu", copy=True) for name, p in model.named_parameters() if p.requires_grad}


def _load_trainable_state(model: Any, state: dict[str, Any]) -> None:
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in state:
                p.copy_(state[name].to(p.device))


class _NullReporter:
    def __enter__(self) -> Callable[[FinetuneProgress], None]:
        return lambda _p: None

    def __exit__(self, *exc: object) -> None:
        return None


class _CallbackReporter:
    def __init__(self, callback: ProgressCallback) -> None:
        self.callback = callback

    def __enter__(self) -> Callable[[FinetuneProgress], None]:
        return self.callback

    def __exit__(self, *exc: object) -> None:
        return None


class _RichReporter:
    def __init__(self, total: int) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn("[bold]fine-tuning"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeRemainingColumn(),
        )
        self.task = self.progress.add_task("train", total=total, info="")

    def __enter__(self) -> Callable[[FinetuneProgress], None]:
        self.progress.start()

        def report(p: FinetuneProgress) -> None:
            info = f"loss {p.train_loss:.3f}"
            if p.eval_loss is not None:
                info += f" · held-out {p.eval_loss:.3f}"
            info += f" · {p.tokens_per_s:,.0f} tok/s"
            self.progress.update(self.task, completed=p.step, info=info)

        return report

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()


def _reporter(progress: bool | ProgressCallback, total: int) -> Any:
    if callable(progress):
        return _CallbackReporter(progress)
    return _RichReporter(total) if progress else _NullReporter()
