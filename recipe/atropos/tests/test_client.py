"""AtroposEnvironmentClient over real HTTP on loopback (nothing mocked).

Three kinds of servers: the fault-injecting server of fault_server.py (in a thread of this
process), atroposlib's real ``run-api`` (a uvicorn process) for the trajectory methods, and this
project's environment service (a process) when it exists.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests

from recipe.atropos import protocol, wire
from recipe.atropos.datatypes import EvaluationResult, InvalidSample, TrajectoryInfo, TrajectoryStatus
from recipe.atropos.errors import AtroposAPIError, AtroposProtocolError, AtroposRequestError, AtroposUnavailableError
from recipe.atropos.evaluate.client import AtroposEnvironmentClient
from recipe.atropos.trajectory.runapi_client import AtroposRunAPIClient
from recipe.atropos.tests.fault_server import Fault, FaultInjectingServer
from recipe.atropos.tests.servers import (
    REPO_ROOT,
    find_free_loopback_port,
    start_atropos_run_api,
    start_server_process,
)

EVALUATE = protocol.EVALUATE_PATH
FAST = {"retry_delay": 0.01, "timeout": 5.0, "max_wait_time": 10.0}

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def server():
    with FaultInjectingServer() as running:
        yield running


def make_client(url: str, **options) -> AtroposEnvironmentClient:
    return AtroposEnvironmentClient(url, **{**FAST, **options})


def small_batch(**extra):
    """Two groups of two samples; the fault server scores by response length."""
    return dict(prompts=["p0", "p0", "p1", "p1"], responses=["a", "bbb", "cc", "cc"], **extra)


# --------------------------------------------------------------------------------------------
# Normal operation
# --------------------------------------------------------------------------------------------


def test_health_check_is_true_and_records_what_the_service_offers(server):
    client = make_client(server.url)
    assert client.health_check() is True
    assert client.service_info["env"] == "fault-server"
    assert wire.MSGPACK in client.service_encodings


@pytest.mark.parametrize(
    "fault",
    [
        Fault(status=200, body={"status": "starting"}),
        Fault(status=503),
        Fault(status=200, body=b"<html>proxy</html>", content_type="text/html"),
    ],
    ids=["status-not-ok", "503", "not-json"],
)
def test_health_check_is_false_when_not_ok_and_tries_once(server, fault):
    server.inject("/health", fault, times=5)
    client = make_client(server.url, retry_attempts=5)
    assert client.health_check() is False
    assert len(server.requests_to("/health")) == 1
    assert client.stats.failures == 1 and client.service_encodings == ()


def test_health_check_is_false_quickly_when_nothing_listens():
    client = make_client(f"http://127.0.0.1:{find_free_loopback_port()}", retry_attempts=5, retry_delay=1.0)
    started = time.monotonic()
    assert client.health_check() is False
    # One try: a retry would add retry_delay (1 s). Measured over 230 runs on 2 cores at load 12-20: at
    # most 0.08 s; P(>= 1 s) < 1e-12 by an exponential tail fitted to the slowest tenth (issue 25).
    assert time.monotonic() - started < 1.0


def test_evaluate_returns_validated_typed_result(server):
    client = make_client(server.url)
    result = client.evaluate_and_compute_advantages(
        **small_batch(response_lengths=[3, 4, 5, 0]), metadata={"step": 7}, group_ids=[0, 0, 1, 1]
    )
    assert isinstance(result, EvaluationResult)
    assert result.scores.dtype == np.float64 and result.scores.tolist() == [1.0, 3.0, 2.0, 2.0]
    assert [len(a) for a in result.advantages] == [3, 4, 5, 0]
    assert all(isinstance(a, np.ndarray) and a.dtype == np.float32 for a in result.advantages)
    assert result.advantages[0][0] < 0 < result.advantages[1][0]
    assert result.metrics == {"mean_reward": 2.0, "batch_size": 4.0}
    assert set(result.raw) >= {"advantages", "scores", "metrics"}
    sent = wire.decode(server.requests_to(EVALUATE)[0].body)
    assert sent["metadata"] == {"step": 7} and sent["group_ids"] == [0, 0, 1, 1]


def test_without_token_counts_advantages_are_sequence_level_floats(server):
    result = make_client(server.url).evaluate_and_compute_advantages(**small_batch())
    assert all(isinstance(a, float) for a in result.advantages)


def test_one_session_reuses_the_connection(server):
    client = make_client(server.url)
    for _ in range(3):
        client.evaluate_and_compute_advantages(**small_batch())
    assert len({r.client_port for r in server.requests_to(EVALUATE)}) == 1


def test_api_key_is_sent_as_bearer_token(server):
    make_client(server.url, api_key="sekrit").evaluate_and_compute_advantages(**small_batch())
    assert server.requests_to(EVALUATE)[0].headers["authorization"] == "Bearer sekrit"


def test_register_inference_endpoint_true_false_on_404_and_raises_on_400(server):
    client = make_client(server.url)
    assert client.register_inference_endpoint("http://127.0.0.1:9/v1", "tiny", api_key=None) is True
    sent = wire.decode(server.requests_to("/register_inference_endpoint")[0].body)
    assert sent == {"base_url": "http://127.0.0.1:9/v1", "model": "tiny", "api_key": None}

    server.inject("/register_inference_endpoint", Fault(status=404, body=b"Not Found", content_type="text/plain"))
    assert client.register_inference_endpoint("http://127.0.0.1:9/v1", "tiny") is False

    server.inject("/register_inference_endpoint", Fault(status=400))
    with pytest.raises(AtroposRequestError) as raised:
        client.register_inference_endpoint("http://127.0.0.1:9/v1", "tiny")
    assert raised.value.status == 400


# --------------------------------------------------------------------------------------------
# Encoding negotiation
# --------------------------------------------------------------------------------------------


def token_batch(lengths=(3, 4, 5, 2)):
    ids = [np.arange(n, dtype=np.int64) + 10 for n in lengths]
    return small_batch(response_token_ids=ids)


def test_sends_json_until_a_health_check_saw_msgpack_then_msgpack(server):
    client = make_client(server.url)
    client.evaluate_and_compute_advantages(**token_batch())
    client.health_check()
    client.evaluate_and_compute_advantages(**token_batch())
    first, second = server.requests_to(EVALUATE)
    assert first.headers["content-type"] == wire.JSON
    assert second.headers["content-type"] == wire.MSGPACK
    assert wire.accepts_msgpack(first.headers["accept"]) and second.headers["accept-encoding"] == "identity"
    ids = wire.decode(second.body, wire.MSGPACK)["response_token_ids"]
    assert all(isinstance(a, np.ndarray) and a.dtype == np.int32 for a in ids)


def test_auto_keeps_json_for_requests_without_token_arrays(server):
    client = make_client(server.url)
    assert client.health_check()
    client.evaluate_and_compute_advantages(**small_batch())
    assert server.requests_to(EVALUATE)[0].headers["content-type"] == wire.JSON


def test_json_only_service_gets_json_and_answers_decode():
    with FaultInjectingServer(encodings=[wire.JSON]) as json_only:
        client = make_client(json_only.url)
        assert client.health_check()
        result = client.evaluate_and_compute_advantages(**token_batch())
        assert json_only.requests_to(EVALUATE)[0].headers["content-type"] == wire.JSON
        assert [len(a) for a in result.advantages] == [3, 4, 5, 2]


@pytest.mark.parametrize(("encoding", "request_type"), [("msgpack", wire.MSGPACK), ("json", wire.JSON)])
def test_explicit_encoding_choice(server, encoding, request_type):
    result = make_client(server.url, encoding=encoding).evaluate_and_compute_advantages(**token_batch())
    recorded = server.requests_to(EVALUATE)[0]
    assert recorded.headers["content-type"] == request_type
    assert wire.accepts_msgpack(recorded.headers["accept"]) == (encoding == "msgpack")
    assert [len(a) for a in result.advantages] == [3, 4, 5, 2]


@pytest.mark.timeout(120)
def test_large_msgpack_batch_round_trips(server):
    batch_size, length = 1024, 2048
    ids = [np.full(length, i, dtype=np.int32) for i in range(batch_size)]
    client = make_client(server.url, timeout=60.0, max_wait_time=100.0)
    assert client.health_check()
    started = time.monotonic()
    result = client.evaluate_and_compute_advantages(
        ["p"] * batch_size, ["r" * (i % 7) for i in range(batch_size)], response_token_ids=ids
    )
    elapsed = time.monotonic() - started
    assert server.requests_to(EVALUATE)[0].headers["content-type"] == wire.MSGPACK
    assert len(server.requests_to(EVALUATE)[0].body) < batch_size * length * 4 * 1.01
    assert all(len(a) == length for a in result.advantages)
    # How long is a measurement, not a check (a loaded machine is slower): printed, never asserted.
    print(f"1024 x 2048 tokens round trip (msgpack): {elapsed:.2f} s")


# --------------------------------------------------------------------------------------------
# Retries
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [500, 502, 503, 408, 429])
def test_retryable_statuses_are_retried_until_success(server, status):
    server.inject(EVALUATE, Fault(status=status), times=2)
    client = make_client(server.url, retry_attempts=5)
    result = client.evaluate_and_compute_advantages(**small_batch())
    assert len(result.scores) == 4
    assert len(server.requests_to(EVALUATE)) == 3
    assert client.stats.requests == 1 and client.stats.retries == 2 and client.stats.failures == 0


def test_gives_up_after_retry_attempts_and_says_why(server):
    server.inject(EVALUATE, Fault(status=503, body={"error": {"code": "warming_up", "message": "model loading"}}), 10)
    client = make_client(server.url, retry_attempts=3)
    with pytest.raises(AtroposUnavailableError) as raised:
        client.evaluate_and_compute_advantages(**small_batch())
    error = raised.value
    assert len(server.requests_to(EVALUATE)) == 3
    assert error.attempts == 3 and error.last_status == 503
    for needle in ("3 attempts", "retry_attempts=3", "503", "warming_up", "model loading", EVALUATE):
        assert needle in str(error)
    assert error.elapsed_s > 0 and f"{error.elapsed_s:.2f} s" in str(error)
    assert client.stats.failures == 1 and client.stats.retries == 2


@pytest.mark.parametrize("status", [400, 401, 404, 409, 413, 422])
def test_other_4xx_are_raised_at_once_with_the_service_message(server, status):
    message = f"prompts has 4 items, responses has 3 ({status})"
    server.inject(EVALUATE, Fault(status=status, body={"error": {"code": "bad_thing", "message": message}}), 5)
    client = make_client(server.url, retry_attempts=5)
    with pytest.raises(AtroposRequestError) as raised:
        client.evaluate_and_compute_advantages(**small_batch())
    assert len(server.requests_to(EVALUATE)) == 1
    assert raised.value.status == status and raised.value.code == "bad_thing"
    assert raised.value.service_message == message and message in str(raised.value)
    assert client.stats.retries == 0 and client.stats.failures == 1


def test_4xx_with_a_non_protocol_body_still_names_it(server):
    server.inject(EVALUATE, Fault(status=400, body=b"nginx says no", content_type="text/plain"))
    with pytest.raises(AtroposRequestError, match="HTTP 400: nginx says no"):
        make_client(server.url).evaluate_and_compute_advantages(**small_batch())


def test_retry_after_is_honoured(server):
    server.inject(EVALUATE, Fault(status=429, headers={"Retry-After": "1"}))
    client = make_client(server.url, retry_delay=0.01)
    client.evaluate_and_compute_advantages(**small_batch())
    first, second = server.requests_to(EVALUATE)
    assert second.received_at - first.received_at >= 0.95


def test_retry_after_beyond_the_budget_gives_up_without_waiting(server):
    server.inject(EVALUATE, Fault(status=429, headers={"Retry-After": "30"}), times=5)
    client = make_client(server.url, retry_attempts=5, max_wait_time=2.0)
    started = time.monotonic()
    with pytest.raises(AtroposUnavailableError) as raised:
        client.evaluate_and_compute_advantages(**small_batch())
    # Waiting would take the 2 s budget (or the 30 s asked for). 230 runs on 2 cores at load 12-20: at
    # most 0.19 s; P(>= 1 s) < 1e-12 by an exponential tail fitted to the slowest tenth (issue 25).
    assert time.monotonic() - started < 1.0
    assert len(server.requests_to(EVALUATE)) == 1
    assert "Retry-After" in str(raised.value) and "429" in str(raised.value)


def test_slow_answer_times_out_and_the_retry_succeeds(server):
    server.inject(EVALUATE, Fault(delay_s=2.0))
    client = make_client(server.url, timeout=0.3)
    started = time.monotonic()
    client.evaluate_and_compute_advantages(**small_batch())
    # Below the 2 s the slow answer takes: the client gave up on it. 230 runs on 2 cores at load 12-20:
    # at most 0.61 s; P(>= 1.9 s) < 1e-12 by an exponential tail fitted to the slowest tenth (issue 25).
    assert time.monotonic() - started < 1.9
    assert client.stats.retries == 1


def test_max_wait_time_bounds_total_time_against_a_slow_server(server):
    server.inject(EVALUATE, Fault(delay_s=3.0), times=100)
    client = make_client(server.url, timeout=10.0, retry_attempts=100, max_wait_time=0.8)
    started = time.monotonic()
    with pytest.raises(AtroposUnavailableError) as raised:
        client.evaluate_and_compute_advantages(**small_batch())
    elapsed = time.monotonic() - started
    # The budget was spent (>= 0.8 s less rounding) and bounded the wait: without it the first answer
    # alone takes 3 s. 230 runs on 2 cores at load 12-20: 0.80-1.02 s; P(>= 2.5 s) < 1e-12 by an
    # exponential tail fitted to the slowest tenth (issue 25).
    assert 0.7 <= elapsed < 2.5
    assert "max_wait_time=0.8 s spent" in str(raised.value) and "no answer within" in str(raised.value)


def test_max_wait_time_bounds_total_time_against_a_failing_server(server):
    server.inject(EVALUATE, Fault(status=503), times=1000)
    client = make_client(server.url, retry_attempts=1000, retry_delay=0.02, max_wait_time=0.6)
    started = time.monotonic()
    with pytest.raises(AtroposUnavailableError) as raised:
        client.evaluate_and_compute_advantages(**small_batch())
    elapsed = time.monotonic() - started
    # Without the budget: 1000 attempts, 0.02 s apart or more, 20 s at least. 230 runs on 2 cores at
    # load 12-20: at most 0.75 s; P(>= 5 s) < 1e-12 by an exponential tail fitted to the slowest tenth.
    assert elapsed < 5.0
    assert 2 < raised.value.attempts < 1000 and raised.value.attempts == len(server.requests_to(EVALUATE))
    assert "max_wait_time=0.6 s spent" in str(raised.value)


def test_connection_refused_is_retried_then_named():
    client = make_client(f"http://127.0.0.1:{find_free_loopback_port()}", retry_attempts=3)
    with pytest.raises(AtroposUnavailableError) as raised:
        client.evaluate_and_compute_advantages(**small_batch())
    assert raised.value.attempts == 3 and raised.value.last_status is None
    assert "Connection refused" in str(raised.value) and "3 attempts" in str(raised.value)
    assert isinstance(raised.value.__cause__, requests.ConnectionError)


def test_dropped_connection_is_retried(server):
    server.inject(EVALUATE, Fault(drop_connection=True))
    client = make_client(server.url)
    client.evaluate_and_compute_advantages(**small_batch())
    assert client.stats.retries == 1 and len(server.requests_to(EVALUATE)) == 2


def test_server_that_dies_mid_test_and_comes_back(server):
    client = make_client(server.url, retry_attempts=50, retry_delay=0.05, max_wait_time=15.0)
    client.evaluate_and_compute_advantages(**small_batch())
    server.stop()

    down_client = make_client(server.url, retry_attempts=2)
    with pytest.raises(AtroposUnavailableError, match="Connection refused"):
        down_client.evaluate_and_compute_advantages(**small_batch())

    restarter = threading.Timer(0.5, server.start)
    restarter.start()
    try:
        result = client.evaluate_and_compute_advantages(**small_batch())
    finally:
        restarter.join()
    assert len(result.scores) == 4
    assert client.stats.retries >= 1 and client.stats.failures == 0 and client.stats.requests == 2


# --------------------------------------------------------------------------------------------
# Malformed answers and invalid requests
# --------------------------------------------------------------------------------------------

GOOD = {"advantages": [0.5, -0.5, None, [1.0, 2.0]], "scores": [1.0, 0.0, 1.0, 0.5], "metrics": {"acc": 0.5}}


@pytest.mark.parametrize(
    ("body", "field", "needles"),
    [
        (b"{not json", "body", ["JSON", "9 bytes"]),
        ([1, 2], "body", ["expected an object", "list"]),
        ({**GOOD, "advantages": [0.5, -0.5, None]}, "advantages", ["has 3 items, expected 4"]),
        ({k: v for k, v in GOOD.items() if k != "scores"}, "scores", ["scores: missing"]),
        ({**GOOD, "scores": {"a": 1}}, "scores", ["scores: expected a list of 4 items", "dict"]),
        ({**GOOD, "metrics": [0.5]}, "metrics", ["metrics", "list"]),
    ],
    ids=lambda value: value if isinstance(value, str) else None,
)
def test_malformed_200_bodies_raise_protocol_errors_naming_the_field(server, body, field, needles):
    server.inject(EVALUATE, Fault(status=200, body=body), times=3)
    client = make_client(server.url)
    with pytest.raises(AtroposProtocolError) as raised:
        client.evaluate_and_compute_advantages(**small_batch())
    assert raised.value.field == field
    for needle in needles:
        assert needle in str(raised.value)
    assert len(server.requests_to(EVALUATE)) == 1  # not retried
    assert (client.stats.requests, client.stats.failures, client.stats.retries) == (1, 1, 0)


def test_protocol_error_carries_sizes(server):
    server.inject(EVALUATE, Fault(status=200, body={**GOOD, "scores": [1.0, 2.0]}))
    with pytest.raises(AtroposProtocolError) as raised:
        make_client(server.url).evaluate_and_compute_advantages(**small_batch())
    assert (raised.value.expected, raised.value.actual) == (4, 2)


@pytest.mark.parametrize(
    ("field", "item", "reason", "needle"),
    [
        ("advantages", "up", "malformed", "advantages[1]: expected a list of numbers, a number or null, got str"),
        ("advantages", [1.0, "x"], "malformed", "advantages[1][1]: expected a number, got str"),
        ("advantages", [[1.0], [2.0]], "malformed", "advantages[1][0]: expected a number, got list"),
        ("advantages", [1.0, float("nan")], "non_finite", "advantages[1][1]: nan is not finite"),
        ("advantages", float("inf"), "non_finite", "advantages[1]: inf is not finite"),
        ("advantages", [1e300, 1.0], "out_of_range", "advantages[1][0]: 1e+300 is beyond float32"),
        ("scores", "high", "malformed", "scores[1]: 'high' is not a finite number"),
        ("scores", None, "malformed", "scores[1]: None is not a finite number"),
        ("scores", float("nan"), "non_finite", "scores[1]: nan is not a finite number"),
    ],
)
def test_one_bad_sample_is_kept_in_place_not_the_whole_answer_rejected(server, field, item, reason, needle):
    """docs/evaluate_mode.md: a bad sample costs that sample; the client marks it, the others stay usable."""
    body = {**GOOD, "metrics": {"acc": 0.5, "note": "text"}}
    body[field] = list(body[field])
    body[field][1] = item
    server.inject(EVALUATE, Fault(status=200, body=body, content_type=wire.MSGPACK))
    client = make_client(server.url)
    result = client.evaluate_and_compute_advantages(**small_batch())
    if field == "advantages":
        assert isinstance(result.advantages[1], InvalidSample) and result.advantages[1].reason == reason
        assert needle in result.advantages[1].message
        assert not np.isnan(result.scores).any()
    else:
        assert np.isnan(result.scores[1]) and result.invalid_scores[1].reason == reason
        assert needle in result.invalid_scores[1].message
        assert result.advantages[1] == -0.5
    assert result.advantages[0] == 0.5 and result.advantages[2] is None and result.scores[0] == 1.0
    assert result.metrics == {"acc": 0.5} and result.ignored_metrics == ("note",)
    assert (client.stats.requests, client.stats.failures) == (1, 0)


def test_msgpack_answers_with_mixed_advantages_are_accepted(server):
    body = {**GOOD, "advantages": [0.5, np.array([1.0, 2.0], dtype=np.float32), None, 3]}
    server.inject(EVALUATE, Fault(status=200, body=body, content_type=wire.MSGPACK))
    result = make_client(server.url).evaluate_and_compute_advantages(**small_batch())
    assert result.advantages[0] == 0.5 and result.advantages[2] is None and result.advantages[3] == 3.0
    np.testing.assert_array_equal(result.advantages[1], [1.0, 2.0])
    result.advantages[1][0] = 0.0  # writable, so callers can hand it to torch without a warning


@pytest.mark.parametrize(
    ("arguments", "needles"),
    [
        (dict(prompts=["a", "b"], responses=["x"]), ["responses has 1 items but prompts has 2"]),
        (dict(prompts=[], responses=[]), ["prompts", "at least 1 item"]),
        (dict(prompts=["a"], responses=[3]), ["responses[0]", "valid string (got int 3)"]),
        (dict(prompts=["a", "b"], responses=["x", "y"], group_ids=[1]), ["group_ids has 1 items"]),
        (dict(prompts=["a"], responses=["x"], ground_truths=[1]), ["ground_truths[0]", "(got int 1)"]),
        (dict(prompts=["a"], responses=["x"], response_token_ids=[[1], [2]]), ["response_token_ids has 2 items"]),
        (dict(prompts=["a"], responses=["x"], response_token_ids=[[1.5]]), ["response_token_ids[0]", "float64"]),
        (dict(prompts=["a"], responses=["x"], response_token_ids=[[-1]]), ["response_token_ids[0]", "[-1, -1]"]),
        (dict(prompts=["a"], responses=["x"], response_lengths=[-2]), ["response_lengths[0]", "-2"]),
        (
            dict(prompts=["a"], responses=["x"], response_token_ids=[[1, 2]], response_lengths=[3]),
            ["response_lengths[0] is 3", "response_token_ids[0] has 2 tokens"],
        ),
        (dict(prompts=["a"], responses=["x"], metadata=["step"]), ["metadata", "valid dictionary (got list)"]),
        (dict(prompts=["a"], responses=["x"], metadata={"when": object()}), ["cannot encode", "object"]),
    ],
)
def test_requests_are_validated_before_sending(server, arguments, needles):
    with pytest.raises(AtroposRequestError) as raised:
        make_client(server.url).evaluate_and_compute_advantages(**arguments)
    assert raised.value.status is None
    for needle in needles:
        assert needle in str(raised.value)
    assert server.requests_to(EVALUATE) == []


def test_every_exception_is_an_atropos_api_error():
    for error_type in (AtroposUnavailableError, AtroposRequestError, AtroposProtocolError):
        assert issubclass(error_type, AtroposAPIError)


# --------------------------------------------------------------------------------------------
# Counters and logs
# --------------------------------------------------------------------------------------------


def test_counters_track_requests_retries_failures_and_latency(server):
    client = make_client(server.url, retry_attempts=2)
    server.inject(EVALUATE, Fault(status=503))
    server.inject(EVALUATE, Fault(delay_s=0.1))
    client.evaluate_and_compute_advantages(**small_batch())  # retried once, slow success
    first_latency = client.stats.last_latency_s
    client.evaluate_and_compute_advantages(**small_batch())
    server.inject(EVALUATE, Fault(status=400))
    with pytest.raises(AtroposRequestError):
        client.evaluate_and_compute_advantages(**small_batch())

    stats = client.stats
    assert (stats.requests, stats.retries, stats.failures) == (3, 1, 1)
    # The injected 0.1 s delay bounds the first latency from below. The second, undelayed request was
    # not always the faster (slower in 3 of 230 runs on 2 cores at load 12-20): not asserted (issue 25).
    assert first_latency >= 0.1 and stats.last_latency_s > 0
    assert stats.mean_latency_s == pytest.approx((first_latency + stats.last_latency_s) / 2)
    metrics = client.metrics()
    assert metrics["atropos/client/requests"] == 3.0 and metrics["atropos/client/failures"] == 1.0
    assert set(metrics) == {
        f"atropos/client/{name}" for name in ("requests", "retries", "failures", "last_latency_s", "mean_latency_s")
    }


def test_logs_each_attempt_at_debug_and_each_give_up_at_info(server, caplog):
    server.inject(EVALUATE, Fault(status=503), times=3)
    client = make_client(server.url, retry_attempts=3)
    with caplog.at_level(logging.DEBUG, logger="verl.recipe.atropos"):
        with pytest.raises(AtroposUnavailableError):
            client.evaluate_and_compute_advantages(**small_batch())
    ours = [r for r in caplog.records if r.name == "verl.recipe.atropos"]
    attempts = [r for r in ours if r.levelno == logging.DEBUG and "/3 (timeout" in r.getMessage()]
    assert [r.getMessage().split("attempt ")[1].split(" ")[0] for r in attempts] == ["1/3", "2/3", "3/3"]
    give_ups = [r for r in ours if r.levelno == logging.INFO]
    assert len(give_ups) == 1 and "gave up after 3 attempts" in give_ups[0].getMessage()


@pytest.mark.parametrize(
    ("header", "expected"),
    [("2", 2.0), ("0.25", 0.25), ("-3", 0.0), ("soon", None), (None, None), ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0)],
)
def test_retry_after_header_forms(header, expected):
    from recipe.atropos.http_retry import _parse_retry_after

    assert _parse_retry_after(header) == expected


# --------------------------------------------------------------------------------------------
# Trajectory API: retry rules against the fault server, then atroposlib's real run-api
# --------------------------------------------------------------------------------------------


def make_runapi_client(url: str, **options) -> AtroposRunAPIClient:
    return AtroposRunAPIClient(url, **{**FAST, **options})


def test_trajectory_methods_share_the_retry_rules(server):
    client = make_runapi_client(server.url, retry_attempts=3)
    server.inject("/status", Fault(status=503), times=2)
    assert client.status() == TrajectoryStatus(current_step=0, queue_size=0)
    assert len(server.requests_to("/status")) == 3

    server.inject("/batch", Fault(status=400))
    with pytest.raises(AtroposRequestError):
        client.get_batch()
    assert len(server.requests_to("/batch")) == 1

    server.inject("/info", Fault(status=200, body={"batch_size": "big", "max_token_len": 1}))
    with pytest.raises(AtroposProtocolError, match="batch_size: expected an int, got str"):
        client.info()

    # A group whose rows can be counted reaches the conversion, which can drop it alone (trajectory.py).
    malformed = {"tokens": [[1, 2]], "masks": [[1]], "scores": [1.0]}
    server.inject("/batch", Fault(status=200, body={"batch": [malformed]}))
    assert client.get_batch() == [malformed]
    server.inject("/batch", Fault(status=200, body={"batch": [{"tokens": "12", "masks": [[1]], "scores": [1.0]}]}))
    with pytest.raises(AtroposProtocolError, match=r"batch\[0\]\.tokens: expected a list, got str"):
        client.get_batch()


@pytest.fixture(scope="module")
def run_api():
    with start_atropos_run_api() as process:
        yield process


@pytest.mark.timeout(90)
def test_trajectory_api_of_atroposlib_run_api(run_api):
    client = make_runapi_client(run_api.url)
    assert client.info() == TrajectoryInfo(batch_size=-1, max_token_len=-1)
    assert client.status() == TrajectoryStatus(current_step=0, queue_size=0)
    with pytest.raises(AtroposRequestError, match="/register") as raised:
        client.get_batch()
    assert raised.value.code == "not_registered"

    uuid = client.register_trainer(batch_size=4, max_token_len=64, num_steps=10, wandb_project="test")
    assert isinstance(uuid, int) and uuid > 2**64  # a uuid4 as an int, kept exact
    assert client.info() == TrajectoryInfo(batch_size=4, max_token_len=64)
    assert client.get_batch() is None  # nothing scored yet

    # An environment posts two scored groups of two (the real env does this after generating).
    for group in range(2):
        scored = {
            "tokens": [[1, 2, 3], [1, 2, 4, 5]],
            "masks": [[-100, 2, 3], [-100, 2, 4, 5]],
            "scores": [1.0 * group, -1.0],
            "advantages": [[0.0, 0.5, 0.5], [0.0, -0.5, -0.5, -0.5]],
        }
        requests.post(f"{run_api.url}/scored_data", json=scored, timeout=5).raise_for_status()
    assert client.status().queue_size == 2

    batch = client.get_batch()
    assert batch is not None and len(batch) == 2
    assert sum(len(group["tokens"]) for group in batch) == 4
    assert batch[0]["masks"][0][0] == -100 and batch[0]["advantages"][1] == [0.0, -0.5, -0.5, -0.5]
    assert client.status() == TrajectoryStatus(current_step=1, queue_size=0)
    assert client.stats.failures == 1 and client.stats.retries == 0


# --------------------------------------------------------------------------------------------
# This project's environment service (issue 4), when it is there
# --------------------------------------------------------------------------------------------

GSM8K_SERVER = Path("recipe/atropos/environments/gsm8k_server.py")


@pytest.mark.skipif(
    not (REPO_ROOT / GSM8K_SERVER).exists(),
    reason=f"{GSM8K_SERVER} (the environment service of issue 4) is not in the tree yet",
)
@pytest.mark.timeout(120)
class TestEnvironmentService:
    @pytest.fixture(scope="class")
    def service(self):
        port = find_free_loopback_port()
        argv = [sys.executable, str(REPO_ROOT / GSM8K_SERVER), "serve", "--port", str(port)]
        with start_server_process(argv, port=port, startup_timeout_s=90) as process:
            yield process

    def test_health_and_evaluation_follow_the_contract(self, service):
        client = make_client(service.url, timeout=30.0, max_wait_time=60.0)
        assert client.health_check()
        result = client.evaluate_and_compute_advantages(
            prompts=["What is 6 times 7?"] * 2,
            responses=["<think>6*7=42</think> \\boxed{42}", "<think>guess</think> \\boxed{41}"],
            ground_truths=["42", "42"],
            response_token_ids=[[5, 6, 7], [5, 6]],
        )
        assert result.scores.shape == (2,) and result.scores[0] > result.scores[1]
        for advantage, length in zip(result.advantages, (3, 2)):
            assert advantage is None or isinstance(advantage, float) or len(advantage) == length
        assert all(isinstance(value, float) for value in result.metrics.values())

    @pytest.mark.parametrize(
        "body",
        [
            {"prompts": ["a", "b"], "responses": ["x"]},
            {"prompts": [], "responses": []},
            {"prompts": ["a"], "responses": [3]},
            {"prompts": ["a"], "responses": ["x"], "response_lengths": [-2]},
            {"prompts": ["a"], "responses": ["x"], "response_token_ids": [[1, 2]], "response_lengths": [3]},
            {"prompts": ["a"], "responses": ["x"], "response_token_ids": [[1.5]]},
        ],
    )
    def test_the_client_refuses_what_the_service_refuses_with_its_words(self, service, body):
        """One definition of the request: what the client will not send, the service answers 422 for."""
        answer = requests.post(service.url + EVALUATE, json=body, timeout=30)
        assert answer.status_code == 422
        with pytest.raises(AtroposRequestError) as raised:
            make_client(service.url).evaluate_and_compute_advantages(**body)
        assert raised.value.status is None
        assert str(raised.value) == f"invalid request, not sent: {answer.json()['error']['message']}"

    def test_bad_request_is_a_request_error_and_the_service_survives(self, service):
        client = make_client(service.url, timeout=30.0, max_wait_time=60.0, encoding="json")
        with pytest.raises(AtroposRequestError) as raised:
            client._request("POST", EVALUATE, payload={"prompts": ["a", "b"], "responses": ["x"]})
        assert raised.value.status in (400, 422) and raised.value.service_message
        assert client.health_check()
