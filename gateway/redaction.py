"""PII redaction of what the gateway stores: records (the database and the spool), the shared
cache tier and shadow pairs. Clients still get every answer as the upstream sent it.

The libraries, and why: candidates are found with RE2 (``google-re2``: linear-time matching, so a
hostile prompt cannot make a pattern backtrack for seconds, which matters for operators' own
patterns) and confirmed by maintained validators, so a 16-digit order number is not a card and a
date is not a phone number: ``python-stdnum`` (Luhn for card numbers, the IBAN checksum),
``phonenumbers`` (Google's libphonenumber metadata), ``ipaddress``. Hand-written rules alone
would redact far more than PII.

Cost, and where it is paid: never on the request path. Records are redacted in the recorder's
writer thread (``Recorder(redact=...)``), cache entries in the thread that writes the shared
tier, pairs in the shadow writer. A string is first checked with one combined RE2 search; only
strings with a candidate go through the detectors.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import phonenumbers
import re2
from stdnum import iban, luhn

from gateway.metrics import Metrics
from router.policy import Policy, RedactPolicy

MASK = "[REDACTED:{}]"

_BUILTIN: dict[str, str] = {
    "api_key": (
        r"(?:\b(?:sk|pk|rk)-(?:proj-|ant-|live-|test-)?[A-Za-z0-9_\-]{16,}"
        r"|\bdg-[A-Za-z0-9_\-]{40,}"
        r"|\bgh[pousr]_[A-Za-z0-9]{30,}"
        r"|\bAKIA[0-9A-Z]{16}\b"
        r"|\bxox[abprs]-[A-Za-z0-9\-]{10,}"
        r"|\bAIza[0-9A-Za-z_\-]{35}"
        r"|(?i:bearer)\s+[A-Za-z0-9._~+/\-]{20,}=*)"
    ),
    "email": r"[A-Za-z0-9._%+\-]+@[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)*\.[A-Za-z]{2,}",
    "iban": r"\b[A-Z]{2}[0-9]{2}(?:[ ]?[A-Z0-9]){11,30}\b",
    "card": r"\b[0-9](?:[ \-]?[0-9]){12,18}\b",
    "ip": (
        r"\b(?:(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\.){3}(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\b"
        r"|(?:[0-9A-Fa-f]{1,4}:){2,7}(?::?[0-9A-Fa-f]{1,4})+|(?:[0-9A-Fa-f]{1,4}:){1,7}:"
    ),
    "phone": r"(?:\+|\b)[0-9](?:[ .\-()]{0,2}[0-9]){6,14}\b",
}
ORDER = ("api_key", "email", "iban", "card", "ip", "phone")
"""Detectors run in this order: an IBAN's or a card's digits are gone before phones are looked for."""


def _card(text: str, _: RedactPolicy) -> bool:
    digits = "".join(c for c in text if c.isdigit())
    return 13 <= len(digits) <= 19 and luhn.is_valid(digits)


def _iban(text: str, _: RedactPolicy) -> bool:
    return bool(iban.is_valid(text))


def _ip(text: str, _: RedactPolicy) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _phone(text: str, policy: RedactPolicy) -> bool:
    region = None if text.startswith("+") else policy.phone_region
    if region is None and not text.startswith("+"):
        return False
    try:
        number = phonenumbers.parse(text, region)
    except phonenumbers.NumberParseException:
        return False
    return bool(phonenumbers.is_valid_number(number))


def _remembered(check: Callable[[str, RedactPolicy], bool]) -> Callable[[str, RedactPolicy], bool]:
    """A validator's verdicts kept (bounded): prompts repeat (system prompts, templates), and
    ``phonenumbers`` costs hundreds of microseconds a number in the thread that shares the GIL
    with the event loop."""
    cache: dict[tuple[str, str | None], bool] = {}

    def confirm(text: str, policy: RedactPolicy) -> bool:
        key = (text, policy.phone_region)
        found = cache.get(key)
        if found is None:
            if len(cache) > 4096:
                cache.clear()
            found = cache[key] = check(text, policy)
        return found

    return confirm


_CONFIRM: dict[str, Callable[[str, RedactPolicy], bool]] = {
    "card": _remembered(_card),
    "iban": _remembered(_iban),
    "ip": _remembered(_ip),
    "phone": _remembered(_phone),
}


@dataclass(frozen=True, slots=True)
class _Rules:
    """One task's redaction, compiled once per policy version."""

    policy: RedactPolicy
    any: Any
    """All detectors as one RE2 alternation: the quick check most strings stop at."""
    each: tuple[tuple[str, Any, Callable[[str, RedactPolicy], bool] | None], ...]

    @classmethod
    def build(cls, policy: RedactPolicy) -> _Rules:
        each: list[tuple[str, Any, Callable[[str, RedactPolicy], bool] | None]] = []
        for name in ORDER:
            if name in policy.detectors:
                each.append((name, re2.compile(_BUILTIN[name]), _CONFIRM.get(name)))
        for name, pattern in policy.patterns.items():
            each.append((name, re2.compile(pattern), None))
        combined = "|".join(f"(?:{pattern.pattern})" for _, pattern, _ in each) or "$^"
        return cls(policy, re2.compile(combined), tuple(each))

    def text(self, text: str, counts: dict[str, int]) -> str:
        for name, pattern, confirm in self.each:

            def replace(match: Any, name: str = name, confirm: Any = confirm) -> str:
                found = match.group(0)
                if confirm is not None and not confirm(found, self.policy):
                    return str(found)
                counts[name] = counts.get(name, 0) + 1
                return MASK.format(name)

            text = pattern.sub(replace, text)
        return text

    def value(self, value: Any, counts: dict[str, int]) -> Any:
        """Every string in a JSON value, redacted (keys are the protocol's, left as they are)."""
        if isinstance(value, str):
            return self.text(value, counts) if self.any.search(value) else value
        if isinstance(value, dict):
            return {k: self.value(v, counts) for k, v in value.items()}
        if isinstance(value, list):
            return [self.value(v, counts) for v in value]
        return value


