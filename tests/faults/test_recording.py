"""Nothing a client or a fault does stops the recording (issue 14, items 1-4): poison records,
a full or read-only spool, a stalled database. Each test adds its row to the faults report."""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import orjson
import pytest
from sqlalchemy import text

from gateway.recorder import Exchange
from gateway.serialise import CUT_MARKER, DEPTH_MARKER
from tests.faults.conftest import FaultTable, Gateway, ReadOnlySpool, RelayedPostgres
from tests.servers import wait_until

pytestmark = pytest.mark.postgres


def chat(gw: Gateway, content: str = "hi", *, model: str = "m", raw: bytes | None = None) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": content}]}
    return httpx.post(
        gw.url + "/v1/chat/completions",
        content=raw or orjson.dumps(body),
        headers={"Authorization": f"Bearer {gw.key}", "Content-Type": "application/json"},
        timeout=30,
    )


def send(gw: Gateway, n: int, tag: str, *, workers: int = 4) -> list[httpx.Response]:
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda i: chat(gw, f"{tag}-{i}"), range(n)))


def outcome(responses: list[httpx.Response]) -> str:
    statuses: dict[int, int] = {}
    for r in responses:
        statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
    return ", ".join(f"{n} x {status}" for status, n in sorted(statuses.items()))


def spool_lines(spool: Path) -> int:
    return sum(len(p.read_bytes().splitlines()) for p in spool.glob("records-*"))


def nested(depth: int) -> bytes:
    """A request with an extra field ``x`` nested ``depth`` levels (more than orjson can write)."""
    x = b"[" * depth + b'"leaf"' + b"]" * depth
    return b'{"model": "m", "messages": [{"role": "user", "content": "deep"}], "x": ' + x + b"}"


def assert_still_ready(gw: Gateway) -> None:
    wait_until(lambda: gw.ready().status_code == 200, 30)
    assert gw.recorder.restarts == 0


def test_a_deeply_nested_request_is_recorded_and_recording_goes_on(
    relayed_postgres: RelayedPostgres,
    gateway_on: Callable[..., Gateway],
    tmp_path: Path,
    fault_table: FaultTable,
) -> None:
    """Over HTTP the edge refuses it (400 ``nesting_too_deep``, before the teacher is called);
    handed to the recorder as the request path would, it is stored cut at 128 levels."""
    gw = gateway_on(relayed_postgres.url, tmp_path / "spool")
    deep = chat(gw, raw=nested(1000))
    assert deep.status_code == 400 and deep.json()["error"]["code"] == "nesting_too_deep"
    gw.recorder.submit(
        Exchange(
            id="deep-at-the-recorder",
            task="deep",
            model="m",
            target="teacher",
            request=orjson.loads(nested(1000)),
            status=200,
            latency_s=0.01,
            body=b'{"choices": []}',
        )
    )
    after = send(gw, 20, "after")
    assert all(r.status_code == 200 for r in after)
    assert gw.recorder.flush(30)
    found = relayed_postgres.records()
    with gw.parts.db.engine.connect() as conn:
        stored = conn.execute(
            text("SELECT request FROM record WHERE id = :id"), {"id": "deep-at-the-recorder"}
        ).scalar_one()
    assert DEPTH_MARKER in orjson.dumps(stored).decode()
    fault_table.row(
        "1. request nested 1,000 levels, then 20 more",
        f"400 nesting_too_deep, then {outcome(after)}",
        21,
        found,
        "the same body at the recorder: cut at 128 levels with a marker",
    )
    assert found == 21
    assert_still_ready(gw)


def test_poison_values_are_stored_cleaned_with_their_batch(
    relayed_postgres: RelayedPostgres,
    gateway_on: Callable[..., Gateway],
    tmp_path: Path,
    fault_table: FaultTable,
) -> None:
    gw = gateway_on(relayed_postgres.url, tmp_path / "spool", flush_interval_s=0.3)  # one batch for all
    poisons = [
        lambda: chat(gw, "a\u0000b"),
        lambda: chat(gw, "nul model", model="m\u0000x"),
        lambda: chat(gw, "long model", model="m" * 300),
    ]
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(p) for p in poisons] + [
            pool.submit(chat, gw, f"innocent-{i}") for i in range(20)
        ]
        responses = [f.result() for f in futures]
    assert all(r.status_code == 200 for r in responses)
    assert gw.recorder.flush(30)
    found = relayed_postgres.records()
    with gw.parts.db.engine.connect() as conn:
        models = {row[0] for row in conn.execute(text("SELECT model FROM record"))}
    assert {"m\ufffdx", "m" * (200 - len(CUT_MARKER)) + CUT_MARKER, "m"} == models
    fault_table.row(
        "2. NUL in content and model, 300-char model, batched with 20 innocents",
        outcome(responses),
        23,
        found,
        "NUL → U+FFFD, model cut to 200 with a marker",
    )
    assert found == 23 and not list((tmp_path / "spool").glob("records-*"))
    assert_still_ready(gw)


