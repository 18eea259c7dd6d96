"""Soft labels: the teacher's top-k logprobs, aligned to the student's tokens, and the KD loss.

Where they come from: the gateway asks the teacher for ``top_logprobs`` on a sampled share of a
task's requests (``soft_labels`` in the policy) and the record keeps them
(``choices[0].logprobs.content``: per answer token, the chosen token and its top-k alternatives).

Alignment, by text. Each teacher token covers a character span of the answer; each student
token of the rendered conversation has its own span (the fast tokenizer's offsets). A student
answer token gets soft labels only where a teacher token covers exactly its span (one teacher
token = one student token); elsewhere it keeps its hard label alone. Each of the teacher's
alternatives maps to the student token id whose text it is, when that text is exactly one
student token (with the same tokenizer on both sides that is every alternative: the ids are
direct); alternatives that map to nothing join the tail. ``AlignStats`` counts the coverage.

The loss, per answer token with soft labels: ``(1 - w) * CE(hard label) + w * KL(teacher ||
student)``; CE alone elsewhere. The teacher's distribution is known on its k mapped
alternatives only, so the KL is taken over k + 1 outcomes: the k mapped tokens, and "any other
token", whose teacher mass is the tail ``1 - sum(p_i)`` (what the top-k leave out, plus the
alternatives that did not map) and whose student mass is ``1 - sum(q_i)`` over the same k
ids. This is an exact KL between two distributions on the same k + 1 outcomes — no
renormalisation of the top-k that would claim the teacher put all its mass there.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class TeacherToken:
    """One answer token as the teacher reported it."""

    token: str
    alternatives: tuple[tuple[str, float], ...]
    """(token text, logprob), the teacher's top-k at this position."""


def teacher_tokens(response: dict[str, Any] | None) -> list[TeacherToken] | None:
    """The answer's tokens with their top-k from a stored chat answer; None when it has none."""
    if not isinstance(response, dict):
        return None
    choices = response.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return None
    logprobs = choices[0].get("logprobs")
    if not isinstance(logprobs, dict) or not isinstance(logprobs.get("content"), list):
        return None
    out: list[TeacherToken] = []
    for entry in logprobs["content"]:
        if not isinstance(entry, dict) or not isinstance(entry.get("token"), str):
            return None
        top = entry.get("top_logprobs") or [{"token": entry["token"], "logprob": entry.get("logprob")}]
        alternatives = tuple(
            (t["token"], float(t["logprob"]))
            for t in top
            if isinstance(t, dict)
            and isinstance(t.get("token"), str)
            and isinstance(t.get("logprob"), int | float)
            and not isinstance(t.get("logprob"), bool)
            and math.isfinite(float(t["logprob"]))
        )
        out.append(TeacherToken(entry["token"], alternatives))
    return out or None


@dataclass
class AlignStats:
    """How much of a dataset's answers carried soft labels after alignment."""

    answer_tokens: int = 0
    """Student answer tokens (that carry a hard label) in examples with soft labels."""
    aligned_tokens: int = 0
    """Those that got soft labels (a teacher token with exactly their span)."""
    alternatives: int = 0
    mapped_alternatives: int = 0
    """Teacher alternatives that are exactly one student token."""
    examples_with_soft_labels: int = 0

    @property
    def coverage(self) -> float:
        return self.aligned_tokens / self.answer_tokens if self.answer_tokens else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "examples_with_soft_labels": self.examples_with_soft_labels,
            "answer_tokens": self.answer_tokens,
            "aligned_tokens": self.aligned_tokens,
            "token_coverage": round(self.coverage, 4),
            "alternatives_mapped": round(self.mapped_alternatives / self.alternatives, 4)
            if self.alternatives
            else 0.0,
        }


@dataclass
class SoftTargets:
    """Per token position of one tokenized example: the mapped alternatives' ids and teacher
    probabilities (empty where the position has no soft labels)."""

    ids: dict[int, list[int]] = field(default_factory=dict)
    probs: dict[int, list[float]] = field(default_factory=dict)


def token_mapper(tokenizer: Any) -> Callable[[str], int | None]:
    """Text → the student token id it is exactly, or None (memoised per tokenizer)."""
    cache: dict[str, int | None] = {}

    def id_of(text: str) -> int | None:
        if text not in cache:
            ids = tokenizer.encode(text, add_special_tokens=False) if text else []
            cache[text] = ids[0] if len(ids) == 1 else None
        return cache[text]

    return id_of


