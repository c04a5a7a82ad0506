"""OpenAI-compatible HTTP API over a `PolicyService`: `/v1/completions`, `/v1/models`, `/health`.

Environments (Atropos-style) sample from the policy being trained through this API while verl's
agent loop talks to the same service over Ray. `/v1/completions` takes the prompt as text, token
ids, or a list of either; `max_tokens`, `temperature`, `top_p`, `top_k`, `n`, `seed`, `logprobs`
(top-N per position), `echo` (prompt tokens and their log-probs first; with `max_tokens: 0` this
scores a fixed text), `stop` (strings), and vLLM's `return_token_ids`. Answers have OpenAI's shape.
No streaming.

`/v1/chat/completions` renders `messages` with the model's chat template (the tokenizer's, as vLLM
does: `add_generation_prompt` true by default, vLLM's `continue_final_message` and
`chat_template_kwargs`), samples as above and answers OpenAI's chat shape: `message.content`,
`finish_reason`, with `logprobs: true` per-token `logprobs.content` (`top_logprobs` alternatives),
and vLLM's extras: `return_token_ids` (`prompt_token_ids` on the answer, `token_ids` per choice) and
`return_tokens_as_token_ids` (token strings `token_id:<id>`). This is what atroposlib's
`server_type: openai` (`OpenAIServer`, `APIServer.chat_completion`) and `vllm` (`VLLMServer`, whose
chat calls go to the same route) read; its `ManagedServer` instead posts `/generate`.

`/generate` answers atroposlib's `server_type: vllm` and `sglang` (vLLM's and SGLang's native
requests and answers, see recipe/atropos/trajectory/generate_api.py): the tokens and log-probs that
atroposlib's ManagedServer turns into ScoredData.

Standalone (no trainer; serves a checkpoint folder):

    python -m recipe.atropos.cpu.openai_api --model outputs/assets/model --port 8001
"""

from __future__ import annotations

import argparse
import time
import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from pydantic import Field, ValidationError

from recipe.atropos.cpu.hf_generation import FINISH_STOP, Completion, SamplingSettings
from recipe.atropos.cpu.policy_service import PolicyService
from recipe.atropos.trajectory.generate_api import Sample, SamplingFields, parse_generate_request

LOOPBACK_HOST = "127.0.0.1"
MAX_TOP_LOGPROBS = 20


class CompletionRequest(SamplingFields):
    """The fields of OpenAI's completions request this server honours (others are ignored)."""

    model: str | None = None
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int = Field(default=16, ge=0)  # 0: only score the prompt (with echo)
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False
    stream: bool = False
    return_token_ids: bool = False


class ChatCompletionRequest(SamplingFields):
    """The fields of OpenAI's chat request this server honours, plus vLLM's extras (others ignored)."""

    model: str | None = None
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)  # None: the room left in the context (as vLLM)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    stream: bool = False
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_ids: bool = False
    return_tokens_as_token_ids: bool = False


def _sampling_settings(fields: SamplingFields, top_logprobs: int = 0) -> SamplingSettings:
    return SamplingSettings(
        max_tokens=max(fields.max_tokens, 1),
        temperature=fields.temperature,
        top_p=fields.top_p,
        top_k=fields.top_k,
        repetition_penalty=fields.repetition_penalty,
        seed=fields.seed,
        top_logprobs=top_logprobs,
    )


def _stops(fields: SamplingFields) -> list[str]:
    return [fields.stop] if isinstance(fields.stop, str) else list(fields.stop or [])


router = APIRouter()


def _service(raw: Request) -> PolicyService:
    """The one object the handlers share: the app's policy service (``app.state.policy``)."""
    return raw.app.state.policy


Service = Annotated[PolicyService, Depends(_service)]


def build_app(service: PolicyService) -> FastAPI:
    app = FastAPI(title="verl HF rollout (OpenAI-compatible)")
    app.state.policy = service
    app.include_router(router)
    return app


