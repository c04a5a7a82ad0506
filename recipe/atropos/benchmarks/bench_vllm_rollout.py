"""Benchmark of verl's vLLM rollout path on CPU (vLLM's CPU build, .venv-vllm), in one run:

    make install-vllm
    loopback-only .venv-vllm/bin/python -m recipe.atropos.benchmarks.bench_vllm_rollout
    loopback-only .venv-vllm/bin/python -m recipe.atropos.benchmarks.bench_vllm_rollout --sections gateway

1. Generation: generated tokens/s of vLLM's engine against the recipe's `hf` rollout engine
   (Hugging Face `generate()`, the CPU policy server), on the same batch (the same prompts, n,
   max_tokens, temperature), each behind its own OpenAI server; the ratio vLLM / hf.
2. The policy gateway's overhead: the wall time of 64 concurrent completions through the gateway
   against the same 64 sent to vLLM directly (target: at most 1.05x), for two completion lengths
   (the gateway costs per request, vLLM per token), in interleaved pairs (both see
   the same machine load); the median of the pairs' ratios, and the CPU the gateway spends per
   request set against what vLLM's processes spend per batch (the gateway shares their cores).
3. Weight sync into vLLM: verl's own path (`BucketedWeightSender` over shared memory, as the CPU
   platform selects, into verl's worker extension `update_weights_from_ipc`, which loads the weights
   and re-runs vLLM's post-load processing), the seconds per sync of the tiny model's full weights, and
   its share of one step's generation (1.). A perturbed sync is checked to change vLLM's answer.

Both servers are separate processes on free 127.0.0.1 ports (vLLM's with verl's CPU worker extension
and its dev `/collective_rpc` route, which triggers the receiving side); they share this machine's
cores with the client, as on a node. The tiny offline model is built in a temporary folder.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import multiprocessing
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil
import requests

# The sending side of the weight sync is verl's, on verl's CPU platform (no CUDA IPC).
os.environ.setdefault("VERL_PLATFORM", "cpu")
os.environ.setdefault("VERL_USE_EXTERNAL_MODULES", "recipe.atropos.cpu")

from recipe.atropos.cpu.platform import VLLM_CPU_ENV  # noqa: E402
from recipe.atropos.trajectory.gateway import PolicyGateway  # noqa: E402
from recipe.atropos.server_process import find_free_loopback_port, start_server_process  # noqa: E402

SERVED = "tiny"
JOB_ID = "bench"  # the worker's socket name: verl's VERL_RAY_JOB_ID and VERL_REPLICA_RANK
ZMQ_HANDLE = f"ipc:///tmp/rl-colocate-zmq-{JOB_ID}-replica-0-rank-0.sock"


def start_vllm(model_dir: Path):
    port = find_free_loopback_port()
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
            "--served-model-name", SERVED, "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
            "--enforce-eager", "--worker-extension-cls", "recipe.atropos.cpu.vllm_rollout.CPUColocateWorkerExtension"]
    env = {**os.environ, **VLLM_CPU_ENV, "VLLM_SERVER_DEV_MODE": "1", "VERL_RAY_JOB_ID": JOB_ID,
           "VERL_REPLICA_RANK": "0", "VLLM_LOGGING_LEVEL": "WARN"}
    return start_server_process(argv, port=port, startup_timeout_s=600, env=env)


def start_hf(model_dir: Path):
    port = find_free_loopback_port()
    argv = [sys.executable, "-m", "recipe.atropos.cpu.openai_api", "--model", str(model_dir), "--port", str(port),
            "--served-model-name", SERVED]
    return start_server_process(argv, port=port, startup_timeout_s=300)


def batch_tokens_per_s(url: str, prompts: list[str], max_tokens: int, rounds: int) -> tuple[float, float]:
    """(best tokens/s, seconds of that round) for one completions request holding the whole batch."""
    best = (0.0, 0.0)
    for r in range(rounds):
        start = time.perf_counter()
        answer = requests.post(f"{url}/v1/completions", timeout=600, json={
            "model": SERVED, "prompt": prompts, "max_tokens": max_tokens, "temperature": 1.0, "seed": r}).json()
        seconds = time.perf_counter() - start
        tokens = answer["usage"]["completion_tokens"]
        best = max(best, (tokens / seconds, seconds))
    return best


async def _concurrent(url: str, prompts: list[str], max_tokens: int) -> float:
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=len(prompts))) as client:
        start = time.perf_counter()
        answers = await asyncio.gather(*[
            client.post(f"{url}/v1/completions", json={"model": SERVED, "prompt": p, "max_tokens": max_tokens,
                                                       "temperature": 0.0})
            for p in prompts])
        seconds = time.perf_counter() - start
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers if a.status_code != 200][:1]
    return seconds


def _serve_gateway(vllm_url: str, port: int, stop) -> None:
    gateway = PolicyGateway([vllm_url], host="127.0.0.1", port=port).start()
    gateway.open(0)
    stop.wait()
    gateway.stop()


def _cpu_s(processes: list[psutil.Process]) -> float:
    """User + system CPU seconds the processes have used so far."""
    return sum(sum(p.cpu_times()[:2]) for p in processes)


@dataclasses.dataclass
class GatewayOverhead:
    direct_s: float  # median wall seconds of one batch of concurrent requests sent to vLLM
    gated_s: float  # the same through the gateway
    pair_ratio: float  # median over the interleaved pairs of gated / direct
    gateway_cpu_ms: float  # the gateway's CPU per request relayed
    vllm_cpu_s: float  # vLLM's processes' CPU per batch (direct rounds)


def gateway_overhead(vllm_server, prompts: list[str], max_tokens: int, rounds: int) -> GatewayOverhead:
    """len(prompts) concurrent requests, sent directly and through the gateway in `rounds` pairs.

    The gateway runs in a process of its own, as it does in the trainer's, not in the client's."""
    vllm_url = vllm_server.url
    vllm_processes = [psutil.Process(vllm_server.process.pid)]
    vllm_processes += vllm_processes[0].children(recursive=True)
    context = multiprocessing.get_context("spawn")
    port, stop = find_free_loopback_port(), context.Event()
    server = context.Process(target=_serve_gateway, args=(vllm_url, port, stop), daemon=True)
    server.start()
    gateway_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if requests.get(f"{gateway_url}/health", timeout=2).json()["gate"] == "open":
                    break
            except (requests.RequestException, ValueError, KeyError):
                if time.monotonic() > deadline or not server.is_alive():
                    raise
            time.sleep(0.2)
        asyncio.run(_concurrent(gateway_url, prompts, max_tokens))  # warm both paths' connections
        asyncio.run(_concurrent(vllm_url, prompts, max_tokens))
        gateway_process = psutil.Process(server.pid)
        direct, gated, vllm_cpu, gateway_cpu = [], [], 0.0, 0.0
        for _ in range(rounds):  # interleaved, so that both see the same machine load
            before = _cpu_s(vllm_processes)
            direct.append(asyncio.run(_concurrent(vllm_url, prompts, max_tokens)))
            vllm_cpu += _cpu_s(vllm_processes) - before
            before = _cpu_s([gateway_process])
            gated.append(asyncio.run(_concurrent(gateway_url, prompts, max_tokens)))
            gateway_cpu += _cpu_s([gateway_process]) - before
    finally:
        stop.set()
        server.join(30)
    return GatewayOverhead(
        statistics.median(direct), statistics.median(gated), statistics.median(g / d for g, d in zip(gated, direct)),
        1000 * gateway_cpu / (rounds * len(prompts)), vllm_cpu / rounds)


def sync_weights(vllm_url: str, named_tensors: list) -> float:
    """One weight sync through verl's sender and worker extension; its wall seconds."""
    from verl.workers.rollout.vllm_rollout.bucketed_weight_transfer import BucketedWeightSender

    result: dict = {}

    def receive() -> None:  # vLLM's workers block in update_weights_from_ipc until the last bucket
        result["answer"] = requests.post(f"{vllm_url}/collective_rpc", timeout=300, json={
            "method": "update_weights_from_ipc", "kwargs": {"use_shm": True}})

    start = time.perf_counter()
    receiver = threading.Thread(target=receive)
    receiver.start()
    sender = BucketedWeightSender(zmq_handle=ZMQ_HANDLE, bucket_size_mb=64, use_shm=True)
    asyncio.run(sender.async_send_weights(iter(named_tensors)))
    receiver.join()
    seconds = time.perf_counter() - start
    result["answer"].raise_for_status()
    return seconds


