"""The README's "Adding New Environments" example works as printed."""

from __future__ import annotations

import re
import types

import pytest
from fastapi.testclient import TestClient

from .conftest import REPO_ROOT


def _python_blocks(section: str) -> list[str]:
    text = (REPO_ROOT / "README.md").read_text()
    body = text.split(f"## {section}", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", body, flags=re.S)


@pytest.mark.timeout(60)
def test_adding_an_environment_example_serves_requests():
    from recipe.atropos.environments.service import ServiceSettings, create_app

    environment_source = _python_blocks("Adding New Environments")[0]
    module = types.ModuleType("readme_exact_match")
    exec(compile(environment_source, "README.md", "exec"), module.__dict__)
    app = create_app(module.ExactMatchEnvironment(), ServiceSettings())
    with TestClient(app) as client:
        assert client.get("/health").json()["env"] == "exact_match"
        answer = client.post(
            "/evaluate_and_compute_advantages",
            json={"prompts": ["q", "q"], "responses": [" 42 ", "41"], "ground_truths": ["42", "42"]},
        )
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["scores"] == [1.0, 0.0]
        assert body["advantages"][0] > 0 > body["advantages"][1]
        refused = client.post("/evaluate_and_compute_advantages", json={"prompts": ["q"], "responses": ["a"]})
        assert refused.status_code == 422 and refused.json()["error"]["code"] == "invalid_request"
        assert "ground truth" in refused.json()["error"]["message"]
