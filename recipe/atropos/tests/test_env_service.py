"""The GSM8K environment service as a real process on a free loopback port, spoken to over HTTP.

Run under ``loopback-only`` (see tests/servers.py). Expected advantages are computed here directly
from the formulas (not with the service's own helpers).
"""

from __future__ import annotations

import gzip
import json
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

import msgpack
import numpy as np
import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from recipe.atropos import protocol, wire
from recipe.atropos.environments.gsm8k import GSM8KConfig
from recipe.atropos.tests.servers import LOOPBACK_HOST, REPO_ROOT, ServerProcess, find_free_loopback_port, port_is_free
from recipe.atropos.tests.test_gsm8k_env import save_tiny_tokenizer

SERVER_FILE = "recipe/atropos/environments/gsm8k_server.py"
EVALUATE = protocol.EVALUATE_PATH
API_KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
EPS = 1e-6


def start_service(*options: str, port: int | None = None, server_file: str = SERVER_FILE) -> ServerProcess:
    port = port or find_free_loopback_port()
    argv = [sys.executable, server_file, "serve", "--slurm", "false", "--host", LOOPBACK_HOST, "--port", str(port), *options]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return ServerProcess(argv, port=port, env=env).start(startup_timeout_s=90)


@pytest.fixture(scope="module")
def outcome_service():
    with start_service() as service:
        yield service


@pytest.fixture(scope="module")
def strict_service():
    """API key, small body limit, one evaluation at a time, token-level Dr. GRPO advantages."""
    options = ["--api-key", API_KEY, "--max-body-bytes", "200000", "--max-pending", "1"]
    options += ["--env.token_level", "true", "--env.norm_adv_by_std", "false", "--env.math_verify_timeout_s", "1"]
    with start_service(*options) as service:
        yield service


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return save_tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="module")
def process_service(tokenizer_dir):
    with start_service("--env.supervision", "process", "--env.tokenizer_name", str(tokenizer_dir)) as service:
        yield service


def post(service: ServerProcess, payload, *, path: str = EVALUATE, headers=None, content_type: str = wire.JSON, timeout=60):
    body = payload if isinstance(payload, bytes) else wire.encode(payload, content_type)
    return requests.post(
        service.url + path, data=body, headers={"Content-Type": content_type, **(headers or {})}, timeout=timeout
    )


def evaluate(service: ServerProcess, payload, headers=None) -> dict:
    answer = post(service, payload, headers=headers)
    assert answer.status_code == 200, answer.text
    return answer.json()


def health(service: ServerProcess) -> dict:
    answer = requests.get(service.url + "/health", timeout=10)
    assert answer.status_code == 200, answer.text
    return answer.json()


def assert_error(answer: requests.Response, status: int, code: str | None = None, *words: str) -> dict:
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"].startswith(wire.JSON)
    error = answer.json()["error"]
    assert set(error) == {"code", "message"}
    if code is not None:
        assert error["code"] == code, error
    for word in words:
        assert word in error["message"], error
    return error


def grpo_outcome(scores: Sequence[float], groups: Sequence, norm_by_std: bool = True) -> np.ndarray:
    """verl's GRPO outcome advantages, computed sample by sample."""
    scores = np.asarray(scores, dtype=np.float64)
    keys = [str(g) for g in groups]
    advantages = np.zeros_like(scores)
    for i, key in enumerate(keys):
        members = scores[[j for j, other in enumerate(keys) if other == key]]
        mean, std = (0.0, 1.0) if len(members) == 1 else (members.mean(), members.std(ddof=1))
        advantages[i] = (scores[i] - mean) / (std + EPS) if norm_by_std else scores[i] - mean
    return advantages


def gsm8k_batch(correct: Sequence[bool], groups: Sequence, seed: int = 0) -> dict:
    """A request whose scores are known: right answers boxed, wrong ones after ####."""
    rng = random.Random(seed)
    truths = {g: rng.randint(1, 10_000) for g in dict.fromkeys(str(g) for g in groups)}
    responses, ground_truths = [], []
    for ok, group in zip(correct, groups):
        truth = truths[str(group)]
        responses.append(f"Some steps.\n\\boxed{{{truth:,}}}" if ok else f"Some steps.\n#### {truth + 1}")
        ground_truths.append(f"Reasoning <<1+1=2>>2\n#### {truth}")
    return {
        "prompts": [f"problem {g}" for g in groups],
        "responses": responses,
        "ground_truths": ground_truths,
        "group_ids": list(groups),
    }


