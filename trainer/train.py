"""The trainer process: scored groups from Redis → TRRD / GRPO / KDRL update with DeepSpeed →
new weights pushed to every rollout server → checkpoint → acknowledgement.

One optimizer step per global batch of B groups × G completions. Each rank consumes its
share of groups as its own consumer (`trainer-<rank>`), drops groups more than
`max_staleness` versions old (counted), and holds the rest pending until the checkpoint
that contains their update is on disk (see `trainer.checkpoint`). Every tensor the trainer
makes goes to the engine's device (a GPU under NCCL, else the CPU under gloo); the loss is
computed in fp32 whatever the training dtype. Rank 0 decides what every rank must agree
on (the policy version) and alone writes the shared state (the trainer state in Redis).

Run: `rlad train --config configs/tiny-cpu.yaml --rollout-url http://127.0.0.1:8001`
(several ranks: `torchrun --nproc_per_node 2 -m services.cli.main train --config ...`).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from services.common.logprobs import sequence_logprobs
from services.common.protocol import RolloutGroup
from services.config.algorithm import KdrlConfig
from services.config.run import RunConfig
from services.queue.keys import SCORED
from services.queue.queues import GroupQueue
from services.queue.registry import ServerRegistry
from services.queue.streams import Delivery
from services.weights.probe import make_probe
from trainer import checkpoint
from trainer.advantages import group_advantages
from trainer.batch import MicroBatch, collate, empty_batch, flatten, pack
from trainer.deepspeed_setup import (
    create_engine,
    full_state_dict,
    init_distributed,
    local_grad_norm,
    training_dtype,
)
from trainer.intake import Intake
from trainer.loss import TEACHER_METRICS, LossInputs, policy_loss
from trainer.metrics_sink import MetricsSink
from trainer.step_metrics import WeightedMeans, batch_metrics
from trainer.weight_sync import PushReport, WeightSync

log = logging.getLogger(__name__)
# bf16 kernels of two engines (or of two GPUs) differ by more than fp32 ones.
PROBE_ATOL = {"fp32": 1e-3, "bf16": 5e-2}
# A trainer that waits this long for its batch says so, again and again: a run that
# cannot progress must not be silent.
WAITING_WARNING_S = 60.0


class Trainer:
    def __init__(
        self,
        run: RunConfig,
        queue: GroupQueue,
        rollout_urls: list[str],
        api_key: str | None = None,
        should_stop: Callable[[], bool] = lambda: False,
        registry: ServerRegistry | None = None,
    ) -> None:
        """`rollout_urls`: the servers to push weights to; or, with a `registry`, the
        rollout servers registered there (`--rollout-url registry`)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.run = run
        self.config = run.trainer
        self.algorithm = run.algorithm
        # The sampler's temperature: logprobs under the distribution the samples came from.
        self.temperature = run.rollout.temperature
        self.queue = queue
        self.should_stop = should_stop
        self.rank, self.world = init_distributed()
        self.is_main = self.rank == 0
        self.consumer = f"trainer-{self.rank}"
        torch.manual_seed(self.config.seed)
        self.tokenizer = AutoTokenizer.from_pretrained(run.student)
        # fp32 master weights; DeepSpeed casts the module to bf16 when training in bf16.
        model = AutoModelForCausalLM.from_pretrained(run.student, dtype=torch.float32)
        self.intake = Intake(
            group_size=run.rollout.group_size,
            vocab_size=int(model.config.get_text_config().vocab_size),
            algorithm=self.algorithm.name,
            needs_teacher=self.algorithm.uses_teacher,
            teacher_on_every_group=self.algorithm.teacher_on_every_group,
            teacher_revision=self.config.teacher_revision,
        )
        self.engine = create_engine(model, self.config, self.world)
        self.device: torch.device = self.engine.device
        dtype = training_dtype(self.config)
        self.ref_model = None
        if self.algorithm.kl_beta > 0:  # β = 0 (default): no reference model is loaded
            ref_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
            self.ref_model = (
                AutoModelForCausalLM.from_pretrained(run.student, dtype=ref_dtype)
                .to(self.device)
                .eval()
            )
        self.probe_ids = self.tokenizer.encode("Probe: who is a knight?", add_special_tokens=False)
        self.probe_atol = self.config.probe_atol or PROBE_ATOL[dtype]
        self.folder = run.folder
        self.ckpt_dir = self.folder / "checkpoints"
        self.sink = MetricsSink(self.folder, self.config.tensorboard, self.config.wandb_project)
        self.sync = WeightSync(self.engine, run, rollout_urls, api_key, self.is_main, registry)
        self.progress = checkpoint.Progress()
        self.retrain: list[Delivery] = []
        # The version of the weights the retrained groups' lost update started from.
        self.restored_version = 0

    # ------------------------------------------------------------ resume

    def resume(self) -> None:
        """Restore the newest checkpoint and settle the groups left pending by the crash."""
        restored = checkpoint.load(self.engine, self.ckpt_dir)
        if restored is not None:
            self.progress = restored
            if self.is_main:
                cursor = self.queue.restore_prompt_cursor(restored.prompt_cursor)
                log.info("the prompt stream continues at position %d", cursor)
        pending = self.queue.pending_for(SCORED, self.consumer)
        contained = set(self.progress.consumed)
        done = [m for m in pending if m in contained]
        self.queue.ack(SCORED, done, counter="trained")
        self.retrain = self.queue.claim(
            SCORED, self.consumer, [m for m in pending if m not in contained]
        )
        self.progress.consumed = []
        # The groups to retrain passed the staleness check once, against weights no older
        # than the checkpoint's; only their update was lost. Their staleness is measured
        # against the weights restored, not against the version pushed below, which skips
        # every version the servers saw since (they would all be dropped as stale).
        self.restored_version = self.progress.policy_version
        log.info(
            "resumed at step %d (version %d): %d pending groups already trained, %d to retrain",
            self.progress.step,
            self.progress.policy_version,
            len(done),
            len(self.retrain),
        )
        # The servers may already serve a newer version pushed after that checkpoint; rank 0
        # asks, and the push below gives every rank its answer.
        if self.sync.enabled and self.is_main:
            served = self.sync.served_version()
            self.progress.policy_version = max(self.progress.policy_version, served)
        self.push_weights()

    # ------------------------------------------------------------ batches

    def collect(self, wanted: int) -> tuple[list[Delivery], bool]:
        """`wanted` usable, fresh groups for this rank, and whether to stop (the same answer
        on every rank). Collective: the ranks go round together, so that while they wait a
        rollout server found behind the trainer's version (restarted: it serves its base
        weights as version 0) gets the weights again, and its rollout worker, which
        publishes nothing from a server behind the trainer, can go on."""
        batch: list[Delivery] = []
        waiting_since = warned = time.monotonic()
        while True:
            if len(batch) < wanted and not self.should_stop():
                batch += self.take(wanted - len(batch))
            if self.is_main and time.monotonic() - warned >= WAITING_WARNING_S:
                warned = time.monotonic()
                log.warning(
                    "waiting %.0f s for scored groups: %d of %d for step %d; check that the "
                    "rollout worker and the scorers run and that groups are not all stale "
                    "or dead (`rlad monitor`, `rlad dead list`)",
                    warned - waiting_since,
                    len(batch),
                    wanted,
                    self.progress.step + 1,
                )
            behind = self.sync.behind()
            short, stop, catch_up = self.agree(
                len(batch) < wanted, self.should_stop(), bool(behind)
            )
            if catch_up:
                self.sync.catch_up(behind)
            if stop or not short:
                return batch, stop

    def take(self, count: int) -> list[Delivery]:
        """Up to `count` groups this rank can train on: groups to retrain first, then new
        ones. Unusable groups are dead-lettered with the reason; stale ones dropped, counted."""
        retrained = bool(self.retrain)
        if retrained:
            deliveries, self.retrain = self.retrain[:count], self.retrain[count:]
            version = self.restored_version
        else:
            deliveries = self.queue.consume(
                SCORED, self.consumer, count=count, block_ms=500, reclaim=False
            )
            version = self.progress.policy_version
        usable, stale = [], []
        for delivery in deliveries:
            problem = self.intake.problem(delivery.group)
            if problem is not None:
                self.queue.dead_letter(SCORED, delivery.message_id, problem)
                continue
            assert delivery.group is not None  # `problem` says so otherwise
            lag = version - delivery.group.policy_version
            if not retrained:  # a retrained group was counted when it first arrived
                self.queue.count_staleness(max(lag, 0))
            if lag > self.config.max_staleness:
                stale.append(delivery.message_id)
            else:
                usable.append(delivery)
        self.queue.ack(SCORED, stale, counter="stale")
        return usable

    def agree(self, *flags: bool) -> list[bool]:
        """Each flag, true when it holds on any rank."""
        values = torch.tensor([float(f) for f in flags], device=self.device)
        if self.world > 1:
            dist.all_reduce(values, op=dist.ReduceOp.MAX)
        return [bool(v) for v in values.tolist()]

    def micro_batches(
        self, groups: list[RolloutGroup]
    ) -> tuple[list[MicroBatch], dict[str, float]]:
        # Advantages are host-side bookkeeping: they reach the device inside `collate`.
        rewards = torch.tensor([[c.reward for c in g.completions] for g in groups], device="cpu")
        advantages, stats = group_advantages(rewards, self.algorithm)
        kept = [g for g, keep in zip(groups, stats.keep.tolist(), strict=True) if keep]
        samples = flatten(kept, advantages[stats.keep])
        pad_id = self.tokenizer.pad_token_id
        batches = [
            collate(chunk, pad_id, self.device)
            for chunk in pack(samples, self.config.micro_batch_tokens)
        ]
        # Every rank must run the same number of forward/backward passes (ZeRO collectives).
        count = torch.tensor([len(batches)], device=self.device)
        if self.world > 1:
            dist.all_reduce(count, op=dist.ReduceOp.MAX)
        batches += [empty_batch(pad_id, self.device)] * (int(count) - len(batches))
        return batches, batch_metrics(groups, self.progress.policy_version, stats)

    # ------------------------------------------------------------ one step

    def train_step(self, groups: list[RolloutGroup]) -> dict[str, float]:
        started = time.perf_counter()
        batches, metrics = self.micro_batches(groups)
        totals = torch.tensor(
            [
                float(sum(b.num_tokens for b in batches)),
                float(sum(int(b.loss_mask.any(1).sum()) for b in batches)),
            ],
            device=self.device,
        )
        if self.world > 1:
            dist.all_reduce(totals)
        # DeepSpeed averages gradients over ranks; scaling by world size turns that average
        # back into the global-batch normalisation the loss asks for.
        total_tokens, total_sequences = (totals / self.world).tolist()
        self.progress.step += 1
        metrics["skipped_update"] = float(not self.has_signal(batches))
        if metrics["skipped_update"]:
            # Adam would keep moving the weights on its momentum with a zero gradient:
            # a batch with nothing to learn from must not change the policy at all.
            metrics["grad_norm"] = 0.0
        else:
            metrics.update(self.update(batches, total_tokens, total_sequences))
        metrics["lr"] = float(self.engine.get_lr()[0])
        elapsed = time.perf_counter() - started
        metrics["step_time_s"] = elapsed
        metrics["tokens_per_s"] = totals[0].item() / max(elapsed, 1e-9)
        return metrics

    def update(
        self, batches: list[MicroBatch], total_tokens: float, total_sequences: float
    ) -> dict[str, float]:
        """Forward and backward over every micro-batch, then one optimizer step."""
        means = WeightedMeans()
        self.engine.train()
        for i, batch in enumerate(batches):
            self.engine.set_gradient_accumulation_boundary(i == len(batches) - 1)
            loss, loss_metrics = self.forward_loss(batch, total_tokens, total_sequences)
            self.engine.backward(loss, scale_wrt_gas=False)
            # Teacher metrics average over the tokens of the rows that have a teacher.
            by_teacher = dict.fromkeys(TEACHER_METRICS, batch.teacher_tokens)
            means.add(loss_metrics, weight=batch.num_tokens, weights=by_teacher)
        norm_before_step = local_grad_norm(self.engine)
        self.engine.step()
        metrics = means.result(self.world, self.device)
        reported = self.engine.get_global_grad_norm()
        metrics["grad_norm"] = float(reported if reported is not None else norm_before_step or 0)
        return metrics

    def has_signal(self, batches: list[MicroBatch]) -> bool:
        """Whether any rank's batch carries a gradient: a non-zero advantage on a loss token,
        or a term that does not depend on advantages (KDRL's KD, the KL penalty)."""
        if isinstance(self.algorithm, KdrlConfig) or self.algorithm.kl_beta > 0:
            return True
        return self.any_rank(
            any(bool((b.advantages != 0).any()) and b.num_tokens > 0 for b in batches)
        )

    def any_rank(self, local: bool) -> bool:
        """Whether `local` holds on any rank: decisions that lead into a collective must be
        the same on every rank."""
        return self.agree(local)[0]

    def forward_loss(
        self, batch: MicroBatch, total_tokens: float, total_sequences: float
    ) -> tuple[torch.Tensor, dict[str, float]]:
        logprobs, entropy = sequence_logprobs(
            self.engine,
            batch.input_ids,
            batch.attention_mask,
            self.temperature,
            with_entropy=True,
        )
        ref = None
        if self.ref_model is not None:
            with torch.no_grad():
                ref, _ = sequence_logprobs(
                    self.ref_model, batch.input_ids, batch.attention_mask, self.temperature
                )
        inputs = LossInputs(
            trainer_logprobs=logprobs,
            # One optimizer step per batch: the weights at the start of the step are the
            # weights of this very forward, so its detached logprobs ARE logp_old, exactly.
            old_logprobs=logprobs.detach(),
            rollout_logprobs=batch.rollout_logprobs,
            teacher_logprobs=batch.teacher_logprobs,
            has_teacher=batch.has_teacher,
            ref_logprobs=ref,
            advantages=batch.advantages,
            loss_mask=batch.loss_mask,
            correct=batch.correct,
            entropy=entropy,
        )
        return policy_loss(
            inputs, self.algorithm, self.progress.step, total_tokens, total_sequences
        )

    # ------------------------------------------------------------ weights and state

    def from_main(self, value: int) -> int:
        """Rank 0's `value`, on every rank."""
        if self.world == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.long, device=self.device)
        dist.broadcast(tensor, src=0)
        return int(tensor.item())

    def push_weights(self) -> PushReport | None:
        """Collective: every rank moves to rank 0's next version and takes part in the push.
        Rank 0 sends the probe; at ZeRO-3 its forward pass gathers the parameters from all
        ranks, so every rank runs it."""
        if not self.sync.enabled:
            return None
        version = self.from_main(self.progress.policy_version + 1)
        probe = None
        if self.is_main or self.config.zero_stage == 3:
            probe = make_probe(self.engine.module, self.probe_ids, atol=self.probe_atol)
        report = self.sync.push(version, probe)
        self.progress.policy_version = version
        return report

    def audit(self, groups: list[RolloutGroup]) -> None:
        """Append which groups this step trained on (per rank), to audit exactly-once."""
        line = {
            "step": self.progress.step,
            "rank": self.rank,
            "policy_version": self.progress.policy_version,
            "groups": [g.group_id for g in groups],
        }
        with (self.folder / "trained_groups.jsonl").open("a") as f:
            f.write(json.dumps(line) + "\n")

    def publish_state(self) -> None:
        if self.is_main:  # one writer: every rank holds the same step and version
            self.queue.publish_trainer_state(self.progress.step, self.progress.policy_version)

    def save_checkpoint(self) -> None:
        """Collective. The checkpoint lists the groups of every rank, so that each rank,
        resuming, acknowledges its own pending groups that it contains."""
        everyone = self.progress.consumed
        if self.world > 1:
            gathered: list[list[str] | None] = [None] * self.world
            dist.all_gather_object(gathered, self.progress.consumed)
            everyone = [message for ids in gathered for message in ids or []]
        prompts = self.queue.prompt_low_water(set(everyone)) if self.is_main else 0
        saved = self.progress.model_copy(update={"consumed": everyone, "prompt_cursor": prompts})
        checkpoint.save(
            self.engine, self.ckpt_dir, saved, self.config.keep_checkpoints, self.is_main
        )
        if self.world > 1:
            # No rank acknowledges before rank 0 has made the checkpoint the newest one.
            dist.barrier()
        self.queue.ack(SCORED, self.progress.consumed, counter="trained")
        self.progress.consumed = []

    def export(self, folder: Path) -> None:
        """The student in Hugging Face format (rank 0; at ZeRO-3 every rank gathers)."""
        if self.config.zero_stage == 3 or self.is_main:
            state = full_state_dict(self.engine, self.config.zero_stage)
        if self.is_main:
            self.engine.module.save_pretrained(folder, state_dict=state, safe_serialization=True)
            self.tokenizer.save_pretrained(folder)

    # ------------------------------------------------------------ the loop

    def train(self) -> None:
        share = max(1, self.config.batch_prompts // self.world)
        self.publish_state()
        while self.progress.step < self.config.steps:
            deliveries, stop = self.collect(share)
            if stop:  # every rank stops at the same step
                break
            groups = [d.group for d in deliveries if d.group is not None]
            metrics = self.train_step(groups)
            self.progress.consumed += [d.message_id for d in deliveries]
            self.audit(groups)
            pushed = self.push_weights()
            if pushed is not None:
                metrics.update(pushed.metrics())
            metrics["policy_version"] = float(self.progress.policy_version)
            self.publish_state()
            if self.is_main:
                self.sink.log(self.progress.step, metrics)
            if self.progress.step % self.config.checkpoint_every == 0:
                self.save_checkpoint()
        if self.any_rank(bool(self.progress.consumed)):
            self.save_checkpoint()
        self.export(self.folder / "final")
        self.sink.close()
        self.sync.close()
