"""The HF rollout server: a Ray actor that verl's agent loop and environments both sample from.

One per rollout replica, started by `HFRolloutReplica.launch_servers` under the Ray actor name
`server_actor_name(replica_rank)`, where the FSDP worker's `HFServerAdapter` finds it to push new
weights. It answers what verl calls on a rollout server (`generate` -> `TokenOutput`, `wake_up`,
`sleep`, `clear_kv_cache`, `abort_all_requests`, ...; memory calls are no-ops, the model stays on
CPU) and serves the OpenAI API (`openai_api.py`) on a loopback port from its own event loop.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from typing import Any

import torch

from recipe.atropos.cpu.hf_generation import HFGenerator, SamplingSettings
from recipe.atropos.cpu.policy_service import PolicyService

logger = logging.getLogger(__name__)

ROLLOUT_NAME = "hf"
# verl's RolloutConfig.engine_kwargs[ROLLOUT_NAME] keys (all optional).
ENGINE_KWARGS_DEFAULTS: dict[str, Any] = {"host": "127.0.0.1", "port": 0, "served_model_name": None}


def server_actor_name(replica_rank: int, node_rank: int = 0) -> str:
    """Ray actor name of a replica's server (vLLM's convention, with this backend's prefix)."""
    return f"{ROLLOUT_NAME}_server_{replica_rank}_{node_rank}"


