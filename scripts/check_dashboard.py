"""Grafana's provisioning checked without Grafana, for machines where its image cannot be
had (Debian has no package of it): the files parse, the datasource every panel names is the
one provisioned and points at the stack's Prometheus, the dashboards are mounted where the
provider reads them, and every metric a panel queries is one that the running stack's
exporters really export, as that Prometheus scraped them.

    python3 scripts/check_dashboard.py --prometheus http://127.0.0.1:9090 [ROOT]

Needs PyYAML (the rlad images have it; scripts/compose_smoke.sh runs it in one). Prints
what it checked; each failure goes to stderr and makes the exit status 1.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import urllib.request
from pathlib import Path
from typing import Any

import yaml

METRIC = re.compile(r"\brlad_[a-z0-9_]+")


def exported_names(prometheus: str) -> set[str]:
    """Every metric name Prometheus holds samples of."""
    url = f"{prometheus.rstrip('/')}/api/v1/label/__name__/values"
    with urllib.request.urlopen(url, timeout=10) as response:
        return set(json.load(response)["data"])


def grafana_mounts(compose: dict[str, Any]) -> dict[str, str]:
    """Host path → container path of the grafana service's bind mounts."""
    mounts = {}
    for volume in compose["services"]["grafana"]["volumes"]:
        source, target, *_ = volume.split(":")
        if source.startswith("./"):
            mounts[source.removeprefix("./")] = target
    return mounts


def check(root: Path, names: set[str]) -> list[str]:
    problems: list[str] = []
    compose = yaml.safe_load((root / "docker-compose.yml").read_text())
    mounts = grafana_mounts(compose)
    provisioning = root / "docker/grafana/provisioning"
    if mounts.get("docker/grafana/provisioning") != "/etc/grafana/provisioning":
        problems.append("docker/grafana/provisioning is not mounted at /etc/grafana/provisioning")

    (datasource,) = yaml.safe_load((provisioning / "datasources/prometheus.yml").read_text())[
        "datasources"
    ]
    if datasource["type"] != "prometheus" or datasource["url"] != "http://prometheus:9090":
        problems.append(f"datasource {datasource['uid']} does not point at the stack's Prometheus")

    (provider,) = yaml.safe_load((provisioning / "dashboards/rlad.yml").read_text())["providers"]
    if mounts.get("docker/grafana/dashboards") != provider["options"]["path"]:
        problems.append(f"dashboards are not mounted at {provider['options']['path']}")
    home = Path(
        compose["services"]["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    )
    if str(home.parent) != provider["options"]["path"]:
        problems.append(f"the home dashboard {home} is not where the dashboards are mounted")
    elif not (root / "docker/grafana/dashboards" / home.name).is_file():
        problems.append(f"the home dashboard {home.name} is not in docker/grafana/dashboards")

    for path in sorted((root / "docker/grafana/dashboards").glob("*.json")):
        dashboard = json.loads(path.read_text())
        panels = [p for p in dashboard["panels"] if p["type"] != "row"]
        queried = set()
        for panel in panels:
            if panel["datasource"]["uid"] != datasource["uid"]:
                problems.append(f"{path.name}: panel {panel['title']!r} names another datasource")
            for target in panel["targets"]:
                for name in METRIC.findall(target["expr"]):
                    queried.add(name)
                    if name not in names:
                        problems.append(
                            f"{path.name}: panel {panel['title']!r} queries {name}, "
                            "which no exporter of the stack exports"
                        )
        print(f"{path.name}: {len(panels)} panels, {len(queried)} metrics, all checked")
    return problems


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prometheus", required=True, help="The running stack's Prometheus.")
    parser.add_argument("root", nargs="?", type=Path, default=Path(__file__).parents[1])
    args = parser.parse_args(argv)
    problems = check(args.root, exported_names(args.prometheus))
    for problem in problems:
        print(f"grafana provisioning: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