ROW_FIELDS = ("request", "response", "shadow", "error")


def _strings(value: Any, out: list[str]) -> None:
    if isinstance(value, str):
        out.append(value)
    elif isinstance(value, dict):
        for item in value.values():
            _strings(item, out)
    elif isinstance(value, list):
        for item in value:
            _strings(item, out)


class Redactor:
    """The policy's ``redact`` section applied to what is stored, with counts in the metrics."""

    def __init__(self, policy: Callable[[], Policy | None], metrics: Metrics | None = None) -> None:
        self.policy = policy
        self.metrics = metrics
        self._rules: dict[int, tuple[RedactPolicy, _Rules]] = {}

    def rules(self, task: str) -> _Rules | None:
        policy = self.policy()
        if policy is None:
            return None
        section = policy.for_task(task).redact
        if not section.enabled:
            return None
        cached = self._rules.get(id(section))
        if cached is None or cached[0] is not section:
            if len(self._rules) > 1000:
                self._rules.clear()
            cached = self._rules[id(section)] = (section, _Rules.build(section))
        return cached[1]

    def _count(self, task: str, counts: dict[str, int]) -> None:
        if self.metrics is not None:
            metrics = self.metrics
            for kind, n in counts.items():
                metrics.child(metrics.redactions, task, kind).inc(n)

    def row(self, row: dict[str, Any]) -> dict[str, Any]:
        """The recorder's hook: a record row with its content redacted and ``redacted`` set (on
        every row, so a batch's rows share their keys: an executemany needs that)."""
        rules = self.rules(str(row.get("task", "")))
        row.setdefault("redacted", None)
        if rules is None:
            return row
        # One RE2 search over all of the row's strings: most rows have nothing to redact, and one
        # search costs a fraction of one per string.
        strings: list[str] = []
        for name in ROW_FIELDS:
            _strings(row.get(name), strings)
        if not strings or not rules.any.search("\n".join(strings)):
            return row
        counts: dict[str, int] = {}
        for name in ROW_FIELDS:
            if row.get(name) is not None:
                row[name] = rules.value(row[name], counts)
        if counts:
            row["redacted"] = True
            self._count(row["task"], counts)
        # That was the slow case (validators, substitutions): let the event loop, if it waits for
        # the GIL, run before the next row.
        time.sleep(0)
        return row

    def value(self, task: str, value: Any) -> Any:
        """Any JSON value of ``task`` (a shadow pair's answer), redacted."""
        rules = self.rules(task)
        if rules is None or value is None:
            return value
        counts: dict[str, int] = {}
        value = rules.value(value, counts)
        self._count(task, counts)
        return value

    def finds(self, task: str, body: bytes) -> bool:
        """Whether ``body`` holds something ``task``'s redaction would remove (the shared cache
        tier keeps no such answer: a hit elsewhere must not serve a redacted one)."""
        rules = self.rules(task)
        if rules is None:
            return False
        text = body.decode("utf-8", "replace")
        if not rules.any.search(text):
            return False
        counts: dict[str, int] = {}
        rules.text(text, counts)
        if counts:
            self._count(task, counts)
        return bool(counts)