class HFRolloutServer:
    """Ray actor (async): one `PolicyService` reachable over Ray and over HTTP."""

    def __init__(self, config: Any, model_config: Any, replica_rank: int = 0, node_rank: int = 0):
        from verl.utils.config import omega_conf_to_dataclass
        from verl.workers.config import HFModelConfig, RolloutConfig

        from recipe.atropos.cpu.threads import set_torch_threads

        set_torch_threads()
        self.config: RolloutConfig = omega_conf_to_dataclass(config, dataclass_type=RolloutConfig)
        self.model_config: HFModelConfig = omega_conf_to_dataclass(model_config, dataclass_type=HFModelConfig)
        self.replica_rank = replica_rank
        self.node_rank = node_rank
        self.engine_kwargs = {**ENGINE_KWARGS_DEFAULTS, **dict(self.config.engine_kwargs.get(ROLLOUT_NAME) or {})}

        prompt_length, response_length = self.config.prompt_length, self.config.response_length
        max_model_len = self.config.max_model_len or prompt_length + response_length
        generator = HFGenerator.from_pretrained(self.model_config.local_path, max_model_len=max_model_len)
        torch.manual_seed(self.config.seed + replica_rank)  # unseeded sampling is reproducible per run
        self.service = PolicyService(
            generator,
            self.model_config.tokenizer,
            self.engine_kwargs["served_model_name"] or self.model_config.path,
            max_batch_size=self.config.max_num_seqs,
        )
        self._http_server = None
        self._http_task: asyncio.Task | None = None
        self._address: str | None = None

    # -- lifecycle ----------------------------------------------------------------------------

    async def launch(self) -> str:
        """Start the OpenAI endpoint; returns its "host:port"."""
        import uvicorn

        from recipe.atropos.cpu.openai_api import build_app

        if self._address is not None:
            return self._address
        host, base_port = self.engine_kwargs["host"], int(self.engine_kwargs["port"])
        port = base_port + self.replica_rank if base_port else 0  # 0: any free port
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, port))
        host, port = listener.getsockname()[:2]
        if host in ("0.0.0.0", "::"):
            # Bound to every interface: advertise the node's address, which a policy gateway on
            # another node can reach (a wildcard is no address to connect to).
            import ray

            host = ray.util.get_node_ip_address()
        config = uvicorn.Config(build_app(self.service), log_level="warning", lifespan="off")
        self._http_server = uvicorn.Server(config)
        self._http_task = asyncio.create_task(self._http_server.serve(sockets=[listener]))
        while not self._http_server.started:
            if self._http_task.done():
                self._http_task.result()  # raises what stopped it
            await asyncio.sleep(0.01)
        self._address = f"{host}:{port}"
        logger.warning(
            "HF rollout replica %d: OpenAI endpoint at http://%s/v1 (pid %d)",
            self.replica_rank,
            self._address,
            os.getpid(),
        )
        return self._address

    def get_server_address(self) -> str | None:
        return self._address

    async def shutdown(self) -> None:
        """Stop the OpenAI endpoint (the actor itself ends with Ray)."""
        if self._http_server is not None and self._http_task is not None:
            self._http_server.should_exit = True
            await self._http_task
        self._http_server, self._http_task, self._address = None, None, None

    # -- token in, token out (verl's agent loop) ----------------------------------------------

    async def generate(
        self,
        prompt_ids: list[int],
        sampling_params: dict[str, Any],
        request_id: str,
        image_data: Any = None,
        video_data: Any = None,
        **kwargs: Any,
    ) -> Any:
        """One sample for `prompt_ids`, as verl's `TokenOutput` (what its vLLM server returns)."""
        from verl.workers.rollout.replica import TokenOutput

        if image_data is not None or video_data is not None or kwargs.get("audio_data") is not None:
            raise NotImplementedError("the HF rollout is text-only")
        params = dict(sampling_params)
        prompt_ids = [int(t) for t in prompt_ids]
        max_tokens = params.pop("max_tokens", params.pop("max_new_tokens", None))
        if max_tokens is None:
            # verl's default (as its vLLM server computes it): the response budget, within the total.
            prompt_length, response_length = self.config.prompt_length, self.config.response_length
            max_tokens = min(response_length, prompt_length + response_length - len(prompt_ids))
        settings = SamplingSettings(
            max_tokens=max(1, int(max_tokens)),
            temperature=float(params.get("temperature", self.config.temperature)),
            top_p=float(params.get("top_p", self.config.top_p)),
            top_k=int(params.get("top_k", self.config.top_k)),
            repetition_penalty=float(params.get("repetition_penalty", 1.0)),
            seed=params.get("seed"),
        )
        (completion,) = await self.service.generate([prompt_ids], settings)
        return TokenOutput(
            token_ids=completion.token_ids,
            log_probs=completion.log_probs if params.get("logprobs", True) else None,
            stop_reason="completed",  # stopped on EOS or length: never aborted (see abort_all_requests)
            extra_fields={"global_steps": self.service.global_steps},
        )

    # -- weights (pushed by HFServerAdapter in the FSDP worker) -------------------------------

    async def receive_weights(self, named_tensors: list[tuple[str, torch.Tensor]]) -> int:
        return self.service.stage_weights(named_tensors)

    async def commit_weights(
        self, named_tensors: list[tuple[str, torch.Tensor]], global_steps: int | None = None
    ) -> int:
        self.service.stage_weights(named_tensors)
        return await self.service.commit_weights(global_steps)

    async def set_global_steps(self, global_steps: int) -> None:
        self.service.global_steps = int(global_steps)

    async def prompt_logprobs(self, token_ids: list[int]) -> list[float | None]:
        """Log-probs of a fixed token sequence under the weights loaded now (for checks)."""
        logprobs, _ = await self.service.prompt_logprobs(token_ids)
        return logprobs

    # -- what verl calls on every rollout server: nothing to free or pause on CPU -------------

    async def wake_up(self, tags: list[str] | None = None) -> None:
        return None

    async def sleep(self) -> None:
        return None

    async def clear_kv_cache(self) -> None:
        return None  # generate() keeps no cache between requests

    async def release_kv_cache(self) -> None:
        return None

    async def resume_kv_cache(self) -> None:
        return None

    async def abort_all_requests(self, reject_request: bool = False, **kwargs: Any) -> dict[str, Any]:
        # Requests are short and run to completion; nothing is ever partially generated to abort.
        return {"aborted_count": 0, "request_ids": []}

    async def resume_generation(self) -> None:
        return None

    async def start_profile(self, **kwargs: Any) -> None:
        return None

    async def stop_profile(self) -> None:
        return None
