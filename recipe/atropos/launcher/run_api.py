"""atroposlib's run-api with one read-only route more, ``GET /envs``: the registered environments.

    python -m recipe.atropos.launcher.run_api --host 127.0.0.1 --port 8000

run-api tags every group with the ``env_id`` it gave the environment at registration, but has no
route that says which environment an id is. ``/envs`` lists each registration in id order::

    {"envs": [{"env_id": 0, "name": "gsm8k", "real_name": "gsm8k_0", "weight": 1.0,
               "min_batch_allocation": null, "group_size": 4, "connected": true}, ...]}

``name`` is what the environment registered as (atroposlib's ``--env.wandb_name``; the launcher's
mixed configs pass each environment's launcher name). The trainer reads it to report per-environment
metrics under ``atropos/env/<name>/`` (``env_<id>`` against a plain run-api, which answers 404).
Everything else is atroposlib's own server, unchanged.
"""

from __future__ import annotations

import argparse
from typing import Any

ENVS_PATH = "/envs"


def registered_envs(state: Any) -> list[dict[str, Any]]:
    """run-api's registrations (``app.state.envs``), in id order, as ``/envs`` lists them."""
    return [
        {
            "env_id": env.get("registered_id", index),
            "name": env.get("desired_name"),
            "real_name": env.get("real_name"),
            "weight": env.get("weight"),
            "min_batch_allocation": env.get("min_batch_allocation"),
            "group_size": env.get("group_size"),
            "connected": env.get("connected"),
        }
        for index, env in enumerate(getattr(state, "envs", []))
    ]


def build_app() -> Any:
    from atroposlib.api.server import app

    if not any(getattr(route, "path", None) == ENVS_PATH for route in app.routes):

        @app.get(ENVS_PATH)
        async def envs() -> dict[str, Any]:
            return {"envs": registered_envs(app.state)}

    return app


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # Loopback unless asked: atroposlib's own CLI binds every interface by default.
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)
    uvicorn.run(build_app(), host=args.host, port=args.port)


if __name__ == "__main__":
    main()
