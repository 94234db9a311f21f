"""`rlad bootstrap` (small budget) builds loadable models and caches them; `rlad eval`
samples them through the vLLM rollout engine and writes the report.

Both commands run as real processes, the way `make run` and users call them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from services.bootstrap.build import STAMP, BootstrapConfig, bootstrap
from services.config.task import KKTaskConfig
from services.tasks.kk import KKTask


def rlad(*args: str, timeout: float = 600) -> str:
    """Run `rlad ARGS` in its own process group; on a timeout the whole group (vLLM's
    engine-core child included) is killed, so nothing outlives the test."""
    process = subprocess.Popen(
        [sys.executable, "-m", "services.cli.main", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise
    assert process.returncode == 0, f"rlad {args[0]} failed:\n{stdout}\n{stderr}"
    return stdout


ROLES = ("teacher", "student")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("bootstrap") / "tiny"
    return out, rlad("bootstrap", "--out", str(out), "--seed", "0", "--budget", "small")


def test_bootstrap_writes_loadable_teacher_and_student(tiny: tuple[Path, str]) -> None:
    out, printed = tiny
    assert "teacher accuracy" in printed and "student accuracy" in printed
    stamp = json.loads((out / STAMP).read_text())
    sizes = {}
    for role in ROLES:
        model = AutoModelForCausalLM.from_pretrained(out / role)
        tokenizer = AutoTokenizer.from_pretrained(out / role)
        config = model.config
        assert config.hidden_size // config.num_attention_heads >= 32  # vLLM CPU kernels
        problem = next(KKTask(KKTaskConfig(people=[3], rendering="compact")).problems("eval"))
        ids = tokenizer(problem.prompt + (problem.reference or ""), return_tensors="pt")
        assert ids["input_ids"].shape[1] + 16 <= config.max_position_embeddings
        with torch.no_grad():
            assert torch.isfinite(model(**ids).logits).all()
        sizes[role] = sum(p.numel() for p in model.parameters())
        assert 0.0 <= stamp[role]["accuracy"]["all"] <= 1.0
    assert sizes["teacher"] > sizes["student"]


def test_bootstrap_skips_work_when_complete(tiny: tuple[Path, str]) -> None:
    out, _ = tiny
    before = (out / "teacher" / "model.safetensors").stat().st_mtime_ns
    printed = rlad("bootstrap", "--out", str(out), "--seed", "0", "--budget", "small")
    assert "up to date" in printed
    assert (out / "teacher" / "model.safetensors").stat().st_mtime_ns == before


def test_a_student_setting_rebuilds_the_student_alone(tiny: tuple[Path, str]) -> None:
    out, _ = tiny
    mtimes = {role: (out / role / "model.safetensors").stat().st_mtime_ns for role in ROLES}
    changed = BootstrapConfig.for_budget(out, 0, "small").model_copy(
        update={"bare_answer_share": 0.0}
    )
    logs: list[str] = []
    result = bootstrap(changed, log=logs.append)
    assert any("teacher is up to date" in line for line in logs)
    assert (out / "teacher" / "model.safetensors").stat().st_mtime_ns == mtimes["teacher"]
    assert (out / "student" / "model.safetensors").stat().st_mtime_ns != mtimes["student"]
    stamp = json.loads((out / STAMP).read_text())
    assert stamp["student"]["fingerprint"] == result.student.fingerprint
    assert stamp["teacher"]["fingerprint"] == result.teacher.fingerprint


@pytest.mark.vllm
def test_eval_through_vllm(tiny: tuple[Path, str], tmp_path: Path) -> None:
    out, _ = tiny
    report_dir = tmp_path / "eval"
    printed = rlad(
        "eval",
        "--model",
        str(out / "teacher"),
        "--task",
        "kk",
        "--people",
        "2,3",
        "--rendering",
        "compact",
        "--k",
        "4",
        "--limit",
        "2",
        "--max-tokens",
        "24",
        "--out",
        str(report_dir),
    )
    assert "Mean@4" in printed and "Pass@4" in printed
    report = json.loads((report_dir / "eval.json").read_text())
    assert [s["subset"] for s in report["subsets"]] == ["PPL2", "PPL3"]
    assert all(s["problems"] == 2 for s in report["subsets"])
    assert (report["temperature"], report["top_p"], report["k"]) == (0.6, 0.95, 4)
    for subset in report["subsets"]:
        assert 0 < subset["mean_tokens"] <= 24
        assert subset["pass_at"]["1"] <= subset["pass_at"]["4"]
    assert (report_dir / "eval.png").read_bytes()[:4] == b"\x89PNG"