def test_a_nul_task_from_the_request_path_is_recorded(
    relayed_postgres: RelayedPostgres,
    gateway_on: Callable[..., Gateway],
    tmp_path: Path,
    fault_table: FaultTable,
) -> None:
    """A NUL in ``metadata.task`` cannot reach the recorder over HTTP any more (the edge refuses it,
    item 7); handed to the recorder as the request path would, it is stored cleaned."""
    gw = gateway_on(relayed_postgres.url, tmp_path / "spool")
    exchanges = [
        Exchange(
            id=f"nul-task-{i}",
            task="t\u0000sk" if i == 0 else "plain",
            model="m",
            target="teacher",
            request={"messages": [{"role": "user", "content": "x"}]},
            status=200,
            latency_s=0.01,
            body=b'{"choices": []}',
        )
        for i in range(5)
    ]
    for exchange in exchanges:
        gw.recorder.submit(exchange)
    assert gw.recorder.flush(30)
    found = relayed_postgres.records()
    fault_table.row("2. NUL in metadata.task (at the recorder)", "—", 5, found, "task t\\ufffdsk")
    assert found == 5
    assert_still_ready(gw)


def test_a_row_the_database_refuses_is_quarantined_alone_live_and_on_replay(
    relayed_postgres: RelayedPostgres,
    gateway_on: Callable[..., Gateway],
    tmp_path: Path,
    fault_table: FaultTable,
) -> None:
    """A constraint the rows do not meet stands for any refusal storable rows can still meet."""
    spool = tmp_path / "spool"
    gw = gateway_on(relayed_postgres.url, spool, flush_interval_s=0.3)
    with gw.parts.db.engine.begin() as conn:
        conn.execute(text("ALTER TABLE record ADD CONSTRAINT no_poison CHECK (model <> 'poison')"))
    with ThreadPoolExecutor(8) as pool:
        live = list(pool.map(lambda i: chat(gw, f"live-{i}", model="poison" if i == 3 else "m"), range(12)))
    assert gw.recorder.flush(30)
    relayed_postgres.cut()
    spooled = send(gw, 12, "spooled")
    spooled.append(chat(gw, "spooled-poison", model="poison"))
    assert gw.recorder.flush(30)
    wait_until(lambda: spool_lines(spool) == 13, 20)
    relayed_postgres.restore()
    wait_until(lambda: relayed_postgres.records() == 11 + 12 and not list(spool.glob("records-*")), 30)
    quarantined = list((spool / "quarantine").glob("*.json"))
    assert len(quarantined) == 2 and gw.recorder.quarantined == 2
    assert {orjson.loads(p.read_bytes())["row"]["model"] for p in quarantined} == {"poison"}
    fault_table.row(
        "2. a row the database refuses (CHECK), live and in a spool replay",
        outcome(live + spooled),
        25,
        relayed_postgres.records() + len(quarantined),
        "23 written, 2 quarantined alone, spool emptied",
    )
    assert_still_ready(gw)


def test_a_full_spool_with_the_database_down_keeps_records_in_memory_until_it_is_back(
    relayed_postgres: RelayedPostgres,
    gateway_on: Callable[..., Gateway],
    full_spool: Path,
    fault_table: FaultTable,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "distillgate.recorder")
    gw = gateway_on(relayed_postgres.url, full_spool)
    relayed_postgres.cut()
    responses = [r for tag in ("a", "b", "c", "d") for r in send(gw, 60, tag)]
    wait_until(lambda: not gw.recorder.spool_writable, 20)
    assert gw.recorder.spooled > 0  # it took what fitted
    not_ready = gw.ready()
    assert not_ready.status_code == 503 and not_ready.json()["checks"]["spool"] is False
    assert gw.recorder.depth > 0 and gw.recorder.dropped == 0
    relayed_postgres.restore()
    wait_until(lambda: relayed_postgres.records() == len(responses), 40)
    unwritable = [r for r in caplog.records if "unwritable" in r.getMessage()]
    assert len(unwritable) == 1 and unwritable[0].levelname == "ERROR"
    fault_table.row(
        "3. spool on a full 64 KiB tmpfs, database down",
        outcome(responses),
        len(responses),
        relayed_postgres.records(),
        f"{gw.recorder.spooled} spooled, the rest held in memory; 1 ERROR line; /readyz 503 while full",
    )
    assert all(r.status_code == 200 for r in responses)
    assert_still_ready(gw)


