"""From chat examples to training tensors: render with the student's chat template, put labels
on assistant tokens only, pack several examples into one sequence, pad a batch.

Labels: every token is ``-100`` (no loss) except those of the answered assistant turn(s),
tool calls and the end-of-turn token included, so the student learns to answer and to stop.
Turns are located by rendering the conversation up to each assistant turn (with the
generation prompt) and up to its end; the character spans map to tokens through the fast
tokenizer's offsets, which works for any template whose renders are prefixes of each other.

Packing: examples are concatenated up to ``max_seq_len``. Each keeps its own position ids
(restarting at 0) and the first token of every example is unlabelled, so no label ever asks
one example to predict another. Attention: no attention mask is passed; transformers (>= 4.54)
derives block-diagonal causal masks from restarting position ids for eager/SDPA/flex
attention, and flash-attention uses them as variable-length boundaries, so tokens attend only
within their own example. Padding forms its own segment and carries no labels.

Shared prefixes (``share_prefix=True``): a task's records mostly begin with the same tokens (the
chat template's header and the application's system prompt: 50-110 of a reference record's
110-165 tokens). Such a prefix is laid out once per sequence, followed by each example's own
tokens with the positions they have in the example; a 4D mask lets every example attend to the
prefix and to itself. The prefix's hidden states do not depend on what follows them (causal
attention), so each example's logits, its loss and the gradients are those of the example
trained alone; only the work on the prefix is done once instead of once per example. The prefix
stops before the last prompt token of every member, so every labelled token and the token that
predicts it belong to one example.

Soft labels (``trainer.kd``): an example whose record carries the teacher's top-k gets soft
targets at the answer positions that align with a teacher token; packing and the collator carry
them alongside the labels, as ``[labelled positions, k]`` tensors in the order the loss takes the
labelled positions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from trainer.chat_format import template_messages
from trainer.kd import AlignStats, SoftTargets, TeacherToken, align, soft_tensors

IGNORE_INDEX = -100

AssistantTurns = Literal["last", "all"]


class Conversation(Protocol):
    """What training reads from an example (``trainer.dataset.Example`` is one)."""

    @property
    def messages(self) -> list[dict[str, Any]]: ...

    @property
    def tools(self) -> list[dict[str, Any]] | None: ...


class TemplateError(ValueError):
    """The chat template does not render a conversation so that its turns can be located."""


@dataclass(frozen=True)
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]
    soft: SoftTargets | None = None
    """Soft targets keyed by label position (the token predicted), where the teacher's top-k
    aligned; None without soft labels."""

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def trained_tokens(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


def assistant_spans(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None,
    turns: AssistantTurns = "last",
) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of the assistant turns to learn.

    ``turns="last"`` keeps only the final assistant turn (a record's teacher answer; earlier
    turns are prompt context written by whoever built the conversation); ``"all"`` keeps
    every assistant turn.
    """
    msgs = template_messages(messages)
    render = _renderer(tokenizer, tools)
    full = render(msgs, False)
    indices = [i for i, m in enumerate(msgs) if m["role"] == "assistant" and i > 0]
    if turns == "last":
        indices = indices[-1:] if indices and indices[-1] == len(msgs) - 1 else []
    spans: list[tuple[int, int]] = []
    for i in indices:
        before = render(msgs[:i], True)
        through = render(msgs[: i + 1], False).rstrip()
        if not (full.startswith(before) and full.startswith(through) and len(through) > len(before)):
            if i == len(msgs) - 1:
                raise TemplateError("the chat template does not render the answer after its prompt")
            continue  # an earlier turn this template re-renders (e.g. strips reasoning): context only
        spans.append((len(before), len(through)))
    return full, spans


