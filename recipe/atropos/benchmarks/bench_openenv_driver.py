"""The OpenEnv driver's own cost: its episodes per second against a bare loop on the same server and the
same policy endpoint, in the same run, at 1, 16 and 64 episodes at once (goal: driver/bare <= 1.1x in time
per episode).

    loopback-only python -m recipe.atropos.benchmarks.bench_openenv_driver [--episodes 256]

- Server: the CPU demo's arithmetic environment (OpenEnv's server API, uvicorn from .venv-openenv).
- Policy endpoint: a stub of the gateway's token-in route (`/inference/v1/generate`) in a process of its
  own, answering every prompt at once with the same sampled tokens: the policy's own time would hide the
  driver's (`--policy tiny`: the tiny model's CPU server behind the real policy gateway instead).
- Bare loop: `concurrency` workers, each with one WebSocket session, doing reset -> chat template ->
  generate -> decode -> step, nothing else.
- Driver: `recipe.atropos.openenv.runner.run` (groups of 4, Transcript, process credit, ScoredData, push to
  a real run-api, counters).
Both are measured from their first finished episode to their last (start-up left out): episodes per
second, and the CPU time per episode of every process involved (this one, the OpenEnv server, run-api,
the policy endpoint), which a busy shared machine disturbs much less than wall time. The two alternate
`--repeats` times; the best of each is reported.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time

import aiohttp
import psutil

from recipe.atropos.benchmarks.gateway_process import start_gateway_process
from recipe.atropos.server_process import LOOPBACK_HOST, ServerProcess, find_free_loopback_port

STUB_ANSWER = "So 3+4 = 7.\n#### 7"


def serve_stub(port: int, model_dir: str) -> None:
    """The stub policy: token-in route answering STUB_ANSWER's tokens (and the stop token)."""
    import uvicorn
    from fastapi import FastAPI
    from fastapi.responses import Response
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer(STUB_ANSWER, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    body = json.dumps({"request_id": "stub", "choices": [{
        "token_ids": ids, "finish_reason": "stop",
        "logprobs": {"content": [{"token": f"token_id:{t}", "logprob": -0.5} for t in ids]}}]}).encode()
    app = FastAPI()

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.post("/inference/v1/generate")
    async def generate() -> Response:
        return Response(body, media_type="application/json")

    uvicorn.run(app, host=LOOPBACK_HOST, port=port, log_level="warning", access_log=False)


class _Timed:
    """From the first finished episode to the last: how many, the wall time, and the CPU time of this
    process and of the servers (`cpu`: their summed user+system seconds, psutil)."""

    def __init__(self, cpu) -> None:
        self.cpu = cpu
        self.first = self.last = 0.0
        self.cpu_first = self.cpu_last = 0.0
        self.count = 0

    def tick(self) -> None:
        now = time.perf_counter()
        if not self.first:
            self.first, self.cpu_first = now, self.cpu()
        self.last = now
        self.count += 1

    def done(self) -> tuple[float, float]:
        """(episodes/s, CPU ms per episode) after the first."""
        self.cpu_last = self.cpu()
        n = self.count - 1
        if n < 1 or self.last <= self.first:
            return 0.0, float("nan")
        return n / (self.last - self.first), 1000 * (self.cpu_last - self.cpu_first) / n


async def bare_loop(url: str, policy_url: str, tokenizer, concurrency: int, episodes: int, cpu) -> tuple[float, float]:
    """The least a loop can do: reset, render, generate, decode, step."""
    from recipe.atropos.openenv.session import OpenEnvSession

    timed, left = _Timed(cpu), [episodes]
    endpoint = policy_url.removesuffix("/v1") + "/inference/v1/generate"

    async def worker(http: aiohttp.ClientSession, seed0: int) -> None:
        session = await OpenEnvSession.open(url)
        seed = seed0
        while left[0] > 0:
            left[0] -= 1
            first = await session.reset({"seed": seed})
            text = tokenizer.apply_chat_template([{"role": "user", "content": first.observation["question"]}],
                                                 tokenize=False, add_generation_prompt=True)
            body = {"model": "policy", "token_ids": tokenizer(text, add_special_tokens=False)["input_ids"],
                    "sampling_params": {"max_tokens": 24, "temperature": 1.0, "logprobs": 1}}
            async with http.post(endpoint, json=body) as answer:
                choice = (await answer.json())["choices"][0]
            await session.step({"answer": tokenizer.decode(choice["token_ids"], skip_special_tokens=True)})
            timed.tick()
            seed += concurrency
        await session.close()

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        await asyncio.gather(*(worker(http, k) for k in range(concurrency)))
    return timed.done()


async def driver(url: str, policy_url: str, run_api: str, model_dir: str, concurrency: int, episodes: int,
                 cpu) -> tuple[float, float]:
    from recipe.atropos.episodes.cli import RunnerArgs
    from recipe.atropos.episodes.loop import EpisodeStats
    from recipe.atropos.episodes.spec import load_spec
    from recipe.atropos.openenv.runner import run

    timed = _Timed(cpu)

    class TimedStats(EpisodeStats):
        def episode(self, episode) -> None:
            timed.tick()
            super().episode(episode)

    spec = load_spec("bench", {"type": "openenv", "url": url, "group_size": 4, "concurrency": concurrency,
                               "max_turns": 1, "max_tokens": 24, "max_token_length": 256,
                               "max_groups": max(episodes // 4, 2), "max_batches_offpolicy": 0})  # no trainer takes them
    await run(RunnerArgs("bench", policy_url, run_api, model_dir), spec, TimedStats())
    return timed.done()


def _servers(model_dir: str, policy: str) -> tuple[list[ServerProcess], str, object]:
    from recipe.atropos.tests.openenv_servers import ARITHMETIC_APP, openenv_server, require_openenv, start_all

    require_openenv()
    env_server = openenv_server(ARITHMETIC_APP, env={"OPENENV_MAX_SESSIONS": "256"})
    api_port = find_free_loopback_port()
    api = ServerProcess([sys.executable, "-m", "atroposlib.cli.run_api", "--host", LOOPBACK_HOST, "--port", str(api_port)],
                        port=api_port, health_path="/")
    servers, gateway = [env_server, api], None
    if policy == "stub":
        port = find_free_loopback_port()
        servers.append(ServerProcess([sys.executable, "-m", "recipe.atropos.benchmarks.bench_openenv_driver",
                                      "--serve-stub", str(port), "--model", model_dir], port=port))
    else:
        port = find_free_loopback_port()
        servers.append(ServerProcess([sys.executable, "-m", "recipe.atropos.cpu.openai_api", "--model", model_dir,
                                      "--port", str(port), "--served-model-name", "policy"], port=port))
    start_all(*servers)
    policy_url = f"{servers[-1].url}/v1"
    if policy == "tiny":  # in a process of its own, as in a run (in the trainer's): CPU counted with the servers'
        gateway = start_gateway_process(servers[-1].url)
        policy_url = f"{gateway.url}/v1"
    return servers, policy_url, gateway


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--episodes", type=int, default=256, help="episodes per measurement")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--policy", choices=["stub", "tiny"], default="stub")
    parser.add_argument("--model", default=None, help="tokenizer (and model) folder; default: tiny assets built here")
    parser.add_argument("--serve-stub", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.model is None:
        from recipe.atropos.demo.tiny_assets import build_assets

        args.model = str(build_assets(tempfile.mkdtemp(prefix="bench-openenv-"), num_train=64, num_test=8).model_dir)
    if args.serve_stub is not None:
        serve_stub(args.serve_stub, args.model)
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    from recipe.atropos.trajectory.runapi_client import AtroposRunAPIClient

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    servers, policy_url, gateway = _servers(args.model, args.policy)
    env_url, api_url = servers[0].url, servers[1].url
    try:
        client = AtroposRunAPIClient(api_url, timeout=5, retry_attempts=1, max_wait_time=5)
        client.register_trainer(batch_size=4, max_token_len=256, num_steps=10**6)
        client.get_batch()  # run-api takes environments once the trainer asked for a batch
        processes = [psutil.Process(), *(psutil.Process(server.process.pid) for server in servers)]
        if gateway is not None:
            processes.append(psutil.Process(gateway.process.pid))

        def cpu() -> float:
            return sum(sum(p.cpu_times()[:2]) for p in processes)

        print(f"policy: {args.policy}; {args.episodes} episodes per measurement, best of {args.repeats}; CPU: this "
              "process, the OpenEnv server, run-api and the policy endpoint together")
        print(f"{'concurrency':>11} {'bare ep/s':>10} {'driver ep/s':>12} {'time ratio':>11} "
              f"{'bare CPU ms/ep':>15} {'driver CPU ms/ep':>17} {'CPU ratio':>10}")
        for concurrency in args.concurrency:
            bare, drv = (0.0, float("inf")), (0.0, float("inf"))
            for _ in range(args.repeats):
                b = asyncio.run(bare_loop(env_url, policy_url, tokenizer, concurrency, args.episodes, cpu))
                d = asyncio.run(driver(env_url, policy_url, api_url, args.model, concurrency, args.episodes, cpu))
                bare, drv = (max(bare[0], b[0]), min(bare[1], b[1])), (max(drv[0], d[0]), min(drv[1], d[1]))
            print(f"{concurrency:>11} {bare[0]:>10.1f} {drv[0]:>12.1f} {bare[0] / drv[0]:>10.2f}x "
                  f"{bare[1]:>15.2f} {drv[1]:>17.2f} {drv[1] / bare[1]:>9.2f}x", flush=True)
    finally:
        if gateway is not None:
            gateway.stop()
        for server in servers:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
