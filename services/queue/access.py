"""What a client needs to be let into the run's Redis, and what to fix when it is not.

A Redis shared by several machines has a password and often TLS. Both are said in the
URL every process gets (`--redis-url` / `REDIS_URL`), the one place redis-py reads them:

    redis://:PASSWORD@host:6379/0                     the password (Redis `requirepass`)
    redis://USER:PASSWORD@host:6379/0                 an ACL user
    rediss://:PASSWORD@host:6380/0?ssl_ca_certs=/etc/rlad/ca.crt     TLS, a private CA
    rediss://host:6380/0?ssl_ca_certs=ca.crt&ssl_certfile=me.crt&ssl_keyfile=me.key
                                                      a client certificate (tls-auth-clients)

or the password alone in a file named by `REDIS_PASSWORD_FILE` (a mounted Docker or
Kubernetes secret), so that it sits neither in the environment nor on a command line.
`masked(url)` stands for the URL wherever one is logged or shown: no password is printed.

A refusal that a setting fixes (a wrong or missing password, plain redis:// to a TLS-only
server or the reverse, a certificate that is not trusted) is a `RedisAccessError` whose
message names the setting; an outage (connection refused, timed out) is not one: the queue
rides it out (services/queue/runner.py).
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qs, urlsplit, urlunsplit

import redis
from redis.connection import URL_QUERY_ARGUMENT_PARSERS

PASSWORD_FILE_ENV = "REDIS_PASSWORD_FILE"
URL_FORMS = "redis://[[USER]:PASSWORD@]HOST[:PORT][/DB], rediss://… (TLS) or unix:///PATH"
TLS_FILES = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile")
TLS_SETTINGS = {*TLS_FILES, "ssl_cert_reqs", "ssl_check_hostname"}
PROBE_TIMEOUT_S = 3.0
Protocol = Literal["plain", "other", "unreachable"]


class RedisAccessError(ValueError):
    """This client cannot use the Redis it was given, for a reason a setting fixes; the
    message names the setting. Retrying does not help, so nothing retries it."""


@dataclass(frozen=True)
class RedisTarget:
    """A Redis URL checked, with what `from_url` needs beyond it."""

    url: str
    options: dict[str, Any] = field(default_factory=dict)  # the password from its file
    password_from: str | None = None  # where the password came from, to say what to fix

    @property
    def shown(self) -> str:
        return masked(self.url)


def masked(url: str) -> str:
    """`url` with its password replaced by `***`, for logs and messages."""
    parts = urlsplit(url)
    if not parts.password:
        return url
    address = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{address}"))


def resolve(url: str, environ: Mapping[str, str]) -> RedisTarget:
    """Check `url` and find its password; a URL that cannot work is refused here, before
    any connection, with what to change."""
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise RedisAccessError(f"{masked(url)} is not a Redis URL: give {URL_FORMS}")
    query = parse_qs(parts.query)
    unknown = sorted(set(query) - set(URL_QUERY_ARGUMENT_PARSERS) - TLS_SETTINGS)
    if unknown:
        raise RedisAccessError(
            f"the Redis URL {masked(url)} has unknown settings {', '.join(unknown)}; "
            f"TLS ones are {', '.join(sorted(TLS_SETTINGS))}"
        )
    tls = sorted(set(query) & TLS_SETTINGS)
    if tls and parts.scheme != "rediss":
        raise RedisAccessError(f"{', '.join(tls)} in the Redis URL are TLS settings: use rediss://")
    for name in TLS_FILES:
        for path in query.get(name, []):
            if not Path(path).is_file():
                raise RedisAccessError(f"{name}={path} in the Redis URL: no such file")
    password_file = environ.get(PASSWORD_FILE_ENV)
    if not password_file:
        return RedisTarget(
            url, password_from="the password in the Redis URL" if parts.password else None
        )
    if parts.password:
        raise RedisAccessError(
            f"the Redis URL has a password and {PASSWORD_FILE_ENV} names another: keep one"
        )
    return RedisTarget(
        url,
        {"password": read_password(password_file)},
        f"the password in {password_file} ({PASSWORD_FILE_ENV})",
    )


def read_password(path: str) -> str:
    try:
        password = Path(path).read_text().rstrip("\r\n")
    except OSError as exc:
        raise RedisAccessError(f"{PASSWORD_FILE_ENV}={path}: {exc.strerror}") from None
    if not password:
        raise RedisAccessError(f"{PASSWORD_FILE_ENV}={path} is empty: put the password in it")
    return password


def check(client: redis.Redis, target: RedisTarget) -> None:
    """One PING; a refusal that a setting fixes raises `RedisAccessError`. A Redis that
    does not answer yet is left to the queue, which waits for it."""
    try:
        client.ping()
    except redis.RedisError as exc:
        problem = refusal(exc, target)
        if problem is not None:
            raise problem from None


def refusal(error: redis.RedisError, target: RedisTarget) -> RedisAccessError | None:
    """What to fix, when `error` says this client was refused rather than Redis being down."""
    where = target.shown
    if isinstance(error, redis.AuthenticationError):
        if target.password_from is None:
            return RedisAccessError(
                f"Redis at {where} asks for a password and none was given: put it in the Redis "
                f"URL (redis://:PASSWORD@host:port/db) or in a file named by {PASSWORD_FILE_ENV}"
            )
        return RedisAccessError(
            f"Redis at {where} refused {target.password_from} ({error}): fix it"
        )
    parts = urlsplit(target.url)
    if parts.scheme == "unix" or not isinstance(error, (redis.ConnectionError, redis.TimeoutError)):
        return None
    speaks = spoken_protocol(parts.hostname or "localhost", parts.port or 6379)
    if parts.scheme == "rediss" and speaks == "plain":
        return RedisAccessError(
            f"Redis at {where} speaks plain Redis, not TLS: use redis://, or turn TLS on at the "
            "server (tls-port)"
        )
    tls_error = ssl_failure(error)
    if tls_error is not None:
        return RedisAccessError(
            f"TLS with Redis at {where} failed ({tls_error}): a certificate not trusted needs its "
            "CA in the Redis URL (?ssl_ca_certs=/path/ca.crt); a server that asks for a client "
            "certificate, ssl_certfile and ssl_keyfile"
        )
    if parts.scheme == "redis" and speaks == "other":
        return RedisAccessError(
            f"Redis at {where} closed the connection without answering a plain redis:// client: "
            "a Redis that serves only TLS does that; use rediss:// (with ?ssl_ca_certs=… for a "
            "private CA)"
        )
    return None


def ssl_failure(error: BaseException) -> BaseException | None:
    """The TLS error behind `error`, if any: redis-py wraps it, or only chains it."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, ssl.SSLError) or "[SSL" in str(seen):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def spoken_protocol(host: str, port: int) -> Protocol:
    """ "plain" when a plain Redis answers an inline PING at host:port (with PONG, or an
    error such as NOAUTH), "other" when something accepts the connection and closes it
    without a Redis answer (a TLS-only Redis resets it), "unreachable" when nothing accepts
    it or nothing answers in time (a Redis that hangs is an outage, not a wrong setting)."""
    try:
        connection = socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S)
    except OSError:
        return "unreachable"
    with connection:
        try:
            connection.sendall(b"PING\r\n")
            first = connection.recv(1)
        except TimeoutError:
            return "unreachable"
        except OSError:
            return "other"
    return "plain" if first in (b"+", b"-") else "other"