# --------------------------------------------------------------------------------------------
# Starting the service
# --------------------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_seed_curl_health_on_default_port():
    """`python recipe/atropos/environments/gsm8k_server.py serve --slurm false`, then `curl http://localhost:9001/health`."""
    if not port_is_free(9001):
        pytest.skip("port 9001 is taken on this machine (run under loopback-only)")
    argv = [sys.executable, SERVER_FILE, "serve", "--slurm", "false"]
    with ServerProcess(argv, port=9001).start(startup_timeout_s=90):
        answer = requests.get("http://localhost:9001/health", timeout=10)
    assert answer.status_code == 200
    body = answer.json()
    assert body["status"] == "ok" and body["env"] == "gsm8k"
    assert body["encodings"] == [wire.JSON, wire.MSGPACK]


@pytest.mark.timeout(60)
def test_help_documents_every_option_when_run_as_a_file_from_anywhere(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run(
        [sys.executable, str(REPO_ROOT / SERVER_FILE), "--help"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=50
    )
    assert run.returncode == 0, run.stderr
    options = ["serve", "--host", "--port", "--api-key", "--max-body-bytes", "--max-pending", "--max-total-tokens", "--slurm", "--log-level"]
    options += [f"--env.{name}" for name in GSM8KConfig.model_fields]
    for option in options:
        assert option in run.stdout, option
    assert "ATROPOS_ENV_API_KEY" in run.stdout and "127.0.0.1" in run.stdout and "9001" in run.stdout


@pytest.mark.timeout(60)
def test_environment_that_cannot_set_up_stops_the_process(tmp_path):
    argv = [sys.executable, SERVER_FILE, "serve", "--port", str(find_free_loopback_port())]
    argv += ["--env.supervision", "process", "--env.tokenizer_name", str(tmp_path / "no-such-tokenizer")]
    run = subprocess.run(argv, cwd=REPO_ROOT, env=dict(os.environ, HF_HUB_OFFLINE="1"), capture_output=True, text=True, timeout=50)
    assert run.returncode == 1
    assert "failed to set up" in run.stderr


# --------------------------------------------------------------------------------------------
# Outcome supervision
# --------------------------------------------------------------------------------------------

ANSWER_FORMATS = [
    # (response, ground truth, correct)
    ("We add them.\n\\boxed{18}", "Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 eggs.\n#### 18", True),
    ("So she has #### 18", "18", True),
    ("\\boxed{1,000}", "1000", True),
    ("#### 1,000", "1000", True),
    ("The cost is \\boxed{\\$1000}", "1,000", True),
    ("It costs $1000.\n#### $1000", "1000", True),
    ("\\boxed{1000.0}", "1000", True),
    ("\\boxed{-5}", "-5", True),
    ("#### -5", "5", False),
    ("\\boxed{2.50}", "2.5", True),
    ("\\boxed{0.75}", "\\frac{3}{4}", True),
    ("\\boxed{17}", "18", False),
    ("I do not know.", "18", False),
]


@pytest.mark.timeout(60)
def test_gsm8k_answer_formats(outcome_service):
    responses, truths, correct = zip(*ANSWER_FORMATS)
    payload = {"prompts": [f"q{i}" for i in range(len(responses))], "responses": list(responses), "ground_truths": list(truths)}
    body = evaluate(outcome_service, payload)
    assert body["scores"] == [1.0 if ok else 0.0 for ok in correct]
    metrics = body["metrics"]
    assert metrics["accuracy"] == pytest.approx(sum(correct) / len(correct))
    assert metrics["mean_reward"] == pytest.approx(sum(correct) / len(correct))
    assert metrics["answer_found_rate"] == pytest.approx((len(correct) - 1) / len(correct))
    assert metrics["num_groups"] == len(correct)  # distinct prompts: one group each
    assert metrics["identical_score_group_rate"] == 0.0  # no group of 2+


@pytest.mark.timeout(60)
def test_group_normalization_matches_direct_computation(outcome_service):
    rng = random.Random(7)
    groups = [g for g, size in zip(["a", 1, "b", 2, "c", 3], [1, 2, 3, 4, 5, 8]) for _ in range(size)]
    correct = [rng.random() < 0.5 for _ in groups]
    correct[-8:] = [True] * 8  # one group with identical scores
    payload = gsm8k_batch(correct, groups, seed=1)
    body = evaluate(outcome_service, payload)
    scores = [1.0 if ok else 0.0 for ok in correct]
    assert body["scores"] == scores
    np.testing.assert_allclose(body["advantages"], grpo_outcome(scores, groups), rtol=1e-12, atol=1e-12)
    assert all(isinstance(a, float) for a in body["advantages"])  # sequence level by default
    multi = {str(g) for g in groups if sum(str(h) == str(g) for h in groups) > 1}
    identical = [g for g in multi if len({s for s, h in zip(scores, groups) if str(h) == g}) == 1]
    assert body["metrics"]["num_groups"] == 6
    assert body["metrics"]["identical_score_group_rate"] == pytest.approx(len(identical) / len(multi))


@pytest.mark.timeout(60)
def test_groups_default_to_identical_prompts(outcome_service):
    payload = gsm8k_batch([True, False, True, True], ["x", "x", "y", "y"])
    del payload["group_ids"]
    body = evaluate(outcome_service, payload)
    np.testing.assert_allclose(body["advantages"], grpo_outcome([1, 0, 1, 1], ["x", "x", "y", "y"]))


@pytest.mark.timeout(60)
def test_token_level_outcome_advantages_without_std(strict_service):
    groups = ["g", "g", "g", "h"]
    payload = gsm8k_batch([True, False, False, True], groups)
    expected = grpo_outcome([1, 0, 0, 1], groups, norm_by_std=False)
    lengths = [5, 0, 3, 7]
    body = evaluate(strict_service, {**payload, "response_lengths": lengths}, headers=AUTH)
    for advantage, value, length in zip(body["advantages"], expected, lengths):
        assert advantage == pytest.approx([value] * length, abs=1e-7)  # score - mean, one per token
    body = evaluate(strict_service, payload, headers=AUTH)  # no lengths: one float each
    np.testing.assert_allclose(body["advantages"], expected)


# --------------------------------------------------------------------------------------------
# Process supervision
# --------------------------------------------------------------------------------------------

# (prompt, ground truth, response, step rewards by hand: arithmetic +1/-1/0, outcome on the last)
PROCESS_CASES = [
    ("pa", "14", "Tom has 3 + 4 = 7 apples.\nHe doubles them: 7 * 2 = 14\n#### 14", [1, 1, 0 + 1]),
    ("pa", "14", "3 + 4 = 8\n\n8 * 2 = 16\n#### 16", [-1, 1, 0]),
    ("pa", "14", "The answer is clear.\n\\boxed{14}", [0, 0 + 1]),
    ("pb", "5", "<<2+3=5>>5 coins\nSo 10 / 2 = 4\n#### 5", [1, -1, 0 + 1]),
    ("pc", "9", "", []),  # no tokens but EOS: one step over everything, outcome 0
]


def _expected_process_advantages(cases, token_ids, tokenizer) -> list[np.ndarray]:
    """GRPO process supervision by its definition, with steps located by decoding every prefix."""
    step_rewards, step_ends = [], []
    for (_, _, response, rewards), ids in zip(cases, token_ids):
        prefix_lengths = [len(tokenizer.decode(ids[: t + 1], skip_special_tokens=True)) for t in range(len(ids))]
        last_chars, offset = [], 0
        for line in response.split("\n"):
            if line.strip():
                last_chars.append(offset + len(line.rstrip()) - 1)
            offset += len(line) + 1
        ends = [next(t for t, n in enumerate(prefix_lengths) if n > c) for c in last_chars]
        if not ends:  # nothing visible: one step ending at the last token, carrying the outcome
            ends, rewards = [len(ids) - 1], [0]
        ends[-1] = len(ids) - 1
        step_rewards.append(np.asarray(rewards, dtype=np.float64))
        step_ends.append(ends)
    expected = []
    for i, (prompt, *_rest) in enumerate(cases):
        group = [j for j, case in enumerate(cases) if case[0] == prompt]
        pooled = np.concatenate([step_rewards[j] for j in group])
        mean, std = (pooled.mean(), pooled.std(ddof=1)) if pooled.size >= 2 else (0.0, 1.0)
        normalized = (step_rewards[i] - mean) / (std + EPS)
        expected.append(
            np.array([sum(r for r, end in zip(normalized, step_ends[i]) if end >= t) for t in range(len(token_ids[i]))])
        )
    return expected


@pytest.mark.timeout(90)
def test_process_supervision_token_lists_follow_the_formula(process_service, tokenizer):
    token_ids = [tokenizer(response)["input_ids"] + [tokenizer.eos_token_id] for _, _, response, _ in PROCESS_CASES]
    payload = {
        "prompts": [case[0] for case in PROCESS_CASES],
        "responses": [case[2] for case in PROCESS_CASES],
        "ground_truths": [case[1] for case in PROCESS_CASES],
        "response_token_ids": token_ids,
    }
    for content_type in (wire.JSON, wire.MSGPACK):
        answer = post(process_service, payload, content_type=content_type, headers={"Accept": content_type})
        assert answer.status_code == 200, answer.text
        body = wire.decode(answer.content, wire.media_type(answer.headers["content-type"]))
        assert list(body["scores"]) == [1.0, 0.0, 1.0, 1.0, 0.0]
        for got, want, ids in zip(body["advantages"], _expected_process_advantages(PROCESS_CASES, token_ids, tokenizer), token_ids):
            assert len(got) == len(ids)
            np.testing.assert_allclose(np.asarray(got, dtype=np.float64), want, rtol=1e-5, atol=1e-5)
    assert body["metrics"]["steps_per_response"] == pytest.approx(12 / 5)
    assert body["metrics"]["wrong_step_rate"] == pytest.approx(2 / 12)


@pytest.mark.timeout(60)
def test_process_supervision_without_token_ids_answers_422(process_service):
    payload = {"prompts": ["p"], "responses": ["1 + 1 = 2\n#### 2"], "ground_truths": ["2"], "response_lengths": [9]}
    assert_error(post(process_service, payload), 422, "invalid_request", "process supervision needs response_token_ids")
    payload = {"prompts": ["p"], "responses": ["x"], "ground_truths": ["2"], "response_token_ids": [[5, 100_000]]}
    assert_error(post(process_service, payload), 422, "invalid_request", "outside the vocabulary", "100000")


# --------------------------------------------------------------------------------------------
# Errors of the contract
# --------------------------------------------------------------------------------------------

GOOD = {"prompts": ["a", "a", "b"], "responses": ["\\boxed{1}", "#### 2", "x"], "ground_truths": ["1", "1", "3"]}


@pytest.mark.timeout(60)
def test_malformed_bodies_answer_400(outcome_service):
    assert_error(post(outcome_service, b'{"prompts": ["a"'), 400, "malformed_body", "JSON")
    assert_error(post(outcome_service, b"\xc1\xc1", content_type=wire.MSGPACK), 400, "malformed_body", "msgpack")
    assert_error(post(outcome_service, b"not gzip", headers={"Content-Encoding": "gzip"}), 400, "malformed_body", "gzip")
    assert_error(post(outcome_service, b"{}", headers={"Content-Encoding": "br"}), 400, "malformed_body", "br")
    assert_error(post(outcome_service, b""), 400, "malformed_body", "empty")


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (lambda p: [p], ["body", "list"]),
        (lambda p: {k: v for k, v in p.items() if k != "prompts"}, ["prompts", "required"]),
        (lambda p: {**p, "responses": p["responses"][:2]}, ["responses has 2 items but prompts has 3"]),
        (lambda p: {**p, "responses": ["a", 5, "c"]}, ["responses[1]", "string"]),
        (lambda p: {**p, "prompts": [], "responses": [], "ground_truths": []}, ["prompts", "at least 1"]),
        (lambda p: {**p, "group_ids": [1, 2]}, ["group_ids has 2 items but prompts has 3"]),
        (lambda p: {**p, "response_token_ids": [[1], [2, 3], "x"]}, ["response_token_ids[2]", "list of int"]),
        (lambda p: {**p, "response_token_ids": [[1], [2], [3]], "response_lengths": [1, 2, 1]}, ["response_lengths[1] is 2", "has 1 tokens"]),
        (lambda p: {**p, "response_lengths": [1, -2, 1]}, ["response_lengths[1]"]),
        (lambda p: {**p, "ground_truths": ["1", None, "3"]}, ["ground_truths[1]"]),
        (lambda p: {**p, "metadata": [1]}, ["metadata"]),
    ],
)
@pytest.mark.timeout(60)
def test_contract_breaches_answer_422_naming_field_and_sizes(outcome_service, change, words):
    assert_error(post(outcome_service, change(dict(GOOD))), 422, "invalid_request", *words)


