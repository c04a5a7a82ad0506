"""Reliability of the environment service under clients that leave, answers that stall math-verify,
and schema-driven clients; each test runs the real GSM8K service as a process over loopback.

Run under ``loopback-only`` (see tests/servers.py).
"""

from __future__ import annotations

import socket
import threading
import time

import pytest
import requests

from recipe.atropos import wire
from recipe.atropos.tests.servers import LOOPBACK_HOST
from recipe.atropos.tests.test_env_service import EVALUATE, assert_error, health, post, start_service


@pytest.fixture(scope="module")
def service():
    with start_service() as service:
        yield service


def _wait_for(predicate, what: str, timeout_s: float = 30.0):
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout_s} s"
        time.sleep(0.05)


@pytest.mark.timeout(60)
def test_a_client_leaving_while_its_body_is_read_is_abandoned_not_a_500(service):
    """An ordinary client timeout mid-upload is counted in requests_abandoned: no 500, no traceback."""
    before = health(service)
    body = wire.encode({"prompts": ["p"] * 200, "responses": ["\\boxed{1}"] * 200, "ground_truths": ["1"] * 200})
    for path in (EVALUATE, "/register_inference_endpoint"):
        with socket.create_connection((LOOPBACK_HOST, service.port), timeout=10) as raw:
            head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
            raw.sendall(head.encode() + body[: len(body) // 3])
            time.sleep(0.3)  # the service is now reading the body
    after = _wait_for(
        lambda: (h := health(service))["requests_abandoned"] >= before["requests_abandoned"] + 2 and h,
        "counting both abandoned requests",
    )
    assert "500" not in after["errors_by_status"], after["errors_by_status"]
    assert after["errors"] == before["errors"]  # an abandoned request is not an error of the service
    log = service.log_text()
    assert "evaluation failed" not in log and "Traceback" not in log, log[-3000:]
    assert post(service, {"prompts": ["p"], "responses": ["\\boxed{1}"], "ground_truths": ["1"]}).status_code == 200
