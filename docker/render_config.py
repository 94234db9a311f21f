"""Render an experiment YAML template for a container: `${NAME}` and `${NAME:-default}`
placeholders take their values from the environment (docker-compose.yml passes them from
`.env`), so models and sizes are chosen without editing a file.

    python3 docker/render_config.py docker/config/gpu.yaml > /tmp/rlad-config.yaml

A placeholder whose variable is unset and has no default stops the container with its name
(an empty experiment field would otherwise surface much later, as a confusing error).
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path

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


def main(argv: list[str]) -> None:
    (template,) = argv
    try:
        print(render(Path(template).read_text(), os.environ), end="")
    except ValueError as exc:
        sys.exit(f"{template}: {exc}")


if __name__ == "__main__":
    main(sys.argv[1:])