@router.get("/health")
async def health(service: Service) -> dict[str, Any]:
    return {"status": "ok", "global_steps": service.global_steps, "weight_version": service.weight_version}


@router.get("/v1/models")
async def models(service: Service) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [{"id": service.model_name, "object": "model", "created": 0, "owned_by": "verl-hf-rollout"}],
    }


@router.post("/v1/completions")
async def completions(request: CompletionRequest, service: Service) -> dict[str, Any]:
    if request.stream:
        raise HTTPException(status_code=400, detail="stream=true is not supported")
    if request.max_tokens == 0 and not request.echo:
        raise HTTPException(status_code=400, detail="max_tokens=0 needs echo=true (scoring the prompt)")
    prompts = _prompt_token_ids(service.tokenizer, request.prompt)
    if not prompts or any(len(p) == 0 for p in prompts):
        raise HTTPException(status_code=400, detail="empty prompt")
    too_long = [len(p) for p in prompts if len(p) >= service.generator.max_model_len and request.max_tokens > 0]
    if too_long:
        raise HTTPException(
            status_code=400,
            detail=f"prompt of {too_long[0]} tokens fills the context ({service.generator.max_model_len})",
        )
    settings = _sampling_settings(request, top_logprobs=request.logprobs or 0)
    stops = _stops(request)
    choices = []
    usage_completion = 0
    for prompt_index, prompt in enumerate(prompts):
        if request.max_tokens == 0:
            samples = [Completion(token_ids=[], log_probs=[], finish_reason="length")] * request.n
        else:
            samples = await service.generate([prompt] * request.n, settings)
        echo = await service.prompt_logprobs(prompt, request.logprobs or 0) if request.echo else None
        for sample_index, sample in enumerate(samples):
            sample = _cut_at_stop(service.tokenizer, _cut_at_stop_token(sample, request.stop_token_ids), stops)
            usage_completion += len(sample.token_ids)
            choices.append(
                _choice(service.tokenizer, request, prompt_index * request.n + sample_index, prompt, sample, echo)
            )
    prompt_tokens = sum(len(p) for p in prompts)
    return {
        "id": f"cmpl-{uuid.uuid4().hex}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": request.model or service.model_name,
        "choices": choices,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": usage_completion,
            "total_tokens": prompt_tokens + usage_completion,
        },
    }


@router.post("/v1/chat/completions")
async def chat_completions(request: ChatCompletionRequest, service: Service) -> dict[str, Any]:
    if request.stream:
        raise HTTPException(status_code=400, detail="stream=true is not supported")
    prompt = _chat_prompt_token_ids(service.tokenizer, request)
    room = service.generator.max_model_len - len(prompt)
    if room < 1:
        raise HTTPException(
            status_code=400,
            detail=f"the chat's prompt of {len(prompt)} tokens fills the context ({service.generator.max_model_len})",
        )
    wanted = request.max_completion_tokens or request.max_tokens or room
    top_n = (request.top_logprobs or 0) if request.logprobs else 0
    settings = _sampling_settings(request.model_copy(update={"max_tokens": min(wanted, room)}), top_logprobs=top_n)
    stops = _stops(request)
    samples = await service.generate([prompt] * request.n, settings)
    samples = [_cut_at_stop(service.tokenizer, sample, stops) for sample in samples]
    completion_tokens = sum(len(sample.token_ids) for sample in samples)
    answer: dict[str, Any] = {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": request.model or service.model_name,
        "choices": [_chat_choice(service.tokenizer, request, i, sample) for i, sample in enumerate(samples)],
        "usage": {
            "prompt_tokens": len(prompt),
            "completion_tokens": completion_tokens,
            "total_tokens": len(prompt) + completion_tokens,
        },
    }
    if request.return_token_ids:
        answer["prompt_token_ids"] = prompt
    return answer


