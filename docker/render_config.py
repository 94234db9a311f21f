"""Render an experiment YAML template for a container: `${NAME}` and `${NAME:-default}`
placeholders take their values from the environment (docker-compose.yml passes them from
`.env`), so models and sizes are chosen without editing a file. Overlay files, rendered the
same way, are merged over the template key by key (the CPU profile's CPU_CONFIG_OVERLAY).

    python3 docker/render_config.py docker/config/gpu.yaml > /tmp/rlad-config.yaml
    python3 docker/render_config.py configs/tiny-cpu.yaml docker/config/smoke.yaml

A placeholder whose variable is unset and has no default stops the container with its name
(an empty experiment field would otherwise surface much later, as a confusing error).
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

PLACEHOLDER = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def placeholders(text: str) -> set[str]:
    """Names of the variables a template reads."""
    return {match.group(1) for match in PLACEHOLDER.finditer(text)}


def render(text: str, env: Mapping[str, str]) -> str:
    missing: set[str] = set()

    def value(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        found = env.get(name) or default
        if found is None:
            missing.add(name)
            return ""
        return found

    rendered = PLACEHOLDER.sub(value, text)
    if missing:
        raise ValueError(f"set {', '.join(sorted(missing))} in the environment (see .env.example)")
    return rendered


def merged(base: dict[str, Any], overlay: Mapping[str, Any]) -> dict[str, Any]:
    """`base` with `overlay` on top: mappings merge key by key, any other value replaces."""
    result = dict(base)
    for key, value in overlay.items():
        if isinstance(value, Mapping) and isinstance(result.get(key), dict):
            result[key] = merged(result[key], value)
        else:
            result[key] = value
    return result


def render_files(template: str, overlays: list[str], env: Mapping[str, str]) -> str:
    """The rendered template, verbatim without overlays, else the merged tree as YAML."""
    text = render(Path(template).read_text(), env)
    if not overlays:
        return text
    tree = yaml.safe_load(text) or {}
    for path in overlays:
        overlay = yaml.safe_load(render(Path(path).read_text(), env)) or {}
        if not isinstance(overlay, Mapping):
            raise ValueError(f"{path}: an overlay is a mapping of keys")
        tree = merged(tree, overlay)
    return yaml.safe_dump(tree, sort_keys=False)


def main(argv: list[str]) -> None:
    template, *overlays = argv
    try:
        print(render_files(template, overlays, os.environ), end="")
    except (OSError, ValueError, yaml.YAMLError) as exc:
        sys.exit(f"{template}: {exc}")


if __name__ == "__main__":
    main(sys.argv[1:])