def test_a_read_only_spool_with_the_database_down_loses_nothing(
    relayed_postgres: RelayedPostgres,
    gateway_on: Callable[..., Gateway],
    read_only_spool: ReadOnlySpool,
    fault_table: FaultTable,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "distillgate.recorder")
    gw = gateway_on(relayed_postgres.url, read_only_spool.path)
    relayed_postgres.cut()
    responses = send(gw, 100, "ro")
    wait_until(lambda: not gw.recorder.spool_writable, 20)
    assert gw.ready().status_code == 503
    relayed_postgres.restore()
    wait_until(lambda: relayed_postgres.records() == len(responses), 40)
    assert gw.ready().status_code == 503  # the spool is still read-only: not ready
    read_only_spool.make_writable()
    unwritable = [r for r in caplog.records if "unwritable" in r.getMessage()]
    assert len(unwritable) == 1 and "EROFS" in unwritable[0].getMessage()
    assert not [r for r in caplog.records if r.exc_info]  # no traceback per record
    fault_table.row(
        "3. read-only spool (EROFS), database down",
        outcome(responses),
        len(responses),
        relayed_postgres.records(),
        "held in memory; 1 ERROR line; /readyz 503 until the spool is writable",
    )
    assert all(r.status_code == 200 for r in responses)
    assert_still_ready(gw)


def test_database_and_spool_both_away_past_the_queue_drops_and_counts(
    relayed_postgres: RelayedPostgres,
    gateway_on: Callable[..., Gateway],
    read_only_spool: ReadOnlySpool,
    fault_table: FaultTable,
) -> None:
    """The stated policy: past ``queue_size`` with nowhere to put records, new ones are dropped and counted."""
    gw = gateway_on(relayed_postgres.url, read_only_spool.path, queue_size=40)
    relayed_postgres.cut()
    responses = send(gw, 100, "over")
    dropped = gw.recorder.dropped
    assert dropped > 0
    relayed_postgres.restore()
    wait_until(lambda: relayed_postgres.records() == len(responses) - dropped, 40)
    metrics = httpx.get(gw.url + "/metrics").text
    assert f'distillgate_recorder_dropped_total{{reason="queue_full"}} {float(dropped)}' in metrics
    read_only_spool.make_writable()
    fault_table.row(
        "3. database and spool away, queue_size 40, 100 requests",
        outcome(responses),
        len(responses) - dropped,
        relayed_postgres.records(),
        f"{dropped} dropped past queue_size, counted (reason=queue_full): the stated policy",
    )
    assert_still_ready(gw)


def test_a_stalled_database_sends_records_to_the_spool_and_they_come_back_without_a_restart(
    relayed_postgres: RelayedPostgres,
    gateway_on: Callable[..., Gateway],
    tmp_path: Path,
    fault_table: FaultTable,
) -> None:
    spool = tmp_path / "spool"
    gw = gateway_on(relayed_postgres.url, spool, queue_size=50, stall_s=0.5)
    first = send(gw, 10, "before")
    assert gw.recorder.flush(30)
    relayed_postgres.proxy.stall()
    stalled = [r for tag in ("s1", "s2", "s3") for r in send(gw, 100, tag)]
    wait_until(lambda: spool_lines(spool) > 0, 20)
    assert gw.recorder.dropped == 0
    relayed_postgres.proxy.resume()
    wait_until(lambda: relayed_postgres.records() == len(first) + len(stalled), 40)
    wait_until(lambda: not list(spool.glob("records-*")), 20)
    fault_table.row(
        "4. database stalled (connection open, nothing answered), queue_size 50, 300 requests",
        outcome(first + stalled),
        len(first) + len(stalled),
        relayed_postgres.records(),
        f"write cut after stall_s 0.5 s; {gw.recorder.spooled} spooled and replayed, no restart",
    )
    assert_still_ready(gw)
