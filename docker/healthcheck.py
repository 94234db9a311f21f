"""Container healthcheck (Dockerfile HEALTHCHECK and docker-compose.yml).

    python3 healthcheck.py http://127.0.0.1:8000/health   # servers: /health answers 200
    python3 healthcheck.py --redis                          # queue workers: REDIS_URL answers PING

Servers answer 503 on /health until their engine is loaded, so a teacher is healthy only
once it can score. Queue workers have no port: their check is their link to Redis; whether
they make progress is what the dashboard's alarms watch (docker/prometheus/alerts.yml).
Exit status 0 is healthy, 1 unhealthy, with the reason on stderr.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


def check(argv: list[str]) -> str | None:
    """None when healthy, else the reason."""
    if argv == ["--redis"]:
        import redis

        # The client every rlad process uses: REDIS_PASSWORD_FILE, TLS, no password shown.
        from services.queue.access import RedisAccessError, masked
        from services.queue.connection import connect

        url = os.environ.get("REDIS_URL")
        if not url:
            return "REDIS_URL is not set"
        try:
            connect(url, socket_timeout=5, socket_connect_timeout=5).ping()
        except RedisAccessError as exc:
            return str(exc)
        except redis.RedisError as exc:
            return f"redis at {masked(url)}: {exc}"
        return None
    if len(argv) != 1:
        return "usage: healthcheck.py URL | --redis"
    try:
        with urllib.request.urlopen(argv[0], timeout=5) as response:
            return None if response.status == 200 else f"{argv[0]}: HTTP {response.status}"
    except (urllib.error.URLError, OSError) as exc:
        return f"{argv[0]}: {exc}"


if __name__ == "__main__":
    reason = check(sys.argv[1:])
    if reason is not None:
        print(f"unhealthy: {reason}", file=sys.stderr)
        sys.exit(1)
