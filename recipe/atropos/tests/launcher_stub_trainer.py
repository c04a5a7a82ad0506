"""Stand-in trainer for the launcher tests: checks it can reach the environment service, then exits.

The launcher appends ``--config-path DIR --config-name NAME`` and Hydra overrides, among them
``trainer.atropos.api_url=...``. This stub reads that URL, calls ``GET /health`` once, and writes
what it saw to the JSON file named by ``$STUB_TRAINER_REPORT`` (its pid, argv, the health answer,
the pids of any children it started). Behaviour is set through environment variables, because
the launcher owns the command line:

- ``STUB_TRAINER_WAIT_FOR``: a path; wait until it exists before exiting (a run that lasts).
- ``STUB_TRAINER_MAX_WAIT_S``: give up waiting after this many seconds (default 60), exit 4.
- ``STUB_TRAINER_EXIT_CODE``: exit code when done (default 0).
- ``STUB_TRAINER_SPAWN_CHILDREN=1``: start two sleeping children, one in a session of its own,
  so that tests can check the launcher stops a whole process tree.
- ``STUB_TRAINER_COMPLETE=<prompt>``: also ask the inference endpoint the service has registered
  for a completion of that prompt (an environment calling the policy), and report the answer.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import requests

API_URL_KEY = "trainer.atropos.api_url="


def main(argv: list[str]) -> int:
    api_url = next((a[len(API_URL_KEY) :] for a in argv if a.startswith(API_URL_KEY)), None)
    report: dict = {"pid": os.getpid(), "argv": argv, "api_url": api_url, "children": []}
    if api_url is None:
        report["error"] = "no trainer.atropos.api_url override"
    else:
        try:
            answer = requests.get(f"{api_url}/health", timeout=5)
            report["health_status"] = answer.status_code
            report["health"] = answer.json()
        except (requests.RequestException, ValueError) as exc:
            report["error"] = f"{type(exc).__name__}: {exc}"
    prompt = os.environ.get("STUB_TRAINER_COMPLETE")
    if prompt and "health" in report:
        endpoint = report["health"].get("inference_endpoint") or {}
        try:
            answer = requests.post(
                f"{endpoint['base_url']}/completions",
                json={"model": endpoint["model"], "prompt": prompt, "max_tokens": 8, "temperature": 0.0},
                timeout=30,
            )
            report["completion_status"] = answer.status_code
            report["completion"] = answer.json()
        except (KeyError, requests.RequestException, ValueError) as exc:
            report["completion_error"] = f"{type(exc).__name__}: {exc}"
    if os.environ.get("STUB_TRAINER_SPAWN_CHILDREN") == "1":
        sleeper = [sys.executable, "-c", "import time; time.sleep(300)"]
        report["children"] = [
            subprocess.Popen(sleeper).pid,
            subprocess.Popen(sleeper, start_new_session=True).pid,  # escapes the process group
        ]
    _write(report)
    print(f"stub trainer: api_url={api_url} health={report.get('health_status')}", flush=True)

    wait_for = os.environ.get("STUB_TRAINER_WAIT_FOR")
    if wait_for and not wait_for_file(wait_for, float(os.environ.get("STUB_TRAINER_MAX_WAIT_S", "60"))):
        print("stub trainer: gave up waiting", flush=True)
        return 4
    code = int(os.environ.get("STUB_TRAINER_EXIT_CODE", "0"))
    print(f"stub trainer: done, exit {code}", flush=True)
    return code


def wait_for_file(path: str, max_wait_s: float) -> bool:
    """True once `path` exists (a test's signal to finish), False after `max_wait_s`."""
    deadline = time.monotonic() + max_wait_s
    while not Path(path).exists():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def write_report(report: dict, path: str | None) -> None:
    """Write `report` as JSON to `path` (if any) atomically, so a polling test never reads half of it."""
    if path:
        tmp = Path(path + ".tmp")
        tmp.write_text(json.dumps(report))
        os.replace(tmp, path)


def _write(report: dict) -> None:
    write_report(report, os.environ.get("STUB_TRAINER_REPORT"))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
