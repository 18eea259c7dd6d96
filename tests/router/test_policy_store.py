"""The live policy: hot reload of valid edits, refusal of invalid ones with the old policy kept."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from router.policy import PolicyError, parse_policy
from router.policy_store import PolicyStore

GOOD = """\
teacher: {base_url: http://teacher/v1, model: big}
defaults:
  shadow: {rate: 0.2}
tasks:
  classify: {promote: {scorer: exact}}
"""
CHANGED = GOOD.replace("rate: 0.2", "rate: 0.5")
BAD_KEY = GOOD.replace("scorer: exact", "scorer: exact, threshhold: 0.9")
BAD_VALUE = GOOD.replace("rate: 0.2", "rate: 1.5")


def write(path: Path, text: str) -> None:
    """Write and move the mtime forward, as a later edit on a coarse-clock filesystem would."""
    path.write_text(text)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


async def wait_for(predicate: object, timeout_s: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():  # type: ignore[operator]
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


@pytest.fixture
def policy_file(tmp_path: Path) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(GOOD)
    return path


async def test_a_valid_edit_is_applied_by_the_watcher(policy_file: Path) -> None:
    store = PolicyStore(policy_file, poll_interval_s=0.05)
    applied: list[float] = []
    store.on_reload(lambda p: applied.append(p.for_task("classify").shadow.rate))
    assert store.version == 1 and store.policy.for_task("x").shadow.rate == 0.2
    await store.start()
    try:
        write(policy_file, CHANGED)
        await wait_for(lambda: store.version == 2)
    finally:
        await store.stop()
    assert store.policy.for_task("classify").shadow.rate == 0.5
    assert applied == [0.5] and store.last_error is None


@pytest.mark.parametrize(
    ("text", "bad_key"), [(BAD_KEY, "tasks.classify.promote.threshhold"), (BAD_VALUE, "defaults.shadow.rate")]
)
async def test_an_invalid_edit_is_refused_naming_the_key_and_the_old_policy_is_kept(
    policy_file: Path, text: str, bad_key: str
) -> None:
    store = PolicyStore(policy_file, poll_interval_s=0.05)
    old = store.policy
    await store.start()
    try:
        write(policy_file, text)
        await wait_for(lambda: store.last_error is not None)
    finally:
        await store.stop()
    assert store.policy is old and store.version == 1
    assert bad_key in store.last_error  # type: ignore[operator]
    assert store.last_error_at is not None


def test_a_fixed_file_after_a_refused_one_clears_the_error(policy_file: Path) -> None:
    store = PolicyStore(policy_file)
    write(policy_file, "teacher: [not, a, mapping")
    assert store.reload() is False
    assert "not valid YAML" in (store.last_error or "")
    write(policy_file, CHANGED)
    assert store.reload() is True
    assert store.last_error is None and store.version == 2


def test_a_deleted_file_keeps_the_policy(policy_file: Path) -> None:
    store = PolicyStore(policy_file)
    policy_file.unlink()
    assert store.reload() is False
    assert "cannot read" in (store.last_error or "")
    assert store.policy.teacher.base_url == "http://teacher/v1"


def test_an_untouched_or_only_touched_file_is_not_reloaded(policy_file: Path) -> None:
    store = PolicyStore(policy_file)
    assert store.reload() is False
    write(policy_file, GOOD)  # same content, new mtime
    assert store.reload() is False and store.version == 1
    assert store.reload(force=True) is True and store.version == 2


def test_an_atomic_rename_is_seen(policy_file: Path) -> None:
    store = PolicyStore(policy_file)
    tmp = policy_file.with_suffix(".tmp")
    tmp.write_text(CHANGED)
    os.replace(tmp, policy_file)
    assert store.reload() is True
    assert store.policy.for_task("x").shadow.rate == 0.5


def test_an_invalid_file_at_start_raises(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(BAD_KEY)
    with pytest.raises(PolicyError, match="threshhold: unknown key"):
        PolicyStore(path)
    with pytest.raises(PolicyError, match="cannot read"):
        PolicyStore(tmp_path / "missing.yaml")


def test_a_failing_callback_does_not_stop_the_swap(policy_file: Path) -> None:
    store = PolicyStore(policy_file)
    seen: list[int] = []

    def broken(_: object) -> None:
        raise RuntimeError("boom")

    store.on_reload(broken)
    store.on_reload(lambda _: seen.append(store.version))
    write(policy_file, CHANGED)
    assert store.reload() is True
    assert seen == [2]


async def test_readers_never_see_a_missing_policy_while_it_is_swapped(policy_file: Path) -> None:
    store = PolicyStore(policy_file, poll_interval_s=0.01)
    await store.start()
    rates: set[float] = set()
    stop = asyncio.Event()

    async def reader() -> None:
        while not stop.is_set():
            rates.add(store.policy.for_task("classify").shadow.rate)
            await asyncio.sleep(0)

    task = asyncio.create_task(reader())
    try:
        for i, text in enumerate([CHANGED, BAD_KEY, GOOD, CHANGED]):
            write(policy_file, text + f"# edit {i}\n")
            await asyncio.sleep(0.05)
    finally:
        stop.set()
        await task
        await store.stop()
    assert rates == {0.2, 0.5}
    assert store.policy.for_task("classify").shadow.rate == 0.5


def test_a_store_without_a_file_holds_the_given_policy() -> None:
    policy = parse_policy({"teacher": {"base_url": "http://t/v1"}})
    store = PolicyStore(policy=policy)
    assert store.policy is policy and store.reload() is False
    store.set(parse_policy({"teacher": {"base_url": "http://u/v1"}}))
    assert store.version == 2 and store.policy.teacher.base_url == "http://u/v1"
    with pytest.raises(ValueError):
        PolicyStore()
