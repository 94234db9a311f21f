"""`Admission`: work is held while it runs, 413 for what could never fit, 429 with a
Retry-After that is the excess over the throughput measured while busy."""

from __future__ import annotations

import pytest

from services.common import admission as admission_module
from services.common.admission import Admission
from services.common.http_server import ApiError


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(admission_module.time, "monotonic", fake)
    return fake


def test_work_is_held_while_it_runs_and_released_after(clock: Clock) -> None:
    admission = Admission(capacity=100, unit="tokens")
    with admission.hold(60):
        assert (admission.admitted, admission.requests) == (60, 1)
        with pytest.raises(ApiError) as refused, admission.hold(41):
            pass
        assert refused.value.status == 429
        with admission.hold(40):
            assert admission.admitted == 100
    assert (admission.admitted, admission.requests) == (0, 0)
    with pytest.raises(RuntimeError), admission.hold(100):  # a failure releases it too
        raise RuntimeError("engine failed")
    assert admission.admitted == 0


def test_what_could_never_fit_is_413_not_429(clock: Clock) -> None:
    with pytest.raises(ApiError) as caught, Admission(100, "tokens").hold(101):
        pass
    assert (caught.value.status, caught.value.type) == (413, "too_large")
    assert "101 tokens of work" in caught.value.message


def test_retry_after_is_the_excess_over_the_measured_throughput(clock: Clock) -> None:
    admission = Admission(capacity=1000, unit="tokens")
    with admission.hold(500):
        clock.now += 5  # 500 tokens in 5 busy seconds: 100 tokens/s
    clock.now += 100  # idle time does not lower the throughput
    assert admission.throughput == pytest.approx(100, rel=0.01)
    with admission.hold(800), pytest.raises(ApiError) as refused, admission.hold(500):
        pass
    # 800 + 500 - 1000 = 300 tokens too many, at 100 tokens/s: 3 s
    assert refused.value.headers == {"Retry-After": "3"}
    assert "retry in 3s" in refused.value.message


def test_without_a_measurement_or_past_a_minute_the_estimate_is_bounded(clock: Clock) -> None:
    admission = Admission(capacity=10, unit="tokens")
    assert admission.retry_after_s(100) == 1  # nothing measured yet
    with admission.hold(10):
        clock.now += 1000  # 10 tokens in 1000 s
    with admission.hold(10):
        assert admission.retry_after_s(10) == 60