def align(
    offsets: Sequence[tuple[int, int]],
    labelled: Sequence[bool],
    content_start: int,
    tokens: Sequence[TeacherToken],
    id_of: Callable[[str], int | None],
    stats: AlignStats | None = None,
) -> SoftTargets:
    """Soft targets for the student positions whose span one teacher token covers exactly.

    ``offsets``: each student token's character span in the rendered text; ``labelled``: whether
    the token carries a hard label (the answer); ``content_start``: where the answer's text
    begins in the rendered text (teacher token spans are counted from there)."""
    spans: dict[tuple[int, int], TeacherToken] = {}
    at = content_start
    for tok in tokens:
        spans[(at, at + len(tok.token))] = tok
        at += len(tok.token)
    out = SoftTargets()
    stats = stats if stats is not None else AlignStats()
    for pos, ((start, end), has_label) in enumerate(zip(offsets, labelled, strict=True)):
        if not has_label:
            continue
        stats.answer_tokens += 1
        found = spans.get((start, end))
        if found is None or not found.alternatives:
            continue
        merged: dict[int, float] = {}
        for text, logprob in found.alternatives:
            stats.alternatives += 1
            sid = id_of(text)
            if sid is None:
                continue
            stats.mapped_alternatives += 1
            merged[sid] = merged.get(sid, 0.0) + math.exp(logprob)
        if not merged:
            continue
        total = sum(merged.values())
        if total > 1.0:  # rounding in the teacher's logprobs: never more than all the mass
            merged = {k: v / total for k, v in merged.items()}
        out.ids[pos] = list(merged)
        out.probs[pos] = list(merged.values())
        stats.aligned_tokens += 1
    return out


def kd_loss_terms(
    logits: torch.Tensor, soft_ids: torch.Tensor, soft_probs: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: KL(teacher || student) over the k mapped ids plus the tail, and whether the row
    has soft labels. ``soft_ids`` [N, K] (-1 where none), ``soft_probs`` [N, K]."""
    import torch

    logp = torch.log_softmax(logits.float(), dim=-1)
    mask = soft_ids >= 0
    lp_s = logp.gather(1, soft_ids.clamp(min=0))
    p_t = soft_probs.float() * mask
    tail_t = (1.0 - p_t.sum(dim=1)).clamp(min=0.0)
    q_mapped = (lp_s.exp() * mask).sum(dim=1)
    tail_s = (1.0 - q_mapped).clamp(min=1e-12)
    present = mask & (p_t > 0)
    mapped_kl = torch.where(present, p_t * (torch.log(p_t.clamp(min=1e-12)) - lp_s), torch.zeros_like(p_t))
    tail_kl = torch.where(
        tail_t > 1e-9,
        tail_t * (torch.log(tail_t.clamp(min=1e-12)) - torch.log(tail_s)),
        torch.zeros_like(tail_t),
    )
    return mapped_kl.sum(dim=1) + tail_kl, mask.any(dim=1)


def kd_chunk_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    soft_ids: torch.Tensor,
    soft_probs: torch.Tensor,
    weight: float,
) -> torch.Tensor:
    """Summed loss of a chunk of labelled positions: CE, mixed with the KL term where there are
    soft labels."""
    import torch
    import torch.nn.functional as F

    ce = F.cross_entropy(logits.float(), targets, reduction="none")
    kl, has_soft = kd_loss_terms(logits, soft_ids, soft_probs)
    return torch.where(has_soft, (1.0 - weight) * ce + weight * kl, ce).sum()


def soft_tensors(
    rows: Sequence[SoftTargets], positions: Sequence[Sequence[int]], k: int
) -> tuple[list[list[int]], list[list[float]]]:
    """Rows of ids and probabilities, padded to ``k``, for the given positions of each example
    (in order), -1 / 0.0 where a position has none."""
    ids: list[list[int]] = []
    probs: list[list[float]] = []
    for row, poss in zip(rows, positions, strict=True):
        for pos in poss:
            got_ids = row.ids.get(pos, [])[:k]
            got_p = row.probs.get(pos, [])[:k]
            ids.append(got_ids + [-1] * (k - len(got_ids)))
            probs.append(got_p + [0.0] * (k - len(got_p)))
    return ids, probs