@pytest.mark.timeout(60)
def test_api_key_guards_every_endpoint_but_health(strict_service):
    payload = gsm8k_batch([True], ["g"])
    assert_error(post(strict_service, payload), 401, "unauthorized", "missing")
    wrong = post(strict_service, payload, headers={"Authorization": "Bearer nope"})
    assert_error(wrong, 401, "unauthorized", "wrong")
    assert wrong.headers["WWW-Authenticate"] == "Bearer"
    endpoint = {"base_url": "http://127.0.0.1:1/v1", "model": "m"}
    assert_error(post(strict_service, endpoint, path="/register_inference_endpoint"), 401, "unauthorized")
    assert requests.get(strict_service.url + "/openapi.json", timeout=10).status_code == 401
    assert health(strict_service)["auth_required"] is True
    assert post(strict_service, payload, headers=AUTH).status_code == 200
    # The scheme is case-insensitive (RFC 7235); another scheme is refused, saying which it was.
    for scheme in ("bearer", "BEARER", "bEaReR"):
        assert post(strict_service, payload, headers={"Authorization": f"{scheme} {API_KEY}"}).status_code == 200
    basic = post(strict_service, payload, headers={"Authorization": f"Basic {API_KEY}"})
    assert_error(basic, 401, "unauthorized", "not a Bearer key", "Basic")


