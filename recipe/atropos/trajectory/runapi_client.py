"""Client of Atropos' trajectory API (atroposlib ``run-api``: ``/register``, ``/batch``, ``/status``, ``/info``).

The pull-based API of trajectory mode; every call goes through the same retry policy as the
environment service's (:class:`~recipe.atropos.http_retry.RetryingClient`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from recipe.atropos import wire
from recipe.atropos.datatypes import TrajectoryInfo, TrajectoryStatus
from recipe.atropos.errors import AtroposProtocolError, AtroposRequestError
from recipe.atropos.http_retry import Answer, RetryingClient

__all__ = ["AtroposRunAPIClient"]


class AtroposRunAPIClient(RetryingClient):
    """Client of one Atropos trajectory API; arguments as :class:`~recipe.atropos.http_retry.RetryingClient`."""

    def register_trainer(
        self,
        *,
        batch_size: int,
        max_token_len: int,
        num_steps: int,
        wandb_group: str = "",
        wandb_project: str = "",
        checkpoint_dir: str = "",
        save_checkpoint_interval: int = -1,
        starting_step: int = 0,
    ) -> int:
        """``POST /register``: announce the trainer to the trajectory API; returns its uuid.

        Environments wait for this before they send scored groups. ``save_checkpoint_interval``
        -1 tells them the trainer does not checkpoint on their schedule.
        """
        payload = {
            "wandb_group": wandb_group,
            "wandb_project": wandb_project,
            "batch_size": int(batch_size),
            "max_token_len": int(max_token_len),
            "checkpoint_dir": checkpoint_dir,
            "save_checkpoint_interval": int(save_checkpoint_interval),
            "starting_step": int(starting_step),
            "num_steps": int(num_steps),
        }
        where = f"POST {self.api_url}/register"

        def trainer_uuid(answer: Answer) -> int:
            uuid = answer.body.get("uuid") if isinstance(answer.body, Mapping) else None
            if not isinstance(uuid, int) or isinstance(uuid, bool):
                raise AtroposProtocolError(
                    f"{where}: expected {{'uuid': <int>}}, got {answer.body!r:.200}", field="uuid"
                )
            return uuid

        # The uuid is a 128-bit integer: decoded with the stdlib, which keeps it exact.
        return self._request(
            "POST", "/register", payload=payload, accept=wire.JSON, exact_integers=True, parse=trainer_uuid
        )

    def get_batch(self) -> list[dict[str, Any]] | None:
        """``GET /batch``: the next training batch (a list of scored groups), or None if not ready.

        Each group has ``tokens``, ``masks`` (-100 = not trained) and ``scores``, one item per
        sequence, plus optional ``advantages``, ``overrides``, ... as the environment sent them.
        A trainer that has not registered gets an :class:`AtroposRequestError` (code
        ``not_registered``): the API answers that with a 200.
        """
        url = f"{self.api_url}/batch"
        where = f"GET {url}"

        def scored_groups(answer: Answer) -> list[dict[str, Any]] | None:
            body = answer.body
            if not isinstance(body, Mapping):
                raise AtroposProtocolError(f"{where}: expected a JSON object, got {wire.type_name(body)}", field="body")
            if body.get("status") == "error":
                message = str(body.get("message", "no message"))
                raise AtroposRequestError(
                    f"{where}: the trajectory API refused: {message}",
                    status=answer.status,
                    code="not_registered" if "register" in message.lower() else "error",
                    service_message=message,
                    method="GET",
                    url=url,
                )
            if "batch" not in body:
                raise AtroposProtocolError(f"{where}: answer has no 'batch' field: {body!r:.200}", field="batch")
            batch = body["batch"]
            if batch is None:
                return None
            if not isinstance(batch, list):
                raise AtroposProtocolError(
                    f"{where}: batch: expected a list of groups, got {wire.type_name(batch)}", field="batch"
                )
            for group_index, group in enumerate(batch):
                _check_scored_group(group, group_index, where)
            return batch

        return self._request("GET", "/batch", accept=wire.JSON, parse=scored_groups)

    def status(self) -> TrajectoryStatus:
        """``GET /status``: the step the trajectory API counts and how many groups it has queued."""
        where = f"GET {self.api_url}/status"
        return self._request(
            "GET",
            "/status",
            accept=wire.JSON,
            parse=lambda answer: TrajectoryStatus(**_int_fields(answer.body, ("current_step", "queue_size"), where)),
        )

    def info(self) -> TrajectoryInfo:
        """``GET /info``: the registered batch size and token budget (-1 before registration)."""
        where = f"GET {self.api_url}/info"
        return self._request(
            "GET",
            "/info",
            accept=wire.JSON,
            parse=lambda answer: TrajectoryInfo(**_int_fields(answer.body, ("batch_size", "max_token_len"), where)),
        )



def _check_scored_group(group: Any, group_index: int, where: str) -> None:
    """A trajectory-API group must be an object whose ``tokens`` is a list: the rows it counts for.

    The rest of its shape is checked by the conversion (trajectory.py), which can drop one bad
    sequence or group without losing the batch (run-api has already handed the batch out).
    """
    field = f"batch[{group_index}]"
    if not isinstance(group, Mapping):
        raise AtroposProtocolError(f"{where}: {field}: expected an object, got {wire.type_name(group)}", field="batch")
    if not isinstance(group.get("tokens"), list):
        raise AtroposProtocolError(
            f"{where}: {field}.tokens: expected a list, got {wire.type_name(group.get('tokens'))}", field="batch.tokens"
        )


def _int_fields(body: Any, names: tuple[str, ...], where: str) -> dict[str, int]:
    if not isinstance(body, Mapping):
        raise AtroposProtocolError(f"{where}: expected a JSON object, got {wire.type_name(body)}", field="body")
    fields: dict[str, int] = {}
    for name in names:
        value = body.get(name)
        if not isinstance(value, int) or isinstance(value, bool):
            raise AtroposProtocolError(f"{where}: {name}: expected an int, got {wire.type_name(value)}", field=name)
        fields[name] = value
    return fields
