"""The shared prompt cursor on a real Redis: concurrent claims never overlap, a restore
only moves it forward, the low-water mark a checkpoint keeps is the lowest position still
queued (the checkpoint's own groups aside), and a rollout worker takes exactly the
positions it claimed from the seeded prompt order."""

from __future__ import annotations

import asyncio

import redis

from services.config.task import KKTaskConfig
from services.config.workers import RolloutWorkerConfig
from services.queue.connection import connect_async
from services.queue.keys import ROLLOUTS, SCORED
from services.queue.queues import AsyncQueue, GroupQueue
from services.tasks import load_task
from services.workers.rollout_worker import RolloutWorker
from tests.integration.groups import small_group

RUN = "cursor"


def test_concurrent_claims_never_overlap(redis_url: str, fresh_redis: redis.Redis) -> None:
    async def claims() -> list[int]:
        async with connect_async(redis_url) as a, connect_async(redis_url) as b:
            queues = [AsyncQueue(a, RUN), AsyncQueue(b, RUN)]
            return list(await asyncio.gather(*(queues[i % 2].claim_prompts(3) for i in range(40))))

    firsts = sorted(asyncio.run(claims()))
    assert firsts == list(range(0, 120, 3))


def test_a_restore_only_moves_the_cursor_forward(fresh_redis: redis.Redis) -> None:
    queue = GroupQueue(fresh_redis, RUN)
    assert queue.restore_prompt_cursor(7) == 7  # a new Redis: the checkpoint's position
    assert queue.claim_prompts(2) == 7
    assert queue.restore_prompt_cursor(4) == 9  # this Redis went further: kept
    assert queue.claim_prompts(1) == 9


def test_the_low_water_mark_is_the_lowest_position_still_queued(
    fresh_redis: redis.Redis,
) -> None:
    queue = GroupQueue(fresh_redis, RUN)
    assert queue.prompt_low_water() == 0
    queue.claim_prompts(10)
    assert queue.prompt_low_water() == 10  # nothing queued: the cursor
    ids = {}
    for position, stream in ((6, ROLLOUTS), (3, SCORED), (8, SCORED)):
        group = small_group(position)
        group.prompt_index = position
        ids[position] = queue.publish(stream, group)
    legacy = small_group(99)  # from a worker that did not number its prompts
    queue.publish(SCORED, legacy)
    assert queue.prompt_low_water() == 3
    # The groups a checkpoint contains are trained: they do not hold the mark back.
    assert queue.prompt_low_water(trained={ids[3]}) == 6
    assert queue.prompt_low_water(trained={ids[3], ids[8]}) == 6


def test_a_worker_takes_the_positions_it_claims(redis_url: str, fresh_redis: redis.Redis) -> None:
    task = load_task(KKTaskConfig(people=[2, 3]))
    config = RolloutWorkerConfig(prompts_per_request=2, seed=5)
    order = task.problems("train", seed=config.seed)
    expected = [next(order).prompt_id for _ in range(8)]

    async def take() -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
        async with connect_async(redis_url) as client:
            queue = AsyncQueue(client, RUN)
            mine = RolloutWorker(config, queue, generate=None, task=task, tokenizer=None)
            other = RolloutWorker(config, queue, generate=None, task=task, tokenizer=None)
            taken: tuple[list[tuple[int, str]], list[tuple[int, str]]] = ([], [])
            for worker, into in ((mine, 0), (other, 1), (other, 1), (mine, 0)):
                taken[into].extend((i, p.prompt_id) for i, p in await worker.take_problems())
            return taken

    mine, other = asyncio.run(take())
    assert mine == [(0, expected[0]), (1, expected[1]), (6, expected[6]), (7, expected[7])]
    assert other == [(2, expected[2]), (3, expected[3]), (4, expected[4]), (5, expected[5])]