@pytest.mark.timeout(60)
def test_bodies_over_the_limit_answer_413(strict_service):
    big = {"prompts": ["p"], "responses": ["x" * 300_000], "ground_truths": ["1"]}
    assert_error(post(strict_service, big, headers=AUTH), 413, "payload_too_large", "200000")
    bomb = gzip.compress(b" " * 5_000_000)  # inflates 250-fold
    assert len(bomb) < 200_000
    assert_error(post(strict_service, bomb, headers={**AUTH, "Content-Encoding": "gzip"}), 413, "payload_too_large")
    chunks = (b" " * 50_000 for _ in range(10))  # no Content-Length: counted while it streams in
    chunked = requests.post(strict_service.url + EVALUATE, data=chunks, headers=AUTH, timeout=30)
    assert_error(chunked, 413, "payload_too_large", "200000")


@pytest.mark.timeout(120)
def test_overloaded_service_answers_503_with_retry_after(strict_service):
    """max_pending=1: while one slow evaluation runs, the next request is turned away, not queued."""
    # Exponent towers send math-verify to its timeout (1 s each here): a slow, but finite, request.
    slow = {
        "prompts": ["p"] * 3,
        "responses": ["\\boxed{%d^{%d^{%d^{%d}}}}" % (b, b, b, b) for b in (7, 8, 9)],
        "ground_truths": ["1000"] * 3,
    }
    result: dict = {}
    worker = threading.Thread(target=lambda: result.setdefault("answer", post(strict_service, slow, headers=AUTH)))
    worker.start()
    deadline = time.monotonic() + 30
    while health(strict_service)["pending"] < 1:
        assert time.monotonic() < deadline, "the slow request never started"
        time.sleep(0.02)
    refused = post(strict_service, gsm8k_batch([True], ["g"]), headers=AUTH)
    worker.join(60)
    assert_error(refused, 503, "overloaded", "max_pending=1")
    assert refused.headers["Retry-After"] == "1"
    assert result["answer"].status_code == 200 and result["answer"].json()["scores"] == [0.0, 0.0, 0.0]


