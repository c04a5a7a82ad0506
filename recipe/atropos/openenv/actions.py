"""The policy's answer (text) -> an OpenEnv action (the JSON object a `step` carries).

Three ways, chosen once at start-up from the entry and the action schema the server publishes at
`/schema`:
- `action_function: module:callable(text, observation) -> dict`: the user's parser; whatever it
  raises means the answer cannot be played (the entry's parse_penalty, the episode ends);
- `action_field: name`: the whole text goes into that field;
- neither: the action schema's one required field, when it is a string (`{"message": text}`); a
  schema with other required fields needs one of the two above, and the driver says so at start-up.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from recipe.atropos.episodes.spec import EpisodeSpecError
from recipe.atropos.openenv.rendering import load_callable

__all__ = ["ActionMapper", "action_mapper"]

ActionMapper = Callable[[str, Mapping[str, Any]], dict[str, Any]]


def _is_string(field_schema: Mapping[str, Any]) -> bool:
    if field_schema.get("type") == "string":
        return True
    return any(option.get("type") == "string" for option in field_schema.get("anyOf", []))


def action_mapper(action_schema: Mapping[str, Any], *, field: str | None, function: str | None,
                  key: str, url: str) -> ActionMapper:
    """The mapper for this entry (`key`: its config path, named in errors) and the server at `url`."""
    if function is not None:
        parse = load_callable(function, f"{key}.action_function")
        return lambda text, observation: dict(parse(text, dict(observation)))
    properties = action_schema.get("properties", {})
    required = list(action_schema.get("required", []))
    if field is not None:
        if field not in properties:
            raise EpisodeSpecError(f"{key}.action_field: {field!r} is not a field of the action schema at {url}/schema; "
                                   f"its fields: {sorted(properties)}")
        others = [name for name in required if name != field]
        if others:
            raise EpisodeSpecError(f"{key}.action_field: the action schema at {url}/schema also requires {others}; "
                                   "set action_function (module:callable(text, observation) -> action dict) instead")
        return lambda text, observation: {field: text}
    if len(required) == 1 and _is_string(properties.get(required[0], {})):
        name = required[0]
        return lambda text, observation: {name: text}
    described = {name: properties.get(name, {}).get("type", "?") for name in required}
    raise EpisodeSpecError(f"{key}: the action schema at {url}/schema requires {described or 'no field'}, not one string "
                           "field the answer's text can fill; set action_field (the field that gets the text) or "
                           "action_function (module:callable(text, observation) -> action dict)")
