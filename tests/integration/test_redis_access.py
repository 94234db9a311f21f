"""A Redis with a password and a Redis with TLS only, as on a cluster: real `redis-server`s.

With the right password (in the URL or in REDIS_PASSWORD_FILE) the queue works, blocking
and asyncio; a wrong or missing password, plain redis:// to the TLS server, rediss:// to
the plain one and a certificate not trusted are each refused at once with a message that
names the setting to fix and never shows the password, by `connect` and by the CLI (exit
code 2, no traceback). Over rediss:// with the CA and a client certificate the queue
round-trips. Certificates are made here with `cryptography`; the TLS tests are skipped,
saying why, where redis-server was built without TLS."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from services.common.runtime import free_port
from services.config.workers import QueueConfig
from services.queue.access import PASSWORD_FILE_ENV, RedisAccessError
from services.queue.connection import connect, connect_async
from services.queue.keys import ROLLOUTS
from services.queue.queues import AsyncQueue, GroupQueue
from tests.integration.groups import small_group

BINARY = shutil.which("redis-server")
pytestmark = pytest.mark.skipif(BINARY is None, reason="needs the redis-server binary")
PASSWORD = "correct-horse-battery"
RLAD = [sys.executable, "-m", "services.cli.main"]


def start_redis(args: list[str], ready: Callable[[], object]) -> subprocess.Popen[str]:
    """A redis-server on loopback without persistence; returns once `ready()` succeeds."""
    assert BINARY is not None
    argv = [BINARY, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", *args]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 10
    while True:
        if proc.poll() is not None:
            output = proc.stdout.read() if proc.stdout else ""
            if "--tls-port" in args and "TLS" in output:
                pytest.skip(f"redis-server was built without TLS: {output.strip()[-200:]}")
            raise RuntimeError(f"redis-server exited: {output[-2000:]}")
        try:
            ready()
            return proc
        except redis.ConnectionError:
            assert time.monotonic() < deadline, "redis-server did not answer within 10 s"
            time.sleep(0.05)


def stop(proc: subprocess.Popen[str]) -> None:
    proc.terminate()
    proc.wait(timeout=10)


def round_trip(client: redis.Redis) -> None:
    """The queue works: a group published is consumed back, with its content."""
    client.flushdb()
    queue = GroupQueue(client, "access")
    queue.publish(ROLLOUTS, small_group(7), counter="produced")
    [delivery] = queue.consume(ROLLOUTS, "scorer", reclaim=False)
    assert delivery.group is not None and delivery.group.group_id == "g7"


def async_round_trip(url: str) -> None:
    async def main() -> None:
        async with connect_async(url) as client:
            await client.flushdb()
            queue = await AsyncQueue.open(client, "access", QueueConfig())
            await queue.publish(ROLLOUTS, small_group(8), counter="produced")
            [delivery] = await queue.consume(ROLLOUTS, "scorer")
            assert delivery.group is not None and delivery.group.group_id == "g8"

    asyncio.run(main())


def rlad(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*RLAD, *args], capture_output=True, text=True, timeout=60)


# ---------------------------------------------------------------- a password


@pytest.fixture(scope="module")
def password_port() -> Iterator[int]:
    port = free_port()
    url = f"redis://:{PASSWORD}@127.0.0.1:{port}/0"
    proc = start_redis(
        ["--port", str(port), "--requirepass", PASSWORD], lambda: redis.Redis.from_url(url).ping()
    )
    yield port
    stop(proc)


@pytest.fixture
def password_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "redis_password"
    path.write_text(PASSWORD + "\n")
    monkeypatch.setenv(PASSWORD_FILE_ENV, str(path))
    return path


def test_the_right_password_opens_the_queue(
    password_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(PASSWORD_FILE_ENV, raising=False)
    url = f"redis://:{PASSWORD}@127.0.0.1:{password_port}/0"
    round_trip(connect(url))
    async_round_trip(url)
    round_trip(connect(f"redis://default:{PASSWORD}@127.0.0.1:{password_port}/0"))  # ACL form


def test_the_password_from_its_file_opens_the_queue(
    password_port: int, password_file: Path
) -> None:
    url = f"redis://127.0.0.1:{password_port}/0"
    round_trip(connect(url))
    async_round_trip(url)


def test_a_wrong_or_missing_password_names_the_setting(
    password_port: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(PASSWORD_FILE_ENV, raising=False)
    with pytest.raises(RedisAccessError, match="refused the password in the Redis URL") as wrong:
        connect(f"redis://:wrong-one@127.0.0.1:{password_port}/0")
    assert "wrong-one" not in str(wrong.value) and ":***@" in str(wrong.value)
    with pytest.raises(RedisAccessError, match=f"none was given: .* {PASSWORD_FILE_ENV}"):
        connect(f"redis://127.0.0.1:{password_port}/0")
    with pytest.raises(RedisAccessError, match="asks for a password"):
        connect_async(f"redis://127.0.0.1:{password_port}/0")
    stale = tmp_path / "stale_password"
    stale.write_text("last-years-password")
    monkeypatch.setenv(PASSWORD_FILE_ENV, str(stale))
    with pytest.raises(RedisAccessError, match=f"refused the password in {stale}") as from_file:
        connect(f"redis://127.0.0.1:{password_port}/0")
    assert "last-years-password" not in str(from_file.value)


def test_a_refused_password_is_not_waited_out_as_an_outage(password_port: int) -> None:
    # A client made without `connect`'s check: the queue's own calls must fail at once too,
    # not be retried for redis_outage_s as if Redis were restarting.
    client = redis.Redis.from_url(f"redis://:wrong-one@127.0.0.1:{password_port}/0")
    started = time.monotonic()
    with pytest.raises(redis.AuthenticationError):
        GroupQueue(client, "access", QueueConfig(redis_outage_s=30))  # creates its groups
    assert time.monotonic() - started < 5


def test_the_cli_says_what_to_fix_and_exits_2(
    password_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(PASSWORD_FILE_ENV, raising=False)
    wrong = rlad(
        "monitor", "--once", "--redis-url", f"redis://:wrong-one@127.0.0.1:{password_port}/0"
    )
    assert wrong.returncode == 2, wrong.stderr
    assert "refused the password in the Redis URL" in wrong.stderr
    assert "wrong-one" not in wrong.stdout + wrong.stderr and "Traceback" not in wrong.stderr
    missing = rlad("dead", "list", "--redis-url", f"redis://127.0.0.1:{password_port}/0")
    assert missing.returncode == 2 and "asks for a password" in missing.stderr, missing.stderr


def test_the_container_healthcheck_reads_the_password_file(
    password_port: int, password_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "docker"))
    import healthcheck

    monkeypatch.setenv("REDIS_URL", f"redis://127.0.0.1:{password_port}/0")
    assert healthcheck.check(["--redis"]) is None
    password_file.write_text("not-it")
    reason = healthcheck.check(["--redis"]) or ""
    assert "refused the password" in reason and "not-it" not in reason


# ---------------------------------------------------------------- TLS


@dataclass(frozen=True)
class Certificates:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def issue(
    folder: Path, name: str, issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A key and certificate for `name`, signed by `issuer` (self-signed, a CA, when None)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer[0].subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if issuer is not None:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    certificate = builder.sign(issuer[1] if issuer else key, hashes.SHA256())
    (folder / f"{name}.crt").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    (folder / f"{name}.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return certificate, key


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    folder = tmp_path_factory.mktemp("tls")
    ca = issue(folder, "ca", None)
    issue(folder, "server", ca)
    issue(folder, "client", ca)
    return Certificates(
        *(folder / n for n in ("ca.crt", "server.crt", "server.key")),
        *(folder / n for n in ("client.crt", "client.key")),
    )


@pytest.fixture(scope="module")
def tls_port(certificates: Certificates) -> Iterator[int]:
    """A Redis that speaks TLS only (`--port 0`) and asks clients for a certificate."""
    port = free_port()
    tls = certificates
    proc = start_redis(
        [
            *("--port", "0", "--tls-port", str(port), "--tls-auth-clients", "yes"),
            *("--tls-cert-file", str(tls.server_cert), "--tls-key-file", str(tls.server_key)),
            *("--tls-ca-cert-file", str(tls.ca)),
        ],
        lambda: redis.Redis(
            port=port,
            ssl=True,
            ssl_ca_certs=str(tls.ca),
            ssl_certfile=str(tls.client_cert),
            ssl_keyfile=str(tls.client_key),
        ).ping(),
    )
    yield port
    stop(proc)


def tls_url(port: int, tls: Certificates, client_certificate: bool = True) -> str:
    url = f"rediss://localhost:{port}/0?ssl_ca_certs={tls.ca}"
    if client_certificate:
        url += f"&ssl_certfile={tls.client_cert}&ssl_keyfile={tls.client_key}"
    return url


def test_the_queue_round_trips_over_tls(tls_port: int, certificates: Certificates) -> None:
    url = tls_url(tls_port, certificates)
    round_trip(connect(url))
    async_round_trip(url)


def test_tls_refusals_name_the_setting(
    tls_port: int, password_port: int, certificates: Certificates
) -> None:
    with pytest.raises(RedisAccessError, match=r"serves only TLS .* use rediss://"):
        connect(f"redis://127.0.0.1:{tls_port}/0")
    with pytest.raises(RedisAccessError, match="speaks plain Redis, not TLS: use redis://"):
        connect(f"rediss://:{PASSWORD}@127.0.0.1:{password_port}/0?ssl_ca_certs={certificates.ca}")
    with pytest.raises(RedisAccessError, match=r"CERTIFICATE_VERIFY_FAILED.*ssl_ca_certs"):
        connect(f"rediss://localhost:{tls_port}/0")  # the system CAs do not know this one
    with pytest.raises(RedisAccessError, match="ssl_certfile and ssl_keyfile"):
        connect(tls_url(tls_port, certificates, client_certificate=False))