@pytest.mark.timeout(120)
def test_an_evaluation_whose_client_left_before_its_turn_is_dropped():
    """A client that timed out (and will retry) leaves no work behind: its queued evaluation never
    runs. The environment is slow the way a judge behind HTTP is (it waits without the GIL)."""
    batch = {"prompts": ["p", "p"], "responses": ["a", "b"]}
    with start_service("--env.delay_s", "1.5", server_file="recipe/atropos/tests/slow_env_server.py") as service:
        result: dict = {}
        first = threading.Thread(target=lambda: result.setdefault("answer", post(service, batch)))
        first.start()
        deadline = time.monotonic() + 30
        while health(service)["pending"] < 1:
            assert time.monotonic() < deadline, "the first request never started"
            time.sleep(0.02)
        with pytest.raises(requests.Timeout):  # queued behind the first; its client gives up
            post(service, batch, timeout=0.5)
        first.join(60)
        assert result["answer"].status_code == 200
        time.sleep(2)  # the abandoned batch would have been scored by now
        after = health(service)
    assert after["pending"] == 0
    assert after["requests_abandoned"] == 1 and after["requests_served"] == 1
    assert after["samples_scored"] == 2  # only the first batch was scored


@pytest.mark.timeout(60)
def test_unknown_paths_and_methods_follow_the_error_shape(outcome_service):
    assert_error(requests.get(outcome_service.url + "/nope", timeout=10), 404, "not_found")
    assert_error(requests.get(outcome_service.url + EVALUATE, timeout=10), 405, "method_not_allowed")


