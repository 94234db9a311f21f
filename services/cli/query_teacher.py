"""`rlad query-teacher`: score sequences on teachers from the command line (an rlad
teacher's `POST /v1/score`, or a `vllm serve` through an `openai+http://…/v1` URL).

    rlad query-teacher --url http://127.0.0.1:8100 --input sequences.jsonl --top-k 5 > scores.jsonl

Each input line is one sequence, `{"token_ids": [...], "start": n}`; each output line is
that sequence's scores, `{"logprobs": [...], "top_k_ids": ..., "top_k_logprobs": ...}`, in
the same order. Several `--url`s are balanced and failed over like the scorer does.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import typer


def command(
    url: list[str] = typer.Option(
        ...,
        "--url",
        help="Teacher URL (repeatable): http://host:8100 for rlad serve-teacher, "
        "openai+http://host:8000/v1 for vllm serve.",
    ),
    input: Path = typer.Option(..., exists=True, dir_okay=False, help="JSONL of sequences."),
    output: Path = typer.Option(None, help="Where to write JSONL scores (default: stdout)."),
    top_k: int = typer.Option(0, min=0, help="Also return the k most likely ids per token."),
    deadline_s: float = typer.Option(60.0, help="Give up after this many seconds."),
    api_key: str = typer.Option(None, envvar="RLAD_API_KEY", help="Bearer token."),
) -> None:
    """Score every sequence of a JSONL file and print one JSON line of scores per sequence."""
    from pydantic import ValidationError
    from rich.console import Console

    from services.clients.teacher import TeacherClient
    from services.common.protocol import ScoreSequence
    from services.config.workers import parse_teacher_url

    console = Console(stderr=True)
    for each in url:
        try:
            parse_teacher_url(each)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--url") from exc
    sequences = []
    for number, line in enumerate(input.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            sequences.append(ScoreSequence.model_validate_json(line))
        except ValidationError as exc:
            raise typer.BadParameter(f"{input}:{number}: {exc.errors()[0]['msg']}") from exc
    if not sequences:
        raise typer.BadParameter(f"{input} holds no sequences")

    async def main() -> None:
        async with TeacherClient(url, api_key=api_key, deadline_s=deadline_s) as client:
            began = time.monotonic()
            response = await client.score(sequences, top_k=top_k)
            elapsed = time.monotonic() - began
        lines = "".join(s.model_dump_json(exclude_none=True) + "\n" for s in response.scores)
        if output is None:
            sys.stdout.write(lines)
        else:
            output.write_text(lines)
        tokens = sum(len(s.logprobs) for s in response.scores)
        console.print(
            f"scored {len(sequences)} sequences ({tokens} tokens) in {elapsed:.2f}s with "
            f"{response.model} @ {response.revision}"
        )

    asyncio.run(main())
