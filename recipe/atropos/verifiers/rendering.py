"""`ChatTemplateBridgeRenderer`: exact multi-turn token sequences for any chat template.

verifiers' training client renders each turn's prompt with a `renderers` renderer. For a model it
knows (Qwen3, Llama 3, GLM, ...) a hand-written renderer extends the previous turn's exact tokens
(`bridge_to_next_turn`); for any other model it falls back to `DefaultRenderer`, which never bridges:
it re-renders the whole conversation from text, so the policy's earlier answers are re-tokenized, and
whenever that differs from what it sampled (BPE has many spellings of one text) the trace forks into
one branch per turn. A branch then holds the earlier turns as prompt, not as sampled tokens.

This renderer is `DefaultRenderer` plus a bridge derived from the model's own chat template (the way
verl's agent loop appends tool turns): the tokens the template puts after an assistant's text (its
close, e.g. `<|im_end|>\\n`) are measured on an anchor conversation, and each new message's tokens are
the template's increment for it after that anchor. The next prompt is then

    previous prompt + previous completion (exactly as sampled)
    + the rest of the close the policy did not sample (all of it after a length cut, `\\n` after eos)
    + the new messages' tokens + the generation prompt,

so one episode is one branch: every sampled token stays sampled, every token the environment added
is a prompt token. A template that is not prefix-stable for the anchor gets no bridge (None: the
caller re-renders, as before).

The runner picks it when renderers would fall back to `DefaultRenderer` (runner.py).
"""

from __future__ import annotations

from renderers import DefaultRenderer, DefaultRendererConfig, RenderedTokens
from renderers.base import extract_message_tool_names

__all__ = ["BRIDGE_RENDERER", "ChatTemplateBridgeRenderer"]

BRIDGE_RENDERER = f"{__name__}.ChatTemplateBridgeRenderer"
_ANCHOR = "ok"


def _sampled_part_of_close(completion_ids: list[int], close_ids: list[int]) -> int:
    """How many leading tokens of the close the completion already ends with (its sampled eos)."""
    for k in range(min(len(close_ids), len(completion_ids)), 0, -1):
        if completion_ids[-k:] == close_ids[:k]:
            return k
    return 0


class ChatTemplateBridgeRenderer(DefaultRenderer):
    """`DefaultRenderer` that extends the previous turn's exact tokens (see the module's docstring)."""

    config_class = DefaultRendererConfig

    def _increments(self, messages: list, new_messages: list, tools) -> tuple[list[int], list[int]] | None:
        """The template's tokens for each of `new_messages` after `messages`, then the generation prompt:
        (token ids, index of the new message each belongs to, -1 for the generation prompt)."""
        ids = self.render_ids(messages, tools=tools)
        ext, indices = [], []
        for i in range(len(new_messages)):
            longer = self.render_ids([*messages, *new_messages[: i + 1]], tools=tools)
            if longer[: len(ids)] != ids:
                return None
            ext += longer[len(ids):]
            indices += [i] * (len(longer) - len(ids))
            ids = longer
        prompted = self.render_ids([*messages, *new_messages], tools=tools, add_generation_prompt=True)
        if prompted[: len(ids)] != ids:
            return None
        return ext + prompted[len(ids):], indices + [-1] * (len(prompted) - len(ids))

    def _close(self, tools) -> list[int] | None:
        """The tokens the template puts after an assistant's text."""
        user = [{"role": "user", "content": _ANCHOR}]
        opened = self.render_ids(user, tools=tools, add_generation_prompt=True)
        closed = self.render_ids([*user, {"role": "assistant", "content": _ANCHOR}], tools=tools)
        text = self._tokenizer.encode(_ANCHOR, add_special_tokens=False)
        if closed[: len(opened) + len(text)] != opened + text:
            return None
        return closed[len(opened) + len(text):]

    def bridge_to_next_turn(self, previous_prompt_ids, previous_completion_ids, new_messages, *, tools=None):
        if not previous_prompt_ids or not new_messages or any(m.get("role") == "assistant" for m in new_messages):
            return None
        close = self._close(tools)
        anchor = [{"role": "user", "content": _ANCHOR}, {"role": "assistant", "content": _ANCHOR}]
        increments = self._increments(anchor, new_messages, tools) if close is not None else None
        if increments is None:
            return None
        ext, ext_indices = increments
        previous = [*previous_prompt_ids, *previous_completion_ids]
        previous += close[_sampled_part_of_close(list(previous_completion_ids), close):]
        return RenderedTokens(
            token_ids=previous + ext,
            message_indices=[-1] * len(previous) + ext_indices,
            sampled_mask=[False] * (len(previous) + len(ext)),
            message_roles=[m.get("role") or "" for m in new_messages],
            message_tool_names=extract_message_tool_names(new_messages),
        )