def tokenize_example(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None = None,
    *,
    turns: AssistantTurns = "last",
    teacher: Sequence[TeacherToken] | None = None,
    id_of: Callable[[str], int | None] | None = None,
    stats: AlignStats | None = None,
) -> TokenizedExample:
    """Token ids and labels of one conversation, labelled on assistant tokens only; with the
    teacher's tokens (and ``id_of``, ``trainer.kd.token_mapper``) also the soft targets of the
    final answer, counted in ``stats``."""
    text, spans = assistant_spans(tokenizer, messages, tools, turns)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = list(enc["input_ids"])
    labels = [IGNORE_INDEX] * len(ids)
    offsets = [tuple(o) for o in enc["offset_mapping"]]
    for j, (start, end) in enumerate(offsets):
        if end > start and any(lo <= start < hi for lo, hi in spans):
            labels[j] = ids[j]
    soft = None
    content = messages[-1].get("content") if messages else None
    if teacher and id_of is not None and spans and isinstance(content, str) and content:
        # The answer's text begins where its content begins inside the assistant span (after
        # whatever header the template writes); teacher token spans count from there.
        answer_start = spans[-1][0]
        content_start = text.find(content, answer_start)
        if content_start >= 0:
            labelled = [
                label != IGNORE_INDEX and s >= answer_start
                for label, (s, _) in zip(labels, offsets, strict=True)
            ]
            if stats is not None:
                stats.examples_with_soft_labels += 1
            soft = align(offsets, labelled, content_start, teacher, id_of, stats)
    return TokenizedExample(ids, labels, soft)


def _renderer(tokenizer: Any, tools: list[dict[str, Any]] | None) -> Any:
    def render(msgs: list[dict[str, Any]], generation_prompt: bool) -> str:
        text = tokenizer.apply_chat_template(
            msgs, tools=tools or None, tokenize=False, add_generation_prompt=generation_prompt
        )
        return str(text)

    return render


@dataclass
class PackedSequence:
    """Several examples back to back, each with positions restarting at 0."""

    input_ids: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    position_ids: list[int] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    """Tokens each example owns in the sequence (after the shared prefix, if any)."""
    soft: SoftTargets = field(default_factory=SoftTargets)
    """Soft targets by label position in the sequence."""
    prefix: int = 0
    """Leading tokens every example attends to (a shared prefix laid out once); 0: none, the
    examples are plainly concatenated."""

    def __len__(self) -> int:
        return len(self.input_ids)

    def segments(self) -> list[int]:
        """Per token: 0 for the shared prefix, k for the k-th example's own tokens (from 1)."""
        out = [0] * self.prefix
        for k, length in enumerate(self.lengths, start=1):
            out.extend([k] * length)
        return out

    def add(self, example: TokenizedExample) -> None:
        labels = list(example.labels)
        if labels:
            labels[0] = IGNORE_INDEX  # never predicted from the previous example's last token
        if example.soft is not None:
            offset = len(self.input_ids)
            for pos, ids in example.soft.ids.items():
                if pos > 0:
                    self.soft.ids[offset + pos] = ids
                    self.soft.probs[offset + pos] = example.soft.probs[pos]
        self.input_ids.extend(example.input_ids)
        self.labels.extend(labels)
        self.position_ids.extend(range(len(example)))
        self.lengths.append(len(example))


def pack(
    examples: Sequence[TokenizedExample],
    max_seq_len: int,
    *,
    packing: bool = True,
    share_prefix: bool = False,
) -> list[PackedSequence]:
    """Greedily fill sequences of at most ``max_seq_len`` tokens with examples, in order.

    Examples longer than ``max_seq_len`` must have been dropped before. With ``packing=False``
    every example is its own sequence. With ``share_prefix`` the tokens all members of a
    sequence begin with are laid out once (module docstring), so more examples fit.
    """
    for example in examples:
        if len(example) > max_seq_len:
            raise ValueError(f"an example of {len(example)} tokens does not fit max_seq_len={max_seq_len}")
    if not share_prefix:
        sequences: list[PackedSequence] = []
        current = PackedSequence()
        for example in examples:
            if current.lengths and (not packing or len(current) + len(example) > max_seq_len):
                sequences.append(current)
                current = PackedSequence()
            current.add(example)
        if current.lengths:
            sequences.append(current)
        return sequences
    groups: list[tuple[list[TokenizedExample], int]] = []
    members: list[TokenizedExample] = []
    shared = 0
    for example in examples:
        if members and packing:
            common = min(
                shared, _common_prefix(members[0].input_ids, example.input_ids), _prefix_cap(example)
            )
            grown = common + sum(len(m) - common for m in members) + len(example) - common
            if grown <= max_seq_len:
                members.append(example)
                shared = common
                continue
        if members:
            groups.append((members, shared))
        members, shared = [example], _prefix_cap(example)
    if members:
        groups.append((members, shared))
    return [_shared_sequence(group, shared) for group, shared in groups]


