"""The console's session cookies and CSRF tokens: forged, tampered, expired or foreign ones fail."""

from __future__ import annotations

from gateway.console.session import Sessions

KEY = "dg-admin-SECRET-0123"


def test_a_session_reads_back_until_it_expires() -> None:
    sessions = Sessions(KEY, ttl_s=60)
    value = sessions.issue("admin", now=1000.0)
    assert KEY not in value
    session = sessions.read(value, now=1059.0)
    assert session is not None and session.subject == "admin"
    assert sessions.read(value, now=1061.0) is None


def test_a_tampered_or_foreign_cookie_is_refused() -> None:
    sessions = Sessions(KEY)
    value = sessions.issue("key-3")
    who, expires, nonce, signature = value.split(".")
    assert sessions.read(f"admin.{expires}.{nonce}.{signature}") is None
    assert sessions.read(f"{who}.99999999999.{nonce}.{signature}") is None
    assert sessions.read(value + "x") is None and sessions.read("") is None and sessions.read("a.b") is None
    assert Sessions("another-admin-key").read(value) is None
    assert Sessions(KEY).read(value) is not None  # every worker derives the same secret


def test_a_csrf_token_belongs_to_one_session() -> None:
    sessions = Sessions(KEY)
    one, two = (sessions.read(sessions.issue("admin")) for _ in range(2))
    assert one is not None and two is not None
    assert sessions.csrf_ok(one, sessions.csrf(one))
    assert not sessions.csrf_ok(one, sessions.csrf(two))
    assert not sessions.csrf_ok(one, None) and not sessions.csrf_ok(one, "")


def test_without_an_admin_key_each_process_signs_with_its_own_secret() -> None:
    value = Sessions(None).issue("key-1")
    assert Sessions(None).read(value) is None
