"""Progress events, cancellation and deadlines on the embedded backend (runtime/progress.py,
``PosterClient``): one event per step of every loop in order, the same result as without them, a
deadline or a cancel stopping the loop between steps, and the documented answers to bad use."""
from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from posterrt.runtime.client import PosterClient
from posterrt.runtime.errors import DeadlineExceeded, InputError, RequestCancelled
from posterrt.runtime.progress import RunControl

SIZE = (256, 256)


@pytest.fixture(scope="module")
def client(tiny_bundle):
    with PosterClient(tiny_bundle, intra_op_threads=1) as client:
        yield client


def request_fields(seed: int, **overrides) -> dict:
    rng = np.random.default_rng(seed)
    mask = np.zeros((64, 48), np.float32)
    mask[16:48, 12:36] = 1.0
    fields = dict(product=rng.integers(0, 256, (64, 48, 3), dtype=np.uint8), product_mask=mask, texts=["Sale"],
                  size=SIZE, steps=3, layout_steps=4, seed=seed)
    return {**fields, **overrides}


def steps_by_stage(events) -> dict[str, list[tuple[int, int]]]:
    stages: dict[str, list] = {}
    for event in events:
        stages.setdefault(event.stage, []).append((event.step, event.total))
    return stages


@pytest.mark.parametrize("pipeline,expected", [("poster", {"background": 3, "layout": 4}),
                                               ("render", {"plan": 4, "render": 3})])
def test_one_event_per_step_in_order_and_the_same_result(client, pipeline, expected):
    seed = int(np.random.default_rng().integers(1 << 30))
    events = []
    result = client.generate(pipeline=pipeline, progress=events.append, **request_fields(seed))
    stages = steps_by_stage(events)
    assert list(stages) == list(expected), "stages in the pipeline's order"
    for stage, total in expected.items():
        assert stages[stage] == [(step, total) for step in range(1, total + 1)]
    elapsed = [event.elapsed_s for event in events]
    assert elapsed == sorted(elapsed)
    quiet = client.generate(pipeline=pipeline, **request_fields(seed))
    assert np.array_equal(result.image, quiet.image), "progress changes nothing of the result"


def test_a_deadline_stops_the_loop_between_steps(client):
    events = []

    def slow(event):  # each step takes at least 50 ms, so a 0.2 s deadline passes by step 4
        events.append(event)
        threading.Event().wait(0.05)

    with pytest.raises(DeadlineExceeded, match=r"deadline of 0.2 s passed in stage 'background' at step \d+ of 50") as caught:
        client.generate(pipeline="background", progress=slow, timeout=0.2, **request_fields(1, steps=50))
    assert caught.value.stage == "background" and 1 <= caught.value.step < 50
    assert len(events) == caught.value.step, "the loop stopped at the step it reported"


def test_a_cancelled_job_stops_at_its_next_step_and_cancelling_it_again_changes_nothing(client):
    async def run():
        job = client.submit(pipeline="background", **request_fields(2, steps=50))
        seen = []
        async for event in job:
            seen.append(event.step)
            if len(seen) == 2:
                assert job.cancel() is True
        with pytest.raises(RequestCancelled, match="in stage 'background' at step") as caught:
            await job
        return seen, caught.value, job

    seen, error, job = asyncio.run(run())
    assert error.step <= 3 and seen[-1] == error.step, "stopped within one step of the cancel"
    assert job.cancel() is False and job.done(), "a finished job cannot be cancelled; it stays as it ended"
    with pytest.raises(RequestCancelled):
        job.result()


def test_cancelling_a_finished_job_returns_false_and_keeps_its_result(client):
    job = client.submit(pipeline="layout", **request_fields(3))
    result = job.result(timeout=60)
    assert client.cancel(job) is False and job.result() is result


def test_cancelling_the_awaiting_task_cancels_the_request(client):
    async def run():
        started = asyncio.Event()
        task = asyncio.create_task(client.agenerate(pipeline="background", progress=lambda e: loop.call_soon_threadsafe(started.set),
                                                    **request_fields(4, steps=50)))
        loop = asyncio.get_running_loop()
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(run())
    # the thread pool is free again at once: the cancelled request did not run its 50 steps
    assert client.generate(pipeline="layout", timeout=30, **request_fields(5)).elements is not None


@pytest.mark.parametrize("timeout", [0, -1.5, float("nan"), "10"])
def test_a_timeout_must_be_a_positive_number(client, timeout):
    with pytest.raises(InputError, match=r"timeout: got .*, expected a positive number of seconds"):
        client.generate(pipeline="layout", timeout=timeout, **request_fields(6))
    with pytest.raises(InputError, match="timeout"):
        client.submit(pipeline="layout", timeout=timeout, **request_fields(6))


def test_a_raising_progress_callback_stops_the_request_with_its_error(client):
    calls = []

    def broken(event):
        calls.append(event)
        raise ValueError("display went away")

    with pytest.raises(ValueError, match="display went away"):
        client.generate(pipeline="background", progress=broken, **request_fields(7, steps=20))
    assert len(calls) == 1, "the request stopped at the first step"


def test_a_control_outside_a_request_does_nothing():
    control = RunControl()
    control.step("layout", 1, 1)  # no callback, no deadline, not cancelled
    assert control.remaining() is None