def _prefix_cap(example: TokenizedExample) -> int:
    """The longest prefix of ``example`` that may be shared: it ends before the token that
    predicts the first label (so every labelled position and its predecessor stay its own)."""
    first = next((j for j, label in enumerate(example.labels) if label != IGNORE_INDEX), len(example))
    return max(0, first - 1)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for j in range(n):
        if a[j] != b[j]:
            return j
    return n


def _shared_sequence(members: Sequence[TokenizedExample], shared: int) -> PackedSequence:
    if len(members) == 1 or shared == 0:
        seq = PackedSequence()
        for example in members:
            seq.add(example)
        return seq
    seq = PackedSequence(
        input_ids=list(members[0].input_ids[:shared]),
        labels=[IGNORE_INDEX] * shared,
        position_ids=list(range(shared)),
        prefix=shared,
    )
    for example in members:
        start = len(seq.input_ids)
        labels = list(example.labels[shared:])
        labels[0] = IGNORE_INDEX  # predicted from the previous example's last token: never labelled
        if example.soft is not None:
            for pos, ids in example.soft.ids.items():
                if pos > shared:
                    seq.soft.ids[start + pos - shared] = ids
                    seq.soft.probs[start + pos - shared] = example.soft.probs[pos]
        seq.input_ids.extend(example.input_ids[shared:])
        seq.labels.extend(labels)
        seq.position_ids.extend(range(shared, len(example)))
        seq.lengths.append(len(example) - shared)
    return seq


@dataclass(frozen=True)
class Collator:
    """Pads a batch of packed sequences to its longest one: pad ids, ``-100`` labels, and
    positions that start a new segment (so padding attends only to padding). With soft targets
    in the batch, also ``soft_ids`` / ``soft_probs``: one row per labelled position (row-major,
    as ``labels[:, 1:] != -100`` selects them), -1 / 0 where a position has none."""

    pad_token_id: int

    def __call__(self, batch: Sequence[PackedSequence]) -> dict[str, Any]:
        import torch

        width = max(len(seq) for seq in batch)
        input_ids, labels, position_ids = [], [], []
        for seq in batch:
            pad = width - len(seq)
            input_ids.append(seq.input_ids + [self.pad_token_id] * pad)
            labels.append(seq.labels + [IGNORE_INDEX] * pad)
            position_ids.append(seq.position_ids + list(range(pad)))
        out = {
            "input_ids": torch.tensor(input_ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            "position_ids": torch.tensor(position_ids, dtype=torch.long),
        }
        if any(seq.prefix for seq in batch):
            out["attention_mask"] = shared_prefix_mask(batch, width)
        k = max((len(ids) for seq in batch for ids in seq.soft.ids.values()), default=0)
        if k:
            positions = [[j for j in range(1, len(row)) if row[j] != IGNORE_INDEX] for row in labels]
            soft_ids, soft_probs = soft_tensors([seq.soft for seq in batch], positions, k)
            out["soft_ids"] = torch.tensor(soft_ids, dtype=torch.long).reshape(-1, k)
            out["soft_probs"] = torch.tensor(soft_probs, dtype=torch.float32).reshape(-1, k)
        return out


def shared_prefix_mask(batch: Sequence[PackedSequence], width: int) -> Any:
    """The ``[batch, 1, width, width]`` boolean mask (True: may attend) of packed sequences with
    shared prefixes: causal, within an example's own tokens and to its sequence's prefix; the
    padding attends only to the padding."""
    import torch

    rows = []
    for seq in batch:
        segments = seq.segments()
        rows.append(segments + [-1] * (width - len(segments)))
    seg = torch.tensor(rows, dtype=torch.long)
    query, key = seg[:, :, None], seg[:, None, :]
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    allowed = (query == key) | ((key == 0) & (query > 0))
    return (allowed & causal)[:, None]
