"""The runner's two patches of its dependencies, where they offer no seam; `apply()` installs both, in
the runner's process only (runner.run calls it)."""

from __future__ import annotations

import functools

__all__ = ["apply", "cache_default_factory_checks", "use_gateway_transport"]


def apply() -> None:
    cache_default_factory_checks()
    use_gateway_transport()


def use_gateway_transport() -> None:
    """verifiers' training client talks to the gateway through transport.GatewayTransport (aiohttp).

    `TrainClient.__init__` builds its own OpenAI SDK client from its config
    (`verifiers.v1.clients.train.build_async_openai`); verifiers takes a client config, never a client or
    a transport (the missing seam), so this replaces that name in the train-client module: the
    evaluation client and everything else keep theirs.
    """
    from verifiers.v1.clients import train

    from recipe.atropos.verifiers.transport import GatewayTransport

    train.build_async_openai = GatewayTransport


def cache_default_factory_checks() -> None:
    """Cache pydantic's check of whether a field's default factory takes the validated data.

    verifiers builds every turn's message graph with `MessageNode.model_construct`, and pydantic 2
    (`FieldInfo.get_default`) inspects each default factory's signature on every such call; for builtin
    factories (`list`, `dict`) `inspect` parses their text signature, copying `sys.modules` to do it:
    ~2 ms per node with the 5,600 modules a runner has loaded, more than the rest of a single-turn
    episode's own work (0.01 ms cached). pydantic caches it only for private attributes (the missing
    seam), so this memoizes `pydantic._internal._fields.takes_validated_data_argument` per factory, in
    this process only; unhashable factories are inspected as before. A pydantic without it: no-op.
    """
    from pydantic._internal import _fields

    check = getattr(_fields, "takes_validated_data_argument", None)
    if check is None or getattr(check, "cached_by_runner", False):
        return
    cached = functools.lru_cache(maxsize=None)(check)

    def takes_validated_data_argument(default_factory):
        try:
            return cached(default_factory)
        except TypeError:  # an unhashable factory
            return check(default_factory)

    takes_validated_data_argument.cached_by_runner = True
    _fields.takes_validated_data_argument = takes_validated_data_argument
