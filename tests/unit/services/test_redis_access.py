"""The Redis URL and its password, read before any connection (services/queue/access.py):
the password masked wherever a URL is shown, REDIS_PASSWORD_FILE read and checked, URLs
that cannot work refused with what to change. Real servers (a password, TLS) are in
tests/integration/test_redis_access.py."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import redis

from services.queue.access import (
    PASSWORD_FILE_ENV,
    RedisAccessError,
    masked,
    refusal,
    resolve,
    spoken_protocol,
)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:s3cret@redis:6379/0", "redis://:***@redis:6379/0"),
        ("redis://bob:s3cret@redis:6379/0", "redis://bob:***@redis:6379/0"),
        (
            "rediss://:p%40ss@10.0.0.5:6380/1?ssl_ca_certs=/ca.crt",
            "rediss://:***@10.0.0.5:6380/1?ssl_ca_certs=/ca.crt",
        ),
        ("redis://redis:6379/0", "redis://redis:6379/0"),
        ("unix:///tmp/redis.sock", "unix:///tmp/redis.sock"),
    ],
)
def test_masked_hides_only_the_password(url: str, shown: str) -> None:
    assert masked(url) == shown


def test_password_comes_from_the_url_or_the_file(tmp_path: Path) -> None:
    plain = resolve("redis://redis:6379/0", {})
    assert (plain.options, plain.password_from) == ({}, None)
    in_url = resolve("redis://:s3cret@redis:6379/0", {})
    assert in_url.options == {} and in_url.password_from == "the password in the Redis URL"
    secret = tmp_path / "redis_password"
    secret.write_text("s3cret\n")  # `echo` and editors end the file with a newline
    from_file = resolve("redis://redis:6379/0", {PASSWORD_FILE_ENV: str(secret)})
    assert from_file.options == {"password": "s3cret"}
    assert str(secret) in (from_file.password_from or "")


def test_a_password_file_that_cannot_serve_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(RedisAccessError, match=f"{PASSWORD_FILE_ENV}={missing}: No such file"):
        resolve("redis://redis:6379/0", {PASSWORD_FILE_ENV: str(missing)})
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(RedisAccessError, match="is empty: put the password in it"):
        resolve("redis://redis:6379/0", {PASSWORD_FILE_ENV: str(empty)})
    both = tmp_path / "both"
    both.write_text("other")
    with pytest.raises(RedisAccessError, match="keep one") as refused:
        resolve("redis://:s3cret@redis:6379/0", {PASSWORD_FILE_ENV: str(both)})
    assert "s3cret" not in str(refused.value)


def test_urls_that_cannot_work_are_refused_before_connecting(tmp_path: Path) -> None:
    with pytest.raises(RedisAccessError, match="is not a Redis URL") as refused:
        resolve("http://:s3cret@redis:6379/0", {})
    assert "s3cret" not in str(refused.value) and "***" in str(refused.value)
    with pytest.raises(RedisAccessError, match="unknown settings ssl_ca_cert;"):
        resolve("rediss://redis:6380/0?ssl_ca_cert=/ca.crt", {})  # a typo of ssl_ca_certs
    with pytest.raises(RedisAccessError, match="are TLS settings: use rediss://"):
        resolve(f"redis://redis:6379/0?ssl_ca_certs={tmp_path}", {})
    with pytest.raises(RedisAccessError, match=r"ssl_ca_certs=/nowhere/ca\.crt .*no such file"):
        resolve("rediss://redis:6380/0?ssl_ca_certs=/nowhere/ca.crt", {})
    ca = tmp_path / "ca.crt"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    tls = resolve(f"rediss://redis:6380/0?ssl_ca_certs={ca}&socket_timeout=5", {})
    assert tls.url.startswith("rediss://")


def test_a_server_that_hangs_is_an_outage_not_a_wrong_setting() -> None:
    # Accepts connections (the kernel does, from the backlog) and never answers, as a
    # Redis that is stopped: waited out by the queue, not mistaken for a TLS-only Redis.
    with socket.create_server(("127.0.0.1", 0)) as hung:
        port = hung.getsockname()[1]
        assert spoken_protocol("127.0.0.1", port) == "unreachable"
        error = redis.TimeoutError("Timeout reading from socket")
        assert refusal(error, resolve(f"redis://127.0.0.1:{port}/0", {})) is None
