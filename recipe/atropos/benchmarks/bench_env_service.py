"""Benchmark of the environment service: scoring throughput and the token-level round trip.

    loopback-only python -m recipe.atropos.benchmarks.bench_env_service

Prints, in one run:

1. GSM8K scoring throughput: responses/s for 1024 responses, in process (``env.score``: answer
   extraction + exact numbers + math-verify where needed) and through the service (HTTP, JSON).
2. The round trip of 1024 samples x 2048 response tokens with token-level advantages, client and
   service included (encode, HTTP, decode, validation, scoring, advantages, answer checks), for
   this service (msgpack with raw arrays; orjson JSON) against a naive baseline started in the
   same run: stdlib json both ways and pydantic ``list[list[int]]``/``list[list[float]]`` models
   on both sides, scoring with the same environment.

3. A slow neighbour (``--section stall``): the latency of a one-sample request (its answer needs
   math-verify) alone, and while a 16-sample request of answers that stall math-verify
   (``\\boxed{k^{k^{k^{k^{k}}}}}``) is being scored, with their ratio; and how long that slow
   request took. Before scoring had a budget per request and ran requests one at a time, the small
   request waited for the whole slow one (about 30 s).

Every server is a separate process on a free 127.0.0.1 port; client and servers share this
machine's cores, as a trainer and an environment service on one node do.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from fastapi import FastAPI, Request, Response
from pydantic import BaseModel

from recipe.atropos import wire

EVALUATE = "/evaluate_and_compute_advantages"
VOCAB_SIZE = 151_643  # Qwen2's: token ids as a trainer would send them


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def make_batch(num_samples: int, num_tokens: int, group_size: int = 8, seed: int = 0) -> dict[str, Any]:
    """GSM8K-like responses in the formats policies write, with known correctness.

    Per 16 responses: boxed with commas, ####, #### with $, boxed decimals, boxed units, wrong,
    missing answers, and one ``\\frac`` that needs math-verify (about 6%).
    """
    rng = random.Random(seed)
    formats: list[Callable[[int], str]] = [
        lambda t: f"The answer is \\boxed{{{t:,}}}.",
        lambda t: f"#### {t}",
        lambda t: f"So the total is ${t}.\n#### ${t:,}",
        lambda t: f"\\boxed{{{t}.0}}",
        lambda t: f"\\boxed{{{t} \\text{{ dollars}}}}",
        lambda t: f"\\boxed{{{t + 1}}}",
        lambda t: f"#### {t - 3}",
        lambda t: "I am not sure what the answer is.",
    ] * 2
    formats[-1] = lambda t: f"\\boxed{{\\frac{{{2 * t}}}{{2}}}}"
    prompts, responses, truths, groups = [], [], [], []
    for index in range(num_samples):
        problem = index // group_size
        truth = 1000 + seed * 100_003 + problem * 7  # a new seed: new answers, nothing cached
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        reasoning = f"Each box holds {a} items.\nThere are {b} boxes, so {a} * {b} = {a * b} items.\n"
        prompts.append(f"Problem {problem}: how many items are there?")
        responses.append(reasoning + formats[index % len(formats)](truth))
        truths.append(f"She computes <<{a}*{b}={a * b}>>{a * b}.\n#### {truth}")
        groups.append(problem)
    token_rng = np.random.default_rng(seed)
    token_ids = [token_rng.integers(0, VOCAB_SIZE, size=num_tokens, dtype=np.int32) for _ in range(num_samples)]
    return {"prompts": prompts, "responses": responses, "ground_truths": truths, "group_ids": groups, "token_ids": token_ids}


# --------------------------------------------------------------------------------------------
# The naive baseline service: stdlib json, pydantic list-of-list models
# --------------------------------------------------------------------------------------------


class NaiveRequest(BaseModel):
    prompts: list[str]
    responses: list[str]
    group_ids: list[str | int] | None = None
    ground_truths: list[str | None] | None = None
    response_token_ids: list[list[int]] | None = None


class NaiveResponse(BaseModel):
    advantages: list[list[float]]
    scores: list[float]
    metrics: dict[str, float]


def naive_app():
    """What a first implementation looks like: parse everything into pydantic, dump with json."""
    from recipe.atropos.environments.base import EvaluationRequest
    from recipe.atropos.environments.gsm8k import GSM8KConfig, GSM8KEnvironment

    environment = GSM8KEnvironment(GSM8KConfig(token_level=True))
    environment.setup()
    app = FastAPI()

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok"}

    @app.post(EVALUATE)
    async def evaluate(request: Request) -> Response:
        parsed = NaiveRequest.model_validate(json.loads(await request.body()))
        token_ids = parsed.response_token_ids or [[] for _ in parsed.prompts]
        evaluation = EvaluationRequest(
            prompts=parsed.prompts,
            responses=parsed.responses,
            group_ids=parsed.group_ids or parsed.prompts,
            ground_truths=parsed.ground_truths or [None] * len(parsed.prompts),
            response_token_ids=[np.asarray(ids, dtype=np.int64) for ids in token_ids],
            response_lengths_B=np.asarray([len(ids) for ids in token_ids], dtype=np.int64),
        )
        result = environment.evaluate(evaluation)
        answer = NaiveResponse(
            advantages=[np.asarray(a).tolist() for a in result.advantages],
            scores=result.scores,
            metrics=result.metrics,
        )
        return Response(json.dumps(answer.model_dump()), media_type=wire.JSON)

    return app


def run_naive_server(port: int) -> None:
    import uvicorn

    app = naive_app()
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def naive_round_trip(url: str, batch: dict[str, Any]) -> list[np.ndarray]:
    """Client side of the baseline: json.dumps, requests, json.loads, pydantic validation."""
    import requests

    payload = {
        "prompts": batch["prompts"],
        "responses": batch["responses"],
        "group_ids": batch["group_ids"],
        "ground_truths": batch["ground_truths"],
        "response_token_ids": [ids.tolist() for ids in batch["token_ids"]],
    }
    answer = requests.post(url + EVALUATE, data=json.dumps(payload), headers={"Content-Type": wire.JSON}, timeout=600)
    answer.raise_for_status()
    parsed = NaiveResponse.model_validate(json.loads(answer.content))
    return [np.asarray(a, dtype=np.float32) for a in parsed.advantages]


# --------------------------------------------------------------------------------------------
# This service's round trips
# --------------------------------------------------------------------------------------------


def client_round_trip(client: Any, batch: dict[str, Any]) -> list[np.ndarray]:
    result = client.evaluate_and_compute_advantages(
        batch["prompts"],
        batch["responses"],
        group_ids=batch["group_ids"],
        ground_truths=batch["ground_truths"],
        response_token_ids=batch["token_ids"],
    )
    return list(result.advantages)


def minimal_msgpack_round_trip(session: Any, url: str, batch: dict[str, Any]) -> list[np.ndarray]:
    """msgpack both ways with requests, for when client.py is not available."""
    payload = {k: batch[k] for k in ("prompts", "responses", "group_ids", "ground_truths")}
    payload["response_token_ids"] = batch["token_ids"]
    answer = session.post(
        url + EVALUATE,
        data=wire.encode(payload, wire.MSGPACK),
        headers={"Content-Type": wire.MSGPACK, "Accept": wire.MSGPACK, "Accept-Encoding": "identity"},
        timeout=600,
    )
    answer.raise_for_status()
    return list(wire.decode(answer.content, wire.MSGPACK)["advantages"])


def timed(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """Median seconds of ``repeats`` calls (after one warm-up call), and the last result."""
    result = fn()
    times = []
    for _ in range(repeats):
        gc.collect()
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def bench_scoring(batch: dict[str, Any]) -> dict[str, float]:
    from recipe.atropos.environments.gsm8k import GSM8KEnvironment
    from recipe.atropos.protocol import parse_evaluation_request

    environment = GSM8KEnvironment()
    environment.setup()
    try:
        request = parse_evaluation_request({k: batch[k] for k in ("prompts", "responses", "group_ids", "ground_truths")})
        start = time.perf_counter()
        scored = environment.score(request)  # cold: nothing cached but math-verify's imports
        cold = time.perf_counter() - start
        start = time.perf_counter()
        environment.score(request)
        warm = time.perf_counter() - start
    finally:
        getattr(environment, "close", lambda: None)()  # its math-verify worker processes
    return {"cold_s": cold, "warm_s": warm, "accuracy": float(scored.scores_B.mean())}


def _tower(base: int) -> str:
    return "\\boxed{%d^{%d^{%d^{%d^{%d}}}}}" % ((base,) * 5)


def bench_slow_neighbour(repeats: int) -> dict[str, float]:
    """Small-request latency alone and beside a pathological request (see the module docstring)."""
    import threading

    import requests

    from recipe.atropos.server_process import LOOPBACK_HOST, ServerProcess, find_free_loopback_port

    port = find_free_loopback_port()
    argv = [sys.executable, "-m", "recipe.atropos.environments.gsm8k_server", "serve", "--slurm", "false"]
    argv += ["--host", LOOPBACK_HOST, "--port", str(port), "--log-level", "warning"]
    serial = iter(range(2, 10_000))

    def post(session: Any, url: str, body: dict[str, Any]) -> float:
        start = time.perf_counter()
        answer = session.post(url + EVALUATE, data=wire.encode(body), headers={"Content-Type": wire.JSON}, timeout=600)
        answer.raise_for_status()
        return time.perf_counter() - start

    def small() -> dict[str, Any]:  # a new answer each time: never a cached verdict
        n = next(serial)
        return {"prompts": ["q"], "responses": [f"\\boxed{{\\frac{{{2 * n}}}{{{n}}}}}"], "ground_truths": ["2"]}

    alone, beside, slow_s = [], [], []
    with ServerProcess(argv, port=port, env=dict(os.environ, HF_HUB_OFFLINE="1")).start(120) as service, requests.Session() as session:
        post(session, service.url, small())  # warm-up
        alone = [post(session, service.url, small()) for _ in range(repeats)]
        for repeat in range(repeats):
            towers = [_tower(3 + 16 * repeat + k) for k in range(16)]  # new towers: nothing cached
            slow = {"prompts": ["p"] * 16, "responses": towers, "ground_truths": ["1000"] * 16}
            done: dict[str, float] = {}
            thread = threading.Thread(target=lambda b=slow: done.setdefault("s", post(requests, service.url, b)))
            thread.start()
            while requests.get(service.url + "/health", timeout=10).json()["pending"] < 1:
                time.sleep(0.01)
            time.sleep(0.3)  # the slow request is being scored now
            beside.append(post(session, service.url, small()))
            thread.join()
            slow_s.append(done["s"])
    return {"alone_s": statistics.median(alone), "beside_s": statistics.median(beside), "slow_s": statistics.median(slow_s)}


def print_slow_neighbour(repeats: int) -> None:
    result = bench_slow_neighbour(repeats)
    print("\n## a one-sample request beside a 16-sample request that stalls math-verify")
    print(f"one-sample request alone:         {result['alone_s'] * 1e3:9.1f} ms (median of {repeats})")
    print(f"beside the slow request:          {result['beside_s'] * 1e3:9.1f} ms   {result['beside_s'] / result['alone_s']:7.1f} x alone")
    print(f"the slow request itself:          {result['slow_s'] * 1e3:9.1f} ms")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=1024, help="samples per request (default: %(default)s)")
    parser.add_argument("--tokens", type=int, default=2048, help="response tokens per sample (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=5, help="timed round trips per path (default: %(default)s)")
    parser.add_argument("--baseline-repeats", type=int, default=3, help="timed baseline round trips (default: %(default)s)")
    parser.add_argument(
        "--section", choices=["all", "throughput", "stall"], default="all", help="what to measure (default: %(default)s)"
    )
    parser.add_argument("--naive-server", type=int, metavar="PORT", help=argparse.SUPPRESS)
    return parser


def _http_scoring_s(url: str, samples: int, repeats: int) -> float:
    """Median seconds to score through the service: text only, JSON both ways, a fresh batch (cold
    caches) each time."""
    import requests

    fresh = iter(range(1, 1000))
    with requests.Session() as session:

        def score_over_http() -> Any:
            text_only = make_batch(samples, 0, seed=next(fresh))
            del text_only["token_ids"]
            start = time.perf_counter()
            answer = session.post(url + EVALUATE, data=wire.encode(text_only), headers={"Content-Type": wire.JSON})
            answer.raise_for_status()
            return time.perf_counter() - start

        return statistics.median(score_over_http() for _ in range(repeats + 1))


def _client_round_trips(
    url: str, batch: dict[str, Any], repeats: int
) -> tuple[list[tuple[str, float]], dict[str, Any]]:
    """Timed round trips through client.py (msgpack and JSON), or a minimal msgpack one without it."""
    rows: list[tuple[str, float]] = []
    results: dict[str, list[np.ndarray]] = {}
    try:
        from recipe.atropos.evaluate.client import AtroposEnvironmentClient

        for encoding in ("msgpack", "json"):
            with AtroposEnvironmentClient(url, timeout=600, max_wait_time=1200, encoding=encoding) as client:
                seconds, results[encoding] = timed(lambda c=client: client_round_trip(c, batch), repeats)
            rows.append((f"this service, client.py, {encoding}", seconds))
    except ImportError as exc:
        import requests

        print(f"(client.py not importable: {exc}; using a minimal msgpack round trip)")
        with requests.Session() as session:
            seconds, results["msgpack"] = timed(lambda: minimal_msgpack_round_trip(session, url, batch), repeats)
        rows.append(("this service, requests + msgpack", seconds))
    return rows, results


def print_round_trips(args: argparse.Namespace, batch: dict[str, Any]) -> tuple[float, float]:
    """The service against the naive baseline server, both started here; (fastest, baseline) seconds."""
    from recipe.atropos.server_process import LOOPBACK_HOST, ServerProcess, find_free_loopback_port

    env = dict(os.environ, HF_HUB_OFFLINE="1")
    fast_port, naive_port = find_free_loopback_port(), find_free_loopback_port()
    fast_argv = [sys.executable, "-m", "recipe.atropos.environments.gsm8k_server", "serve", "--slurm", "false"]
    fast_argv += ["--host", LOOPBACK_HOST, "--port", str(fast_port), "--env.token_level", "true", "--log-level", "warning"]
    naive_argv = [sys.executable, "-m", "recipe.atropos.benchmarks.bench_env_service", "--naive-server", str(naive_port)]
    with ServerProcess(fast_argv, port=fast_port, env=env).start(120) as fast, ServerProcess(
        naive_argv, port=naive_port, env=env
    ).start(120) as naive:
        http_s = _http_scoring_s(fast.url, args.samples, args.repeats)
        print(f"via service: {args.samples / http_s:10.0f} responses/s  ({http_s * 1e3:.1f} ms, HTTP + JSON, cold caches)")

        print(f"\n## round trip: {args.samples} x {args.tokens} tokens, token-level advantages, client + service")
        rows, results = _client_round_trips(fast.url, batch, args.repeats)
        baseline_s, results["naive"] = timed(lambda: naive_round_trip(naive.url, batch), args.baseline_repeats)
        rows.append(("naive baseline: stdlib json + pydantic lists", baseline_s))

    for name, got in results.items():  # every path must give the same advantages
        for mine, reference in zip(got, results["naive"]):
            np.testing.assert_allclose(np.asarray(mine, dtype=np.float32), reference, rtol=1e-6, atol=1e-6, err_msg=name)
    for name, seconds in rows:
        print(f"{name:48s} {seconds * 1e3:9.1f} ms   {seconds / baseline_s:6.3f} x baseline")
    return min(seconds for name, seconds in rows if not name.startswith("naive")), baseline_s


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.naive_server:
        run_naive_server(args.naive_server)
        return 0
    if args.section == "stall":
        print(f"# environment service benchmark: slow neighbour, {os.cpu_count()} CPUs")
        print_slow_neighbour(args.repeats)
        return 0

    batch = make_batch(args.samples, args.tokens)
    print(f"# environment service benchmark: {args.samples} samples x {args.tokens} tokens, {os.cpu_count()} CPUs")

    scoring = bench_scoring(batch)
    print("\n## GSM8K scoring throughput (in process, env.score)")
    print(f"cold caches: {args.samples / scoring['cold_s']:10.0f} responses/s  ({scoring['cold_s'] * 1e3:.1f} ms)")
    print(f"warm caches: {args.samples / scoring['warm_s']:10.0f} responses/s  ({scoring['warm_s'] * 1e3:.1f} ms)")

    fastest, baseline_s = print_round_trips(args, batch)
    throughput = args.samples / scoring["cold_s"]
    print("\n## targets")
    print(f"scoring >= 1000 responses/s: {throughput:.0f}/s -> {'met' if throughput >= 1000 else 'MISSED'}")
    print(f"round trip <= 0.1 x baseline: {fastest / baseline_s:.3f} x -> {'met' if fastest <= 0.1 * baseline_s else 'MISSED'}")
    if args.section == "all":
        print_slow_neighbour(args.repeats)
    return 0

if __name__ == "__main__":
    sys.exit(main())
