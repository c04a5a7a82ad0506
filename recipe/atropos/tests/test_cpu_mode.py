"""CPU mode: the "cpu" platform, the "hf" rollout backend, and verl's real RayPPOTrainer running GRPO on CPU.

From cheap to expensive: sampling and weight loading on the tiny model; the rollout server (verl's
`TokenOutput`, weight commits, its OpenAI endpoint) without Ray; the standalone OpenAI server; what
`VERL_PLATFORM=cpu` turns on in a fresh verl process; and 3 GRPO steps of `python -m verl.trainer.main_ppo`
with `recipe/atropos/config/cpu_grpo.yaml` (Ray, FSDP2 worker, agent loop, actor update, weight sync).
Run under `loopback-only`: servers and Ray bind loopback only.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import torch

from recipe.atropos.cpu.hf_generation import FINISH_LENGTH, HFGenerator, SamplingSettings
from recipe.atropos.tests.cpu_probe import PROBE_OUTPUT_ENV, PROBE_TEXT
from recipe.atropos.tests.servers import find_free_loopback_port, start_server_process

from .conftest import PYTHON, REPO_ROOT, repo_env
from .e2e_harness import Launched

CPU_CONFIG_DIR = REPO_ROOT / "recipe/atropos/config"
CPU_MODE_ENV = {"VERL_PLATFORM": "cpu", "VERL_USE_EXTERNAL_MODULES": "recipe.atropos.cpu"}


@pytest.fixture(scope="module")
def generator(tiny_assets) -> HFGenerator:
    torch.set_num_threads(1)
    return HFGenerator.from_pretrained(tiny_assets.model_dir, max_model_len=160)


@pytest.fixture(scope="module")
def tokenizer(tiny_assets):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_assets.model_dir))


@pytest.fixture(scope="module")
def prompt_ids(tokenizer) -> list[int]:
    return tokenizer(PROBE_TEXT)["input_ids"]


# -- sampling and weights (HFGenerator) ------------------------------------------------------------


def test_seed_fixes_the_samples_and_n_samples_differ(generator, prompt_ids):
    settings = SamplingSettings(max_tokens=12, temperature=1.0, seed=7)
    first = generator.generate([prompt_ids] * 4, settings)
    again = generator.generate([prompt_ids] * 4, settings)
    other_seed = generator.generate([prompt_ids] * 4, SamplingSettings(max_tokens=12, temperature=1.0, seed=8))
    assert [c.token_ids for c in first] == [c.token_ids for c in again]
    assert [c.log_probs for c in first] == [c.log_probs for c in again]
    assert len({tuple(c.token_ids) for c in first}) > 1  # the n samples of one prompt are not copies
    assert [c.token_ids for c in other_seed] != [c.token_ids for c in first]


def test_log_probs_are_those_of_the_sampled_distribution(generator, prompt_ids):
    temperature = 0.7
    (completion,) = generator.generate([prompt_ids], SamplingSettings(max_tokens=10, temperature=temperature, seed=3))
    sequence = torch.tensor([prompt_ids + completion.token_ids])
    with torch.no_grad():
        logits = generator.model(input_ids=sequence).logits[0, len(prompt_ids) - 1 : -1] / temperature
    expected = torch.log_softmax(logits, dim=-1).gather(-1, torch.tensor(completion.token_ids)[:, None]).squeeze(-1)
    torch.testing.assert_close(torch.tensor(completion.log_probs), expected, atol=1e-4, rtol=1e-4)


def test_greedy_top_k_and_max_tokens(generator, prompt_ids):
    greedy = generator.generate([prompt_ids], SamplingSettings(max_tokens=8, temperature=0))[0]
    top_1 = generator.generate([prompt_ids], SamplingSettings(max_tokens=8, temperature=1.0, top_k=1))[0]
    assert greedy.token_ids == top_1.token_ids
    assert 1 <= len(greedy.token_ids) <= 8
    assert greedy.finish_reason == FINISH_LENGTH or greedy.token_ids[-1] in generator.eos_token_ids
    one = generator.generate([prompt_ids], SamplingSettings(max_tokens=1, temperature=1.0, seed=0))[0]
    assert len(one.token_ids) == 1 and len(one.log_probs) == 1


def test_a_left_padded_batch_samples_as_each_prompt_alone(generator, tokenizer):
    prompts = [tokenizer(text)["input_ids"] for text in ("Ana has 9 pens.", "Li has 2 eggs and gets 5 more.", "7")]
    greedy = SamplingSettings(max_tokens=10, temperature=0)
    batched = generator.generate(prompts, greedy)
    alone = [generator.generate([p], greedy)[0] for p in prompts]
    assert [c.token_ids for c in batched] == [c.token_ids for c in alone]
    for b, a in zip(batched, alone, strict=True):
        torch.testing.assert_close(torch.tensor(b.log_probs), torch.tensor(a.log_probs), atol=1e-4, rtol=1e-4)


def test_weight_update_by_tied_name_changes_the_policy(tiny_assets, prompt_ids):
    generator = HFGenerator.from_pretrained(tiny_assets.model_dir)
    assert generator.model.config.tie_word_embeddings
    before, _ = generator.prompt_logprobs(prompt_ids)
    embedding = generator.model.get_input_embeddings().weight
    new_head = embedding.detach() + 0.5 * torch.randn_like(embedding)
    with pytest.raises(KeyError):  # an unknown name is refused before anything is copied
        generator.load_weights([("lm_head.weight", new_head), ("no.such.weight", new_head)])
    assert not torch.equal(embedding, new_head)
    assert generator.load_weights([("lm_head.weight", new_head)]) == 1
    assert torch.equal(generator.model.get_input_embeddings().weight, new_head)  # tied: one tensor, two names
    after, _ = generator.prompt_logprobs(prompt_ids)
    assert before[0] is None and after[0] is None
    assert max(abs(a - b) for a, b in zip(after[1:], before[1:], strict=True)) > 1e-3


# -- the rollout server, without Ray --------------------------------------------------------------


def _rollout_server(model_dir: Path):
    from verl.workers.config import HFModelConfig, RolloutConfig

    from recipe.atropos.cpu.hf_server import HFRolloutServer

    config = RolloutConfig(name="hf", prompt_length=96, response_length=16, tensor_model_parallel_size=1)
    return HFRolloutServer(config=config, model_config=HFModelConfig(path=str(model_dir)))


async def _post(url: str, body: dict) -> dict:
    response = await asyncio.to_thread(requests.post, url, json=body, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def test_rollout_server_answers_verl_and_openai_clients(tiny_assets, prompt_ids):
    from verl.workers.rollout.replica import TokenOutput

    async def scenario() -> None:
        server = _rollout_server(tiny_assets.model_dir)
        # verl's agent loop: concurrent requests, one TokenOutput each.
        sampling = {"temperature": 1.0, "top_p": 1.0, "top_k": -1, "repetition_penalty": 1.0, "logprobs": True}
        outputs = await asyncio.gather(
            *[
                server.generate(prompt_ids=prompt_ids, sampling_params=dict(sampling), request_id=str(i))
                for i in range(6)
            ]
        )
        for output in outputs:
            assert isinstance(output, TokenOutput)
            assert 1 <= len(output.token_ids) <= 16 and len(output.log_probs) == len(output.token_ids)
            assert output.stop_reason == "completed" and output.extra_fields["global_steps"] == -1
        short = await server.generate(
            prompt_ids=prompt_ids, sampling_params={**sampling, "max_tokens": 3, "logprobs": False}, request_id="x"
        )
        assert len(short.token_ids) <= 3 and short.log_probs is None

        # OpenAI endpoint, served from the same event loop.
        address = await server.launch()
        base = f"http://{address}"
        health = (await asyncio.to_thread(requests.get, f"{base}/health", timeout=10)).json()
        assert health["status"] == "ok"
        models = (await asyncio.to_thread(requests.get, f"{base}/v1/models", timeout=10)).json()
        assert models["data"][0]["id"] == str(tiny_assets.model_dir)
        body = {"prompt": PROBE_TEXT, "max_tokens": 8, "n": 3, "temperature": 1.0, "seed": 11, "logprobs": 2}
        first, again = await _post(f"{base}/v1/completions", body), await _post(f"{base}/v1/completions", body)
        assert first["object"] == "text_completion" and len(first["choices"]) == 3
        assert [c["text"] for c in first["choices"]] == [c["text"] for c in again["choices"]]
        choice = first["choices"][0]
        assert choice["finish_reason"] in ("stop", "length")
        assert len(choice["logprobs"]["tokens"]) == len(choice["logprobs"]["token_logprobs"]) >= 1
        assert all(len(top) <= 2 for top in choice["logprobs"]["top_logprobs"])
        assert first["usage"]["prompt_tokens"] == len(prompt_ids)
        by_ids = await _post(
            f"{base}/v1/completions", {"prompt": prompt_ids, "max_tokens": 4, "return_token_ids": True}
        )
        assert by_ids["choices"][0]["prompt_token_ids"] == prompt_ids
        scored_before = await _post(
            f"{base}/v1/completions", {"prompt": PROBE_TEXT, "max_tokens": 0, "echo": True, "logprobs": 0}
        )
        logprobs_before = scored_before["choices"][0]["logprobs"]["token_logprobs"]
        assert logprobs_before[0] is None and len(logprobs_before) == len(prompt_ids)
        bad = await asyncio.to_thread(
            requests.post, f"{base}/v1/completions", json={"prompt": "", "max_tokens": 2}, timeout=10
        )
        assert bad.status_code == 400

        # New weights (as HFServerAdapter sends them: buckets, then a commit) reach both clients.
        state = server.service.generator.model.state_dict()
        perturbed = [(name, tensor + 0.3 * torch.randn_like(tensor)) for name, tensor in state.items()]
        await server.receive_weights(perturbed[:3])
        assert await server.commit_weights(perturbed[3:], global_steps=5) == len(perturbed)
        scored_after = await _post(
            f"{base}/v1/completions", {"prompt": PROBE_TEXT, "max_tokens": 0, "echo": True, "logprobs": 0}
        )
        logprobs_after = scored_after["choices"][0]["logprobs"]["token_logprobs"]
        assert max(abs(a - b) for a, b in zip(logprobs_after[1:], logprobs_before[1:], strict=True)) > 1e-3
        assert (
            await server.generate(prompt_ids=prompt_ids, sampling_params=dict(sampling), request_id="y")
        ).extra_fields["global_steps"] == 5
        assert (await asyncio.to_thread(requests.get, f"{base}/health", timeout=10)).json()["global_steps"] == 5
        await server.shutdown()

    asyncio.run(scenario())


def test_standalone_openai_server(tiny_assets):
    port = find_free_loopback_port()
    argv = [PYTHON, "-m", "recipe.atropos.cpu.openai_api", "--model", str(tiny_assets.model_dir), "--port", str(port)]
    with start_server_process(argv, port=port, startup_timeout_s=90) as server:
        response = requests.post(
            f"{server.url}/v1/completions",
            json={"prompt": ["Tom has", "Mia has"], "max_tokens": 5, "n": 2, "temperature": 0.8, "stop": ["\n"]},
            timeout=30,
        )
        assert response.status_code == 200, response.text
        assert [c["index"] for c in response.json()["choices"]] == [0, 1, 2, 3]


# -- what VERL_PLATFORM=cpu turns on in a verl process --------------------------------------------

_ACTIVATION_PROBE = r"""
import json, os, torch
import verl
from verl.plugin.platform import get_platform
from verl.utils.device import get_device_name, get_nccl_backend, get_torch_device
from verl.workers.engine.base import EngineRegistry
from verl.workers.rollout.base import get_rollout_class
from verl.workers.rollout.replica import RolloutReplicaRegistry
import verl.utils.distributed as distributed
import verl.workers.engine.fsdp.transformer_impl as transformer_impl
from recipe.atropos.cpu import patches
os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ["PROBE_PORT"])
distributed.initialize_global_process_group_ray()
device = get_torch_device()
print(json.dumps({
    "platform": type(get_platform()).__name__, "device": get_device_name(), "backend": get_nccl_backend(),
    "process_group": torch.distributed.get_backend(),
    "memory": [device.memory_reserved(), device.max_memory_allocated(), list(device.mem_get_info())],
    "threads": torch.get_num_threads(),
    "engine": EngineRegistry.get_engine_cls("language_model", "fsdp2").__name__,
    "rollout": get_rollout_class("hf", "async").__name__, "replica": RolloutReplicaRegistry.get("hf").__name__,
    "offload_pins": transformer_impl.CPUOffloadPolicy(pin_memory=True).pin_memory,
    "patched": sorted(f"{m}.{a}" for m, a in patches.apply_patches()),
}))
"""


@pytest.mark.parametrize(
    "selection",
    [CPU_MODE_ENV, {"VERL_PLATFORM": "cpu"}],  # the second through the installed `verl.plugins` entry point
    ids=["external-modules", "entry-point"],
)
def test_cpu_platform_activation_in_a_fresh_verl_process(selection):
    env = repo_env(**selection, PROBE_PORT=str(find_free_loopback_port()))
    if "VERL_USE_EXTERNAL_MODULES" not in selection:
        env.pop("VERL_USE_EXTERNAL_MODULES", None)  # only the entry point can load the package then
    result = subprocess.run(
        [PYTHON, "-c", _ACTIVATION_PROBE], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen == {
        "platform": "PlatformCPU",
        "device": "cpu",
        "backend": "gloo",
        "process_group": "gloo",
        "memory": [0, 0, [0, 0]],
        "threads": 1,
        "engine": "FSDPEngineWithLMHead",
        "rollout": "HFServerAdapter",
        "replica": "HFRolloutReplica",
        "offload_pins": False,
        "patched": [
            "verl.utils.distributed.initialize_global_process_group_ray",
            "verl.workers.engine.fsdp.transformer_impl.CPUOffloadPolicy",
        ],
    }


def test_without_verl_platform_cpu_nothing_is_patched():
    probe = (
        "import verl, verl.utils.distributed as d; from recipe.atropos.cpu import patches;"
        "print(patches._applied == {}, d.initialize_global_process_group_ray.__module__)"
    )
    env = repo_env(VERL_USE_EXTERNAL_MODULES="recipe.atropos.cpu", VERL_PLATFORM="")
    result = subprocess.run([PYTHON, "-c", probe], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[-2:] == ["True", "verl.utils.distributed"]


def test_cpu_config_composes_into_another(tmp_path):
    # What a later config, in another folder, does: find cpu_grpo, build on it, override a few keys.
    (tmp_path / "on_top.yaml").write_text(
        f"hydra:\n  searchpath:\n    - file://{CPU_CONFIG_DIR}\n"
        "defaults:\n  - cpu_grpo\n  - _self_\n"
        "trainer:\n  experiment_name: on_top\n"
    )
    result = subprocess.run(
        [
            PYTHON,
            "-m",
            "verl.trainer.main_ppo",
            "--config-dir",
            str(tmp_path),
            "--config-name",
            "on_top",
            "--cfg",
            "job",
        ],
        cwd=REPO_ROOT,
        env=repo_env(**CPU_MODE_ENV),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    import yaml

    config = yaml.safe_load(result.stdout)
    assert config["trainer"]["experiment_name"] == "on_top"
    assert (config["trainer"]["device"], config["trainer"]["use_v1"]) == ("cpu", False)
    assert config["actor_rollout_ref"]["rollout"]["name"] == "hf"
    assert config["actor_rollout_ref"]["actor"]["strategy"] == "fsdp2"
    assert config["algorithm"]["adv_estimator"] == "grpo"
    assert config["ray_kwargs"]["ray_init"]["num_gpus"] == "${trainer.n_gpus_per_node}"


# -- verl's RayPPOTrainer, 3 GRPO steps on CPU ----------------------------------------------------


def _hf_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_three_grpo_steps_of_verls_trainer_on_cpu(tiny_assets, tokenizer, tmp_path):
    steps = 3
    metrics_file, probe_file, checkpoints = tmp_path / "metrics.jsonl", tmp_path / "probe.jsonl", tmp_path / "ckpt"
    env = repo_env(**CPU_MODE_ENV, VERL_FILE_LOGGER_PATH=str(metrics_file), **{PROBE_OUTPUT_ENV: str(probe_file)})
    command = [
        PYTHON, "-m", "verl.trainer.main_ppo",
        "--config-dir", str(CPU_CONFIG_DIR), "--config-name", "cpu_grpo",
        f"actor_rollout_ref.model.path={tiny_assets.model_dir}",
        f"data.train_files={tiny_assets.train_file}",
        f"data.val_files={tiny_assets.test_file}",
        "reward.custom_reward_function.path=pkg://recipe.atropos.cpu.toy_reward",
        f"trainer.total_training_steps={steps}",
        # The actor's weights at the end, in Hugging Face format, through verl's own checkpointing.
        f"trainer.save_freq={steps}",
        "actor_rollout_ref.actor.checkpoint.save_contents=[hf_model]",
        f"trainer.default_local_dir={checkpoints}",
        "+actor_rollout_ref.rollout.checkpoint_manager_class=recipe.atropos.tests.cpu_probe.ProbingCheckpointEngineManager",
        "+ray_kwargs.ray_init.include_dashboard=false",
    ]  # fmt: skip
    started = time.monotonic()
    with Launched(command, tmp_path / "trainer.log", env) as trainer:
        trainer.run_to_end(timeout_s=280)
    wall_s = time.monotonic() - started
    trainer.assert_exit(0)
    output = trainer.log(limit=10**7)
    assert "LLMServerManager: ['127.0.0.1:" in output  # the replica's OpenAI endpoint, on loopback

    # Metrics of every step went through verl's Tracking to the file backend.
    logged = [json.loads(line) for line in metrics_file.read_text().splitlines()]
    assert [entry["step"] for entry in logged] == list(range(1, steps + 1))
    for entry in logged:
        data = entry["data"]
        assert {
            "actor/pg_loss",
            "actor/grad_norm",
            "critic/score/mean",
            "timing_s/gen",
            "timing_s/update_weights",
        } <= data.keys()
        # The rollout's log-probs are the actor's (same weights, both fp32).
        assert data["training/rollout_probs_diff_max"] < 1e-3
    assert any(entry["data"]["actor/grad_norm"] > 0 for entry in logged)

    # The actor's weights changed.
    initial, final = (
        _hf_weights(tiny_assets.model_dir),
        _hf_weights(checkpoints / f"global_step_{steps}/actor/huggingface"),
    )
    assert initial.keys() <= final.keys() | {"lm_head.weight"}
    changed = [
        name
        for name in initial
        if name in final and not torch.equal(initial[name], final[name].to(initial[name].dtype))
    ]
    assert changed, "no actor weight changed in 3 GRPO steps"

    # The rollout got them: its log-probs of a fixed text, asked over its OpenAI endpoint after each
    # weight sync (step 0: before training), moved, and at the end are those of the saved weights.
    probes = [json.loads(line) for line in probe_file.read_text().splitlines()]
    assert [p["global_steps"] for p in probes] == list(range(0, steps + 1))
    assert probes[-1]["server"]["global_steps"] == steps
    first, last = torch.tensor(probes[0]["token_logprobs"][1:]), torch.tensor(probes[-1]["token_logprobs"][1:])
    assert (first - last).abs().max() > 1e-3
    initial_model = HFGenerator.from_pretrained(tiny_assets.model_dir)
    final_model = HFGenerator.from_pretrained(checkpoints / f"global_step_{steps}/actor/huggingface")
    token_ids = tokenizer(PROBE_TEXT)["input_ids"]
    for served, model in ((first, initial_model), (last, final_model)):
        expected = torch.tensor(model.prompt_logprobs(token_ids)[0][1:])
        torch.testing.assert_close(served, expected, atol=1e-4, rtol=1e-4)
    step_times = [round(entry["data"]["timing_s/step"], 2) for entry in logged]
    print(f"{steps} GRPO steps on CPU: {wall_s:.1f} s wall; step times {step_times}", file=sys.stderr)
