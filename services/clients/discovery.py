"""Teacher discovery: one URL per replica behind a DNS name.

`docker compose up --scale teacher=N` gives the service name `teacher` one A record per
replica, and Docker's DNS answers a lookup with all of them. The teacher client balances
over the URLs it is given, so `http://teacher:8000` is expanded into one URL per address
(`http://172.18.0.5:8000`, `http://172.18.0.6:8000`, …) before the client is built.

Only plain `http://` names that resolve to several IPv4 addresses are expanded: an
`https://` URL keeps its name (the certificate is checked against it), and a name that
does not resolve, or resolves to one address, is left as it is (a replica that is not up
yet is then found by the client's own retries once it is). Resolution happens once, at
start: after rescaling a running stack, restart the scorer, or let the teachers register
and the scorer follow the registry (`--teacher-url registry`, services/queue/registry.py).
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from urllib.parse import urlsplit, urlunsplit

from services.config.workers import OPENAI_PREFIX

log = logging.getLogger(__name__)


def resolve_ipv4(host: str, port: int) -> list[str]:
    """Every distinct IPv4 address of `host`, sorted; empty when it does not resolve."""
    try:
        infos = socket.getaddrinfo(host, port, family=socket.AF_INET, type=socket.SOCK_STREAM)
    except socket.gaierror:
        return []
    return sorted({str(info[4][0]) for info in infos}, key=ipaddress.IPv4Address)


def expand_teacher_urls(urls: list[str]) -> list[str]:
    """One URL per replica address, in order, without duplicates; an API prefix
    (`openai+http://…`) is kept on each."""
    expanded: list[str] = []
    for url in urls:
        prefix = OPENAI_PREFIX if url.startswith(OPENAI_PREFIX) else ""
        for replica in _expand_one(url.removeprefix(prefix).rstrip("/")):
            if prefix + replica not in expanded:
                expanded.append(prefix + replica)
    return expanded


def _expand_one(url: str) -> list[str]:
    parts = urlsplit(url)
    host = parts.hostname
    if parts.scheme != "http" or host is None or _is_ip(host):
        return [url]
    port = parts.port or 80
    addresses = resolve_ipv4(host, port)
    if len(addresses) < 2:
        return [url]
    log.info("%s resolves to %d replicas: %s", host, len(addresses), ", ".join(addresses))
    userinfo = parts.netloc.rpartition("@")[0]
    prefix = f"{userinfo}@" if userinfo else ""
    suffix = f":{parts.port}" if parts.port else ""
    return [
        urlunsplit((parts.scheme, f"{prefix}{address}{suffix}", parts.path, parts.query, ""))
        for address in addresses
    ]


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