def greedy(url: str, prompt: str) -> list[float]:
    answer = requests.post(f"{url}/v1/completions", timeout=60, json={
        "model": SERVED, "prompt": prompt, "max_tokens": 4, "temperature": 0, "logprobs": 0}).json()
    return answer["choices"][0]["logprobs"]["token_logprobs"]


SECTIONS = ("generation", "gateway", "sync")


def generation_section(vllm_server, model_dir: Path, prompts: list[str], max_tokens: int, rounds: int) -> float:
    """Prints 1.; returns the seconds of vLLM's best round (one step's generation)."""
    hf_server = start_hf(model_dir)
    try:
        vllm_tps, vllm_s = batch_tokens_per_s(vllm_server.url, prompts, max_tokens, rounds)
        hf_tps, hf_s = batch_tokens_per_s(hf_server.url, prompts, max_tokens, rounds)
    finally:
        hf_server.stop()
    print(f"1. generation, {len(prompts)} prompts x {max_tokens} tokens: vLLM {vllm_tps:.0f} tok/s "
          f"({vllm_s:.2f} s), hf {hf_tps:.0f} tok/s ({hf_s:.2f} s): vLLM / hf = {vllm_tps / hf_tps:.2f}x", flush=True)
    return vllm_s


def gateway_section(vllm_server, prompts: list[str], concurrency: int, pairs: int, max_tokens: int) -> None:
    """Prints 2."""
    concurrent = (prompts * (concurrency // len(prompts) + 1))[:concurrency]
    o = gateway_overhead(vllm_server, concurrent, max_tokens, pairs)
    batch_cpu_s = o.gateway_cpu_ms * concurrency / 1000
    print(f"2. {concurrency} concurrent completions ({max_tokens} tokens), {pairs} pairs: direct {o.direct_s:.3f} s, through "
          f"the gateway {o.gated_s:.3f} s (medians): gateway / direct = {o.pair_ratio:.3f}x (median of the pairs' "
          f"ratios; target <= 1.05x); the gateway's CPU {o.gateway_cpu_ms:.2f} ms per request = {batch_cpu_s:.3f} s "
          f"per batch, {batch_cpu_s / o.vllm_cpu_s:.1%} of vLLM's {o.vllm_cpu_s:.2f} CPU s per batch", flush=True)


def sync_section(vllm_server, model_dir: Path, prompt: str, rounds: int, generation_s: float | None) -> None:
    """Prints 3.: verl's weight sync, checked to change vLLM's answers and to restore them."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    weights = [(name, tensor.detach().contiguous()) for name, tensor in model.state_dict().items()]
    before = greedy(vllm_server.url, prompt)
    sync_weights(vllm_server.url, [(n, t + 0.05 * torch.randn_like(t)) for n, t in weights])
    perturbed = greedy(vllm_server.url, prompt)
    seconds = [sync_weights(vllm_server.url, weights) for _ in range(rounds)]
    restored = greedy(vllm_server.url, prompt)
    size_mb = sum(t.numel() * t.element_size() for _, t in weights) / 2**20
    assert perturbed != before and max(abs(a - b) for a, b in zip(restored, before)) < 1e-3, (before, perturbed, restored)
    sync_s = statistics.median(seconds)
    share = f" = {sync_s / generation_s:.2f}x one step's generation ({generation_s:.2f} s)" if generation_s else ""
    print(f"3. weight sync into vLLM ({len(weights)} tensors, {size_mb:.1f} MiB, shared memory): {sync_s:.3f} s per "
          f"sync{share}; a perturbed sync changed vLLM's answer and the restoring one brought it back", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS),
                        help="what to measure (default: all)")
    parser.add_argument("--batch", type=int, default=64, help="prompts in the generation batch (default %(default)s)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--gateway-pairs", type=int, default=20,
                        help="interleaved direct/gateway rounds (default %(default)s): one round is ~0.3 s and "
                             "varies by a factor of 2 on a shared machine, so a few would say little")
    parser.add_argument("--gateway-max-tokens", type=int, nargs="+", default=[16, 128],
                        help="completion lengths of the gateway section (default %(default)s): the gateway's cost "
                             "is per request, vLLM's grows with the tokens")
    args = parser.parse_args(argv)

    from recipe.atropos.demo.tiny_assets import build_assets

    assets = build_assets(Path(tempfile.mkdtemp(prefix="bench_vllm_")), num_train=64, num_test=16)
    prompts = [f"Question: what is {a} + {b}?\nAnswer:" for a, b in zip(range(args.batch), range(3, 3 + args.batch))]
    print(f"tiny model {assets.model_dir}; starting vLLM {args.batch=} {args.max_tokens=} ...", flush=True)
    vllm_server = start_vllm(assets.model_dir)
    generation_s = None
    try:
        if "generation" in args.sections:
            generation_s = generation_section(vllm_server, assets.model_dir, prompts, args.max_tokens, args.rounds)
        if "gateway" in args.sections:
            for max_tokens in args.gateway_max_tokens:
                gateway_section(vllm_server, prompts, args.concurrency, args.gateway_pairs, max_tokens)
        if "sync" in args.sections:
            sync_section(vllm_server, assets.model_dir, prompts[0], args.rounds, generation_s)
    finally:
        vllm_server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