@pytest.mark.timeout(60)
def test_bad_requests_do_not_change_the_next_answer(outcome_service):
    first = post(outcome_service, GOOD)
    assert first.status_code == 200
    for bad in (b"{", b"[]", b'{"prompts": ["a"], "responses": [1]}', b"\x00" * 100, json.dumps({**GOOD, "group_ids": [0]}).encode()):
        assert 400 <= post(outcome_service, bad).status_code < 500
    assert post(outcome_service, b"\xc1", content_type=wire.MSGPACK).status_code == 400  # 0xc1: never used
    again = post(outcome_service, GOOD)
    assert again.status_code == 200 and again.content == first.content


@pytest.mark.timeout(60)
def test_health_counts_requests_and_errors(outcome_service):
    before = health(outcome_service)
    evaluate(outcome_service, GOOD)
    post(outcome_service, b"{")
    after = health(outcome_service)
    assert after["requests_served"] == before["requests_served"] + 1
    assert after["samples_scored"] == before["samples_scored"] + 3
    assert after["errors"] == before["errors"] + 1
    assert after["errors_by_status"]["400"] == before["errors_by_status"].get("400", 0) + 1


@pytest.mark.timeout(60)
def test_register_inference_endpoint_is_reported_in_health(outcome_service):
    endpoint = {"base_url": "http://127.0.0.1:8000/v1", "model": "tiny", "api_key": "secret"}
    answer = post(outcome_service, endpoint, path="/register_inference_endpoint")
    assert answer.status_code == 200 and answer.json()["registered"] is True
    reported = health(outcome_service)["inference_endpoint"]
    assert reported == {"base_url": "http://127.0.0.1:8000/v1", "model": "tiny", "api_key_set": True}
    assert "secret" not in requests.get(outcome_service.url + "/health", timeout=10).text
    bad = post(outcome_service, {"base_url": "ftp://x", "model": "m"}, path="/register_inference_endpoint")
    assert_error(bad, 422, "invalid_request", "base_url")
    assert_error(post(outcome_service, {"model": "m"}, path="/register_inference_endpoint"), 422, "invalid_request", "base_url")


