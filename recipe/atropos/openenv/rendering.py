"""Observations as chat messages, and chat messages as the tokens appended to an episode.

An episode's tokens are never re-tokenized: each turn appends only what is new. The first turn is the
chat template over [system?, the first observation's message] with the generation prompt; a later
turn appends the rest of the assistant turn the policy just ended (the template's closing text it
did not sample, e.g. the "\\n" after Qwen's "<|im_end|>"), then the next message and the generation
prompt, exactly as the template renders them after an assistant turn. That text is found once, by
rendering a conversation with a placeholder answer, so any template that renders a message the same
whatever came before (Qwen, Llama 3, Mistral, the tiny demo's) works; one that does not is refused
at start-up with the reason.
"""

from __future__ import annotations

import importlib
import string
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import orjson

from recipe.atropos.episodes.spec import EpisodeSpecError
from recipe.atropos.episodes.types import Completion

__all__ = ["ChatRenderer", "ObservationPrompt", "load_callable"]

_PLACEHOLDER = "\u2063ANSWER\u2063"  # invisible separators: no chat template strips or rewrites them
_NOT_TEXT = frozenset({"metadata", "reward", "done"})


def load_callable(path: str, key: str) -> Callable[..., Any]:
    """`module:attr` -> the callable; EpisodeSpecError naming `key` when it cannot be imported."""
    module_name, _, attr = path.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as exc:
        raise EpisodeSpecError(f"{key}: cannot import {path!r} ({type(exc).__name__}: {exc}); give module:callable "
                               "importable from the driver's PYTHONPATH") from exc
    if not callable(target):
        raise EpisodeSpecError(f"{key}: {path!r} is not callable")
    return target


class ObservationPrompt:
    """An observation (its fields, as the server sent them) -> the chat message of that turn."""

    def __init__(self, template: str | None = None, function: str | None = None, key: str = "prompt"):
        self.template = template
        self._function = load_callable(function, f"{key}.prompt_function") if function else None
        self._key = key

    def check(self, observation_fields: Sequence[str]) -> None:
        """Refuse a template that names a field the server's observations do not have."""
        if self.template is None:
            return
        named = {field.split(".")[0].split("[")[0] for _, field, _, _ in string.Formatter().parse(self.template) if field}
        fields = set(observation_fields) - {"reward", "done"}  # sent beside the observation, not in it
        unknown = sorted(named - fields - {"turn"})
        if unknown:
            raise EpisodeSpecError(f"{self._key}.prompt_template names {unknown}, which the server's observations do not "
                                   f"have; their fields: {sorted(fields)} (and {{turn}})")

    def __call__(self, observation: Mapping[str, Any], turn: int) -> dict[str, str]:
        if self._function is not None:
            message = self._function(dict(observation), turn)
            return {"role": "user", "content": message} if isinstance(message, str) else dict(message)
        if self.template is not None:
            return {"role": "user", "content": self.template.format_map({**observation, "turn": turn})}
        texts = [v for k, v in observation.items() if k not in _NOT_TEXT and isinstance(v, str) and v]
        content = "\n\n".join(texts) if texts else orjson.dumps(
            {k: v for k, v in observation.items() if k not in _NOT_TEXT}).decode()
        return {"role": "user", "content": content}


class ChatRenderer:
    """Chat messages -> token ids with the policy's tokenizer and its chat template."""

    def __init__(self, tokenizer: Any, system_prompt: str | None = None):
        self.tokenizer = tokenizer
        self._prefix = [{"role": "system", "content": system_prompt}] if system_prompt else []
        self._history = [*self._prefix, {"role": "user", "content": "?"}, {"role": "assistant", "content": _PLACEHOLDER}]
        self._history_text = self._render(self._history, generation_prompt=False)
        at = self._history_text.rfind(_PLACEHOLDER)
        if at < 0:
            raise EpisodeSpecError("the tokenizer's chat template drops an assistant message's text; multi-turn episodes "
                                   "need one that renders it (tokenizer_config.json chat_template)")
        self._close = self._history_text[at + len(_PLACEHOLDER):]  # e.g. "<|im_end|>\n"
        eos = tokenizer.eos_token_id
        self.stop_token_ids = [int(eos)] if eos is not None else []
        self.next_turn({"role": "user", "content": "?"}, Completion((), ()))  # refuses an unusable template now

    def _render(self, messages: list[dict[str, Any]], generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def _encode(self, text: str) -> list[int]:
        # The template's text carries its own special tokens (a BOS, if any): add none.
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def first_turn(self, message: dict[str, Any]) -> list[int]:
        """The episode's prompt: [system?, message] with the generation prompt."""
        return self._encode(self._render([*self._prefix, message], generation_prompt=True))

    def next_turn(self, message: dict[str, Any], answered: Completion) -> list[int]:
        """What follows the policy's answer `answered`: the rest of its turn, `message`, the generation prompt."""
        text = self._render([*self._history, message], generation_prompt=True)
        if not text.startswith(self._history_text):
            raise EpisodeSpecError("the tokenizer's chat template renders earlier turns differently once a message "
                                   f"follows them (role {message.get('role')!r}), so a turn cannot be appended without "
                                   "re-tokenizing the episode; use a template that renders each message on its own")
        return self._encode(self._owed_close(answered) + text[len(self._history_text):])

    def _owed_close(self, answered: Completion) -> str:
        """The assistant turn's closing text, less the stop token the policy sampled itself."""
        if answered.finish_reason == "stop" and answered.token_ids:
            last = self.tokenizer.decode([answered.token_ids[-1]], skip_special_tokens=False)
            if last and self._close.startswith(last):
                return self._close[len(last):]
        return self._close

    def text(self, completion: Completion) -> str:
        """The answer's text, as an action parser reads it (special tokens dropped)."""
        return self.tokenizer.decode(list(completion.token_ids), skip_special_tokens=True)