@router.post("/generate")
async def generate(raw: Request, service: Service) -> dict[str, Any] | list[dict[str, Any]]:
    try:
        request = parse_generate_request(await raw.json())
    except ValidationError as exc:
        raise HTTPException(status_code=422, detail=exc.errors(include_url=False)) from exc
    except ValueError as exc:
        raise HTTPException(status_code=400, detail=str(exc)) from exc
    prompt = request.prompt_token_ids
    if prompt is None:
        prompt = service.tokenizer(request.prompt_text)["input_ids"]
    if not prompt:
        raise HTTPException(status_code=400, detail="empty prompt")
    if len(prompt) >= service.generator.max_model_len:
        raise HTTPException(
            status_code=400, detail=f"prompt of {len(prompt)} tokens fills the context ({service.generator.max_model_len})"
        )
    sampling = request.sampling
    stops = _stops(sampling)
    samples = await service.generate([prompt] * sampling.n, _sampling_settings(sampling))
    samples = [_cut_at_stop(service.tokenizer, s, stops) for s in samples]
    return request.answer(
        prompt,
        [
            Sample(service.tokenizer.decode(s.token_ids, skip_special_tokens=True), s.token_ids, s.log_probs, s.finish_reason)
            for s in samples
        ],
    )


def _prompt_token_ids(tokenizer: Any, prompt: str | list[str] | list[int] | list[list[int]]) -> list[list[int]]:
    if isinstance(prompt, str):
        return [tokenizer(prompt)["input_ids"]]
    if prompt and all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    return [tokenizer(p)["input_ids"] if isinstance(p, str) else list(p) for p in prompt]


def _chat_prompt_token_ids(tokenizer: Any, request: ChatCompletionRequest) -> list[int]:
    """The chat rendered with the tokenizer's template, then tokenized without adding special tokens
    (the template writes them), as vLLM's chat route does."""
    messages = [{**m, "content": _message_text(m.get("content"))} for m in request.messages]
    try:
        text = tokenizer.apply_chat_template(
            messages,
            tokenize=False,
            add_generation_prompt=request.add_generation_prompt and not request.continue_final_message,
            continue_final_message=request.continue_final_message,
            **(request.chat_template_kwargs or {}),
        )
    except Exception as exc:  # jinja errors, a tokenizer with no template: the request's fault
        raise HTTPException(status_code=400, detail=f"cannot apply the model's chat template: {exc}") from exc
    prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not prompt:
        raise HTTPException(status_code=400, detail="the chat renders to an empty prompt")
    return list(prompt)


def _message_text(content: Any) -> Any:
    """OpenAI's content parts (`[{"type": "text", "text": ...}]`) as one string; other content as is."""
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict) and part.get("type") == "text")
    return content


def _chat_choice(tokenizer: Any, request: ChatCompletionRequest, index: int, sample: Completion) -> dict[str, Any]:
    stops = _stops(request)
    text = _text_before_stop(tokenizer.decode(sample.token_ids, skip_special_tokens=True), stops)
    choice: dict[str, Any] = {
        "index": index,
        "message": {"role": "assistant", "content": text, "tool_calls": []},
        "logprobs": None,
        "finish_reason": sample.finish_reason,
        "stop_reason": None,
    }
    if request.logprobs:

        def token_entry(token_id: int, logprob: float) -> dict[str, Any]:
            token = f"token_id:{token_id}" if request.return_tokens_as_token_ids else tokenizer.decode([token_id])
            return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

        tops = list(sample.top_logprobs) or [{}] * len(sample.token_ids)
        choice["logprobs"] = {
            "content": [
                {**token_entry(token_id, logprob), "top_logprobs": [token_entry(t, lp) for t, lp in top.items()]}
                for token_id, logprob, top in zip(sample.token_ids, sample.log_probs, tops, strict=True)
            ]
        }
    if request.return_token_ids:
        choice["token_ids"] = list(sample.token_ids)
    return choice