# --------------------------------------------------------------------------------------------
# Encodings
# --------------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_msgpack_both_ways_and_gzip_only_for_large_json(strict_service):
    payload = gsm8k_batch([True, False] * 32, [i // 2 for i in range(64)])
    lengths = [2048] * 64
    ids = [np.arange(n, dtype=np.int32) % 300 for n in (10,) * 64]
    # msgpack in, msgpack out: token advantages arrive as float32 arrays, never gzip'ed.
    answer = post(
        strict_service,
        {**payload, "response_token_ids": ids},
        content_type=wire.MSGPACK,
        headers={**AUTH, "Accept": f"{wire.MSGPACK}, {wire.JSON};q=0.5", "Accept-Encoding": "gzip"},
    )
    assert answer.status_code == 200 and answer.headers["content-type"] == wire.MSGPACK
    assert "content-encoding" not in answer.headers
    body = wire.decode(answer.content, wire.MSGPACK)
    assert all(isinstance(a, np.ndarray) and a.dtype == np.float32 and a.shape == (10,) for a in body["advantages"])
    # Large JSON answer, gzip asked for: gzip'ed (requests undoes it).
    big = post(strict_service, {**payload, "response_lengths": lengths}, headers={**AUTH, "Accept-Encoding": "gzip"})
    assert big.status_code == 200 and big.headers["content-encoding"] == "gzip"
    assert [len(a) for a in big.json()["advantages"]] == lengths
    # Not asked for: plain JSON. Small answers: plain even when asked.
    plain = post(strict_service, {**payload, "response_lengths": lengths}, headers={**AUTH, "Accept-Encoding": "identity"})
    assert "content-encoding" not in plain.headers and plain.json() == big.json()
    small = post(strict_service, payload, headers={**AUTH, "Accept-Encoding": "gzip"})
    assert "content-encoding" not in small.headers
    # gzip request bodies are accepted.
    zipped = post(strict_service, gzip.compress(wire.encode(payload)), headers={**AUTH, "Content-Encoding": "gzip"})
    assert zipped.status_code == 200 and zipped.json() == small.json()


# --------------------------------------------------------------------------------------------
# Concurrency
# --------------------------------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_eight_concurrent_clients_fifty_requests_each_all_answered_correctly(outcome_service):
    failures: list[str] = []

    def client(index: int) -> None:
        rng = random.Random(index)
        content_type = wire.MSGPACK if index % 2 else wire.JSON
        with requests.Session() as session:
            for request_index in range(50):
                groups = [f"c{index}r{request_index}g{g}" for g in range(rng.randint(1, 4)) for _ in range(rng.randint(1, 4))]
                correct = [rng.random() < 0.5 for _ in groups]
                payload = gsm8k_batch(correct, groups, seed=index * 100 + request_index)
                answer = session.post(
                    outcome_service.url + EVALUATE,
                    data=wire.encode(payload, content_type),
                    headers={"Content-Type": content_type, "Accept": content_type},
                    timeout=60,
                )
                if answer.status_code != 200:
                    failures.append(f"client {index} request {request_index}: {answer.status_code} {answer.text[:200]}")
                    continue
                body = wire.decode(answer.content, wire.media_type(answer.headers["content-type"]))
                scores = [1.0 if ok else 0.0 for ok in correct]
                if list(body["scores"]) != scores or not np.allclose(body["advantages"], grpo_outcome(scores, groups)):
                    failures.append(f"client {index} request {request_index}: wrong answer {body}")

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(290)
    assert not failures, failures[:3]
    assert health(outcome_service)["pending"] == 0


# --------------------------------------------------------------------------------------------
# Fuzzing: bad input over the request schema never gives a 5xx nor kills the service
# --------------------------------------------------------------------------------------------

_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12),
)
_anything = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4), max_leaves=12)
_answers = st.sampled_from(["\\boxed{3}", "#### 1,000", "\\boxed{\\frac{1}{2}}", "3 + 4 = 7\n#### 7", "\\boxed{", "####", ""])
_texts = st.lists(st.one_of(st.text(max_size=30), _answers), max_size=5)
_token_ids = st.lists(st.integers(min_value=-3, max_value=450), max_size=12)
_request_bodies = st.fixed_dictionaries(
    {},
    optional={
        "prompts": st.one_of(_texts, _anything),
        "responses": st.one_of(_texts, _anything),
        "metadata": _anything,
        "group_ids": st.one_of(st.lists(st.one_of(st.integers(-3, 3), st.text(max_size=3), st.booleans(), st.none()), max_size=5), _anything),
        "ground_truths": st.one_of(st.lists(st.one_of(st.sampled_from(["3", "#### 7", "1000", "\\frac12"]), st.none(), st.integers()), max_size=5), _anything),
        "response_token_ids": st.one_of(st.lists(st.one_of(_token_ids, _anything), max_size=5), _anything),
        "response_lengths": st.one_of(st.lists(st.integers(min_value=-2, max_value=2**40), max_size=5), _anything),
    },
)



