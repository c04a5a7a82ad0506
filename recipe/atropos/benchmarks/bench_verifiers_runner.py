"""The verifiers runner's own cost: its episodes per second through the policy gateway against verifiers'
own evaluation loop on the same policy server, in the same run (goal: runner/eval <= 1.1x in time per
episode), and the runner's memory per 100 episodes in flight.

    loopback-only python -m recipe.atropos.benchmarks.bench_verifiers_runner [--episodes 256]

- Environment: the CPU demo's (recipe/atropos/verifiers/examples/arithmetic.py), single-turn, `@vf.reward`.
- Policy server: a stub in a process of its own answering `/v1/chat/completions` and `/v1/completions`
  (the gateway's token-in translation) at once with the same tokens: the tiny model's own time would
  hide what is measured (`--policy tiny`: the tiny model's CPU server instead).
- verifiers' evaluation loop: what `vf-eval` runs (`env.serving()`, `env.run_slot` per episode under a
  semaphore of `concurrency`) with its evaluation client (`EvalClientConfig`), straight to the server's
  chat route: text only, no tokens.
- Runner: `recipe.atropos.verifiers.runner.run` (verifiers' training client, renderer, the policy
  gateway in a process of its own, groups of 4, conversion, GRPO credit, ScoredData, push to a real
  run-api).
Rates are measured from each side's first finished episode to its last (start-up left out); after one
warm-up run each (imports, first-use costs), the two alternate `--repeats` times and the best of each
is reported, with the CPU time per episode of the process measured and of the gateway's process (in a
run it is the trainer's): on a shared machine CPU time is steadier than wall time. The runner caches one pydantic check for the
whole process (patches.cache_default_factory_checks, ~2 ms per message node otherwise); the warm-up
applies it before any measurement, so the evaluation loop here has it too (`--no-cache` leaves it
out of both sides: verifiers as shipped against the runner without it).

Memory: the runner's command line (`python -m recipe.atropos.verifiers`) through the gateway to a stub
that never answers, so every episode waits on its model call; its resident memory holding 1 episode and
holding 101, once all are waiting (the gateway's /health counts them in flight): the difference is 100
episodes' worth.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time

from recipe.atropos.benchmarks.gateway_process import start_gateway_process
from recipe.atropos.server_process import LOOPBACK_HOST, ServerProcess, find_free_loopback_port

STUB_ANSWER = "So 3+4 = 7.\n#### 7"
GROUP = 4


def serve_stub(port: int, model_dir: str, hold: bool = False) -> None:
    """The stub policy server: every completion is STUB_ANSWER (and the stop token), at once; with
    `hold`, token-in completions never answer (the memory measurement's episodes wait on them)."""
    import uvicorn
    from fastapi import FastAPI
    from fastapi.responses import Response
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast.from_pretrained(model_dir)
    ids = tokenizer(STUB_ANSWER, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    chat = json.dumps({"id": "stub", "object": "chat.completion", "created": 0, "model": "stub", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": STUB_ANSWER}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": len(ids), "total_tokens": 1 + len(ids)}}).encode()
    app = FastAPI()

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": "stub", "object": "model"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions() -> Response:
        return Response(chat, media_type="application/json")

    @app.post("/v1/completions")
    async def completions(body: dict) -> dict:
        if hold:
            await asyncio.sleep(3600)
        return {"id": "stub", "object": "text_completion", "model": "stub", "choices": [
            {"index": 0, "text": STUB_ANSWER, "token_ids": ids, "prompt_token_ids": body["prompt"],
             "finish_reason": "stop", "logprobs": {"token_logprobs": [-0.5] * len(ids)}}]}

    uvicorn.run(app, host=LOOPBACK_HOST, port=port, log_level="warning", access_log=False)


class _Timed:
    """First and last finished episode times, and how many finished."""

    def __init__(self) -> None:
        self.first = self.last = 0.0
        self.count = 0

    def tick(self) -> None:
        now = time.perf_counter()
        self.first = self.first or now
        self.last = now
        self.count += 1

    def rate(self) -> float:
        return (self.count - 1) / (self.last - self.first) if self.count > 1 and self.last > self.first else 0.0


def _env(data_path: str):
    from recipe.atropos.verifiers.examples.arithmetic import make_env
    from recipe.atropos.verifiers.loading import localized

    env = make_env(data_path)
    return type(env)(localized("bench", env.config))


async def eval_loop(server_url: str, data_path: str, concurrency: int, episodes: int) -> float:
    """Episodes/s of verifiers' own evaluation loop (vf-eval's in-process path) on the server's chat route."""
    import itertools

    import verifiers.v1 as vf
    from verifiers.v1.env import RunSlot

    env = _env(data_path)
    os.environ.setdefault("BENCH_STUB_KEY", "none")
    ctx = vf.ModelContext(model="policy", client=vf.EvalClientConfig(base_url=f"{server_url}/v1", api_key_var="BENCH_STUB_KEY"),
                          sampling=vf.SamplingConfig(max_tokens=24, temperature=1.0))
    timed, semaphore = _Timed(), asyncio.Semaphore(concurrency)

    async def one(task) -> None:
        episode = await env.run_slot(RunSlot(task), ctx, semaphore)
        if episode.ok:
            timed.tick()

    tasks = list(itertools.islice(itertools.cycle(list(env.taskset.take(64))), episodes))
    from recipe.atropos.verifiers.harness import shared_session_scope

    async with shared_session_scope(), env.serving():
        await asyncio.gather(*(one(t) for t in tasks))
    return timed.rate()


async def runner(policy_url: str, run_api: str, model_dir: str, data_path: str, concurrency: int, episodes: int) -> float:
    from recipe.atropos.episodes.cli import RunnerArgs
    from recipe.atropos.episodes.loop import EpisodeStats
    from recipe.atropos.episodes.spec import load_spec
    from recipe.atropos.verifiers.runner import run

    timed = _Timed()

    class TimedStats(EpisodeStats):
        def episode(self, episode) -> None:
            timed.tick()
            super().episode(episode)

    spec = load_spec("bench", {"type": "verifiers", "env": "recipe.atropos.verifiers.examples.arithmetic:make_env",
                               "env_args": {"data_path": data_path}, "group_size": GROUP, "concurrency": concurrency,
                               "max_tokens": 24, "max_token_length": 256, "max_groups": max(episodes // GROUP, 2),
                               "max_batches_offpolicy": 0})  # no trainer takes them
    await run(RunnerArgs("bench", policy_url, run_api, model_dir), spec, TimedStats())
    return timed.rate()


def _process(argv: list[str], port: int, health_path: str = "/health") -> ServerProcess:
    return ServerProcess(argv, port=port, health_path=health_path).start(startup_timeout_s=180)


def _stub(model_dir: str, hold: bool = False) -> ServerProcess:
    port = find_free_loopback_port()
    return _process([sys.executable, "-m", "recipe.atropos.benchmarks.bench_verifiers_runner", "--serve-stub",
                     str(port), model_dir, *(["hold"] if hold else [])], port)


def memory_per_100(model_dir: str, data_path: str) -> float:
    """MiB of resident memory the runner process adds for 100 more episodes in flight."""
    import psutil
    import requests

    rss = {}
    for concurrency in (1, 101):
        stub = _stub(model_dir, hold=True)
        gateway = start_gateway_process(stub.url)
        spec = {"type": "verifiers", "env": "recipe.atropos.verifiers.examples.arithmetic:make_env",
                "env_args": {"data_path": data_path}, "group_size": 1, "concurrency": concurrency, "max_tokens": 24}
        process = subprocess.Popen(
            [sys.executable, "-m", "recipe.atropos.verifiers", "--name", "bench", "--spec-json", json.dumps(spec),
             "--policy-url", f"{gateway.url}/v1", "--run-api", "http://127.0.0.1:9", "--tokenizer", model_dir],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 300
            while requests.get(f"{gateway.url}/health", timeout=5).json()["in_flight"] < concurrency:
                assert process.poll() is None, "the runner exited"
                assert time.monotonic() < deadline, "the runner did not fill up in 300 s"
                time.sleep(0.5)
            time.sleep(2.0)  # settled
            rss[concurrency] = psutil.Process(process.pid).memory_info().rss / 2**20
        finally:
            process.terminate()
            process.wait(timeout=30)
            gateway.stop()
            stub.stop()
    print(f"runner resident memory: {rss[1]:.0f} MiB holding 1 episode, {rss[101]:.0f} MiB holding 101")
    return rss[101] - rss[1]


def throughput_table(args, server_url: str, gateway: ServerProcess, api_url: str, model_dir: str,
                     data_path: str) -> None:
    """Print episodes/s and CPU per episode of both sides at each concurrency (best of `repeats`)."""
    import psutil

    gateway_process = psutil.Process(gateway.process.pid)

    def measured(coroutine) -> tuple[float, float, float]:
        """(episodes/s, CPU ms per episode of this process, of the gateway's process)."""
        cpu, gateway_cpu = time.process_time(), sum(gateway_process.cpu_times()[:2])
        rate = asyncio.run(coroutine)
        return (rate, 1000 * (time.process_time() - cpu) / args.episodes,
                1000 * (sum(gateway_process.cpu_times()[:2]) - gateway_cpu) / args.episodes)

    def eval_side(concurrency: int) -> tuple[float, float, float]:
        return measured(eval_loop(server_url, data_path, concurrency, args.episodes))

    def runner_side(concurrency: int) -> tuple[float, float, float]:
        return measured(runner(f"{gateway.url}/v1", api_url, model_dir, data_path, concurrency, args.episodes))

    if args.no_cache:
        from recipe.atropos.verifiers import patches

        patches.cache_default_factory_checks = lambda: None
    eval_side(args.concurrency[0]), runner_side(args.concurrency[0])  # warm-up: imports, first-use costs
    print(f"policy: {args.policy}; {args.episodes} episodes per measurement, best of {args.repeats} (after a warm-up)")
    print(f"{'concurrency':>11} {'vf-eval ep/s':>13} {'runner ep/s':>12} {'runner/eval time':>17} "
          f"{'CPU ms/ep: vf-eval':>19} {'runner':>7} {'gateway':>8}")
    for concurrency in args.concurrency:
        best_eval, best_runner = (0.0, 1e9), (0.0, 1e9, 1e9)
        for _ in range(args.repeats):
            rate, cpu, _ = eval_side(concurrency)
            best_eval = (max(best_eval[0], rate), min(best_eval[1], cpu))
            rate, cpu, gateway_cpu = runner_side(concurrency)
            best_runner = (max(best_runner[0], rate), min(best_runner[1], cpu), min(best_runner[2], gateway_cpu))
        print(f"{concurrency:>11} {best_eval[0]:>13.1f} {best_runner[0]:>12.1f} {best_eval[0] / best_runner[0]:>16.2f}x "
              f"{best_eval[1]:>19.1f} {best_runner[1]:>7.1f} {best_runner[2]:>8.1f}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--episodes", type=int, default=256, help="episodes per measurement")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--repeats", type=int, default=4,
                        help="alternations; the best of each side counts (the tiny model's own batching varies)")
    parser.add_argument("--policy", choices=["stub", "tiny"], default="stub")
    parser.add_argument("--no-cache", action="store_true", help="without the runner's pydantic cache, on both sides")
    parser.add_argument("--assets", default=None, help="tiny assets folder (model/, data/); default: built here")
    parser.add_argument("--serve-stub", nargs="+", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.serve_stub is not None:
        serve_stub(int(args.serve_stub[0]), args.serve_stub[1], hold=args.serve_stub[2:] == ["hold"])
        return 0
    if args.assets is None:
        from recipe.atropos.demo.tiny_assets import build_assets

        args.assets = str(build_assets(tempfile.mkdtemp(prefix="bench-verifiers-"), num_train=64, num_test=8).model_dir.parent)
    model_dir, data_path = f"{args.assets}/model", f"{args.assets}/data/train.parquet"
    from recipe.atropos.trajectory.runapi_client import AtroposRunAPIClient

    if args.policy == "stub":
        server = _stub(model_dir)
    else:
        port = find_free_loopback_port()
        server = _process([sys.executable, "-m", "recipe.atropos.cpu.openai_api", "--model", model_dir, "--port",
                           str(port), "--served-model-name", "policy"], port)
    api_port = find_free_loopback_port()
    api = _process([sys.executable, "-m", "atroposlib.cli.run_api", "--host", LOOPBACK_HOST, "--port", str(api_port)],
                   api_port, health_path="/")
    gateway = start_gateway_process(server.url)
    try:
        client = AtroposRunAPIClient(api.url, timeout=5, retry_attempts=1, max_wait_time=5)
        client.register_trainer(batch_size=GROUP, max_token_len=256, num_steps=10**6)
        client.get_batch()  # run-api takes environments once the trainer asked for a batch
        throughput_table(args, server.url, gateway, api.url, model_dir, data_path)
        print(f"runner memory per 100 episodes in flight: {memory_per_100(model_dir, data_path):.1f} MiB")
    finally:
        for process in (gateway, api, server):
            process.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
