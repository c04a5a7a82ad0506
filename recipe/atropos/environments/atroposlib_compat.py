"""atroposlib 0.4.0 under transformers 5, in environment processes only.

atroposlib 0.4.0 was written against transformers 4, where ``tokenizer.apply_chat_template(chat)``
(``tokenize=True`` by default) returned a list of token ids. transformers 5 changed the default of
``return_dict`` to True: the same call now returns a ``BatchEncoding`` (``{"input_ids": ...,
"attention_mask": ...}``). Nothing raises at the call:

- atroposlib's ``tokenize_for_trainer`` (``atroposlib/utils/tokenize_for_trainer.py``), which most
  Atropos environments use to turn a chat into ``tokens``/``masks``, builds its ``masks`` from
  ``len(...)`` of that object (2, the number of keys) and returns the ``BatchEncoding`` as
  ``tokens``; ``handle_send_to_api`` then logs ``Object of type BatchEncoding is not JSON
  serializable`` for every group and nothing reaches ``run-api``;
- environments that count prompt tokens with ``len(tokenizer.apply_chat_template(messages))`` get 2.

:func:`apply` restores transformers 4's default for calls that do not choose: ``return_dict`` is
False unless the caller passes it (or asks for ``return_assistant_tokens_mask``, which needs the
dict). Explicit ``return_dict=True`` calls, ``tokenize=False`` calls and everything else behave as
transformers 5 documents. verl needs transformers >= 5.5.3 and atroposlib has no release for
transformers 5, so one venv cannot hold versions that agree; this module bridges them where
atroposlib runs, and only there: the launcher starts Atropos environments through
``python -m recipe.atropos.environments.run_env`` (``launcher.environments[i].atroposlib_compat``,
default true), which calls :func:`apply` before the environment's file runs. The trainer and the
rollout servers never load it. Nothing of atroposlib or of the environment is edited.

Drop this module once atroposlib supports transformers 5 (its ``tokenize_for_trainer`` passes
``return_dict=False`` itself).
"""

from __future__ import annotations

import functools
from typing import Any

_PATCHED_FLAG = "_atropos_transformers4_chat_template_default"


def apply() -> bool:
    """Make ``apply_chat_template`` return token ids by default again; True if it changed anything.

    Idempotent. With transformers 4 (whose default already is ``return_dict=False``) nothing changes.
    """
    from transformers import PreTrainedTokenizerBase

    original = PreTrainedTokenizerBase.apply_chat_template
    if getattr(original, _PATCHED_FLAG, False) or not _defaults_to_dict(original):
        return False

    @functools.wraps(original)
    def apply_chat_template(self: Any, conversation: Any, *args: Any, **kwargs: Any) -> Any:
        if "return_dict" not in kwargs and not kwargs.get("return_assistant_tokens_mask"):
            kwargs["return_dict"] = False  # transformers 4's default, which atroposlib 0.4.0 relies on
        return original(self, conversation, *args, **kwargs)

    setattr(apply_chat_template, _PATCHED_FLAG, True)
    PreTrainedTokenizerBase.apply_chat_template = apply_chat_template
    return True


def _defaults_to_dict(method: Any) -> bool:
    import inspect

    parameter = inspect.signature(method).parameters.get("return_dict")
    return parameter is not None and parameter.default is True
