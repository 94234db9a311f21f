"""`expand_teacher_urls`: one URL per replica of a scaled compose service.

Names that resolve here (localhost) use the real resolver; the multi-record answer Docker's
DNS gives for `--scale teacher=3` is reproduced by answering `getaddrinfo` for one name.
"""

from __future__ import annotations

import socket
from typing import Any

import pytest

from services.clients.discovery import expand_teacher_urls, resolve_ipv4

REPLICAS = ["172.18.0.12", "172.18.0.5", "172.18.0.6"]


@pytest.fixture
def scaled_teacher_dns(monkeypatch: pytest.MonkeyPatch) -> None:
    """`teacher` has three A records (listed out of order, one twice); others resolve as usual."""
    real = socket.getaddrinfo

    def getaddrinfo(host: str, port: Any, *args: Any, **kwargs: Any) -> list[Any]:
        if host == "teacher":
            return [
                (socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, int(port)))
                for ip in [*REPLICAS, REPLICAS[0]]
            ]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


def test_service_name_expands_to_every_replica(scaled_teacher_dns: None) -> None:
    assert expand_teacher_urls(["http://teacher:8000"]) == [
        "http://172.18.0.5:8000",
        "http://172.18.0.6:8000",
        "http://172.18.0.12:8000",
    ]


def test_path_and_credentials_are_kept(scaled_teacher_dns: None) -> None:
    urls = expand_teacher_urls(["http://user:pw@teacher:9000/prefix/"])
    assert urls[0] == "http://user:pw@172.18.0.5:9000/prefix"
    assert len(urls) == 3


def test_https_keeps_its_name_for_certificate_checks(scaled_teacher_dns: None) -> None:
    assert expand_teacher_urls(["https://teacher:8443"]) == ["https://teacher:8443"]


def test_single_address_and_literals_are_unchanged() -> None:
    assert resolve_ipv4("localhost", 80) == ["127.0.0.1"]
    urls = ["http://localhost:8100", "http://10.0.0.7:8000", "http://[::1]:8000"]
    assert expand_teacher_urls(urls) == urls


def test_unresolvable_name_is_kept_for_the_client_to_retry() -> None:
    assert resolve_ipv4("no-such-host.invalid", 80) == []
    assert expand_teacher_urls(["http://no-such-host.invalid:8000"]) == [
        "http://no-such-host.invalid:8000"
    ]


def test_mixed_list_is_deduplicated_in_order(scaled_teacher_dns: None) -> None:
    urls = expand_teacher_urls(
        ["http://10.0.0.7:8000", "http://teacher:8000", "http://172.18.0.5:8000/"]
    )
    assert urls == [
        "http://10.0.0.7:8000",
        "http://172.18.0.5:8000",
        "http://172.18.0.6:8000",
        "http://172.18.0.12:8000",
    ]