def _cut_at_stop(tokenizer: Any, sample: Completion, stops: list[str]) -> Completion:
    """The shortest prefix of `sample` whose text contains a stop string (OpenAI's `stop`)."""
    if not stops:
        return sample
    for length in range(1, len(sample.token_ids) + 1):
        text = tokenizer.decode(sample.token_ids[:length], skip_special_tokens=True)
        if any(stop in text for stop in stops):
            return Completion(
                token_ids=sample.token_ids[:length],
                log_probs=sample.log_probs[:length],
                finish_reason=FINISH_STOP,
                top_logprobs=sample.top_logprobs[:length],
            )
    return sample


def _cut_at_stop_token(sample: Completion, stop_token_ids: list[int] | None) -> Completion:
    """`sample` up to and with its first token in `stop_token_ids` (vLLM's `stop_token_ids`)."""
    stops = set(stop_token_ids or ())
    stop_at = [i for i, t in enumerate(sample.token_ids) if t in stops]
    if not stop_at:
        return sample
    length = stop_at[0] + 1
    return Completion(token_ids=sample.token_ids[:length], log_probs=sample.log_probs[:length],
                      finish_reason=FINISH_STOP, top_logprobs=sample.top_logprobs[:length])


def _text_before_stop(text: str, stops: list[str]) -> str:
    cuts = [text.find(stop) for stop in stops if stop in text]
    return text[: min(cuts)] if cuts else text


def _choice(
    tokenizer: Any,
    request: CompletionRequest,
    index: int,
    prompt: list[int],
    sample: Completion,
    echo: tuple[list[float | None], list[dict[int, float] | None]] | None,
) -> dict[str, Any]:
    stops = _stops(request)
    completion_text = _text_before_stop(tokenizer.decode(sample.token_ids, skip_special_tokens=True), stops)
    tokens = list(sample.token_ids)
    token_logprobs: list[float | None] = list(sample.log_probs)
    top: list[dict[int, float] | None] = list(sample.top_logprobs) or [None] * len(tokens)
    text = completion_text
    if echo is not None:
        prompt_text = tokenizer.decode(prompt, skip_special_tokens=True)
        text = prompt_text + completion_text
        tokens = prompt + tokens
        token_logprobs = echo[0] + token_logprobs
        top = echo[1] + top
    choice: dict[str, Any] = {"index": index, "text": text, "logprobs": None, "finish_reason": sample.finish_reason}
    if request.logprobs is not None:
        token_strings = [tokenizer.decode([t]) for t in tokens]
        offsets, position = [], 0
        for token_string in token_strings:
            offsets.append(position)
            position += len(token_string)
        choice["logprobs"] = {
            "tokens": token_strings,
            "token_logprobs": token_logprobs,
            "top_logprobs": [
                None if entry is None else {tokenizer.decode([t]): lp for t, lp in entry.items()} for entry in top
            ]
            if request.logprobs > 0
            else None,
            "text_offset": offsets,
        }
    if request.return_token_ids:
        choice["prompt_token_ids"] = prompt
        choice["token_ids"] = list(sample.token_ids)
    return choice


def main() -> None:
    import uvicorn
    from transformers import AutoTokenizer

    from recipe.atropos.cpu.hf_generation import HFGenerator
    from recipe.atropos.cpu.threads import set_torch_threads

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="Hugging Face model folder (weights + tokenizer)")
    parser.add_argument("--host", default=LOOPBACK_HOST, help="address to bind (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8001, help="port (default: %(default)s)")
    parser.add_argument("--served-model-name", default=None, help="model id to report (default: the folder)")
    parser.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    args = parser.parse_args()

    set_torch_threads()
    service = PolicyService(
        HFGenerator.from_pretrained(args.model, max_model_len=args.max_model_len),
        AutoTokenizer.from_pretrained(args.model),
        args.served_model_name or args.model,
    )
    uvicorn.run(build_app(service), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