@st.composite
def _near_valid_bodies(draw):
    """Requests that follow the schema, then maybe one field broken: they reach the environment."""
    size = draw(st.integers(min_value=1, max_value=4))
    texts = st.one_of(st.text(max_size=30), _answers)
    body = {
        "prompts": draw(st.lists(st.sampled_from(["p", "q", ""]) | st.text(max_size=5), min_size=size, max_size=size)),
        "responses": draw(st.lists(texts, min_size=size, max_size=size)),
        "ground_truths": draw(st.lists(st.sampled_from(["3", "#### 7", "1,000", "\\frac12", "", "x"]), min_size=size, max_size=size)),
    }
    if draw(st.booleans()):
        body["group_ids"] = draw(st.lists(st.integers(0, 2) | st.sampled_from(["a", "b"]), min_size=size, max_size=size))
    if draw(st.booleans()):
        body["response_token_ids"] = draw(st.lists(st.lists(st.integers(0, 399), max_size=12), min_size=size, max_size=size))
    elif draw(st.booleans()):
        body["response_lengths"] = draw(st.lists(st.integers(0, 50), min_size=size, max_size=size))
    if draw(st.booleans()):
        body[draw(st.sampled_from(sorted(body) + ["metadata"]))] = draw(_anything)
    return body


def _fuzz_post(service: ServerProcess, body, encoding: str) -> requests.Response:
    if encoding == "raw":
        return post(service, body if isinstance(body, bytes) else b"")
    try:
        data = msgpack.packb(body) if encoding == "msgpack" else json.dumps(body).encode()
    except (OverflowError, TypeError, ValueError):  # msgpack's 64-bit ints
        data, encoding = json.dumps(body).encode(), "json"
    headers = {"Accept": wire.MSGPACK} if encoding == "msgpack" else {}
    if encoding == "json+gzip":
        data, headers = gzip.compress(data), {"Content-Encoding": "gzip"}
    content_type = wire.MSGPACK if encoding == "msgpack" else wire.JSON
    return post(service, data, content_type=content_type, headers=headers, timeout=30)


def _check_fuzz_answer(answer: requests.Response, body) -> None:
    assert answer.status_code < 500, answer.text
    assert answer.status_code in (200, 400, 413, 422), answer.text
    if answer.status_code == 200:
        decoded = wire.decode(answer.content, wire.media_type(answer.headers["content-type"]))
        assert len(decoded["scores"]) == len(decoded["advantages"]) == len(body["prompts"])
    else:
        assert set(answer.json()["error"]) == {"code", "message"}


@pytest.mark.parametrize("service_name", ["outcome_service", "process_service"])
@pytest.mark.timeout(300)
def test_fuzzed_requests_never_give_5xx(request, service_name):
    service = request.getfixturevalue(service_name)

    @settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(
        body=st.one_of(_near_valid_bodies(), _request_bodies, _anything, st.binary(max_size=64)),
        encoding=st.sampled_from(["json", "msgpack", "json+gzip", "raw"]),
    )
    def fuzz(body, encoding):
        if isinstance(body, bytes):
            encoding = "raw"
        _check_fuzz_answer(_fuzz_post(service, body, encoding), body)

    fuzz()
    assert service.process.poll() is None
    assert health(service)["status"] == "ok"
    assert post(service, {**GOOD, "response_token_ids": [[1, 2], [3], []]}).status_code == 200
