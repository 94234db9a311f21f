"""`rlad eval`: Mean@k and Pass@k of a model on a task's held-out set, per subset.

    rlad eval --model artifacts/tiny/teacher --task kk --people 2,3 --rendering compact \\
        --k 8 --max-tokens 200

Samples go through the rollout engine in-process (vLLM by default, `--backend hf` for
transformers); the table is printed, and `eval.json` and `eval.png` are written to `--out`.
With `--config run.yaml` the task comes from that experiment file instead of the flags.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import typer


def command(
    model: str = typer.Option(..., help="Hugging Face model id or local folder."),
    task: str = typer.Option("kk", help="kk or math (ignored with --config)."),
    k: int = typer.Option(8, help="Samples per problem."),
    temperature: float = typer.Option(0.6, help="Sampling temperature."),
    top_p: float = typer.Option(0.95, help="Nucleus sampling mass."),
    max_tokens: int = typer.Option(1024, help="Longest completion."),
    limit: int = typer.Option(None, help="Evaluate the first N problems of each subset."),
    people: str = typer.Option("2,3,4,5,6,7,8", help="kk: subsets PPL<n>, comma-separated."),
    rendering: str = typer.Option("natural", help="kk: natural or compact."),
    math_data: str = typer.Option(None, help="math: local JSONL/Parquet evaluation file."),
    hf_dataset: str = typer.Option(None, help="math: Hugging Face dataset name."),
    config: Path = typer.Option(None, help="Take the task from this run YAML."),
    backend: str = typer.Option("vllm", help="Rollout engine: vllm or hf."),
    kv_cache_gib: float = typer.Option(None, help="vLLM: KV cache GiB (CPU default 1)."),
    seed: int = typer.Option(0, help="Sampling seed."),
    out: Path = typer.Option(None, help="Folder for eval.json and eval.png."),
) -> None:
    """Sample k completions per held-out problem and report Mean@k and Pass@k."""
    from transformers import AutoTokenizer

    from rollout_server.backends import load_engine
    from services.cli.options import load_run
    from services.config.servers import RolloutServerConfig
    from services.config.task import KKTaskConfig, MathTaskConfig, TaskConfig
    from services.evaluation.evaluate import (
        EvalConfig,
        EvalReport,
        evaluate,
        print_table,
        write_report,
    )
    from services.tasks import load_task

    task_config: TaskConfig
    if config is not None:
        task_config = load_run(config).task
    elif task == "kk":
        task_config = KKTaskConfig(
            people=[int(n) for n in people.split(",")],
            rendering=rendering,  # type: ignore[arg-type]
        )
    elif task == "math":
        task_config = MathTaskConfig(eval_path=math_data, hf_dataset=hf_dataset)
    else:
        raise typer.BadParameter("kk or math", param_hint="--task")
    eval_config = EvalConfig(
        k=k,
        temperature=temperature,
        top_p=top_p,
        max_tokens=max_tokens,
        seed=seed,
        limit_per_subset=limit,
    )
    if kv_cache_gib is None and backend == "vllm":
        import torch

        kv_cache_gib = None if torch.cuda.is_available() else 1.0
    engine_config = RolloutServerConfig(
        model=model,
        backend=backend,  # type: ignore[arg-type]
        kv_cache_gib=kv_cache_gib,
        seed=seed,
    )

    async def run() -> EvalReport:
        # The engine lives inside the one event loop that uses it.
        engine = load_engine(engine_config)
        try:
            tokenizer = AutoTokenizer.from_pretrained(model)
            return await evaluate(engine, tokenizer, load_task(task_config), eval_config, model)
        finally:
            engine.shutdown()

    report = asyncio.run(run())
    print_table(report)
    out_dir = out or Path("runs") / "eval" / Path(model).name
    json_path, png_path = write_report(report, out_dir)
    typer.echo(f"wrote {json_path} and {png_path}")
