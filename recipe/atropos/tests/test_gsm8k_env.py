"""GSM8K environment and request parsing as plain functions (no server; see test_env_service.py)."""

from __future__ import annotations

import numpy as np
import pytest

from recipe.atropos.environments.base import ContractError, EvaluationRequest
from recipe.atropos.environments.gsm8k import GSM8KConfig, GSM8KEnvironment
from recipe.atropos.environments.gsm8k_answers import AnswerMatcher, extract_answer, plain_number, reference_answer
from recipe.atropos.environments.gsm8k_steps import decode_with_char_ends, split_steps, step_end_tokens, step_reward
from recipe.atropos.environments.service import ServiceSettings, create_app, parse_command_line
from recipe.atropos.protocol import parse_evaluation_request

pytestmark = pytest.mark.timeout(60)


def save_tiny_tokenizer(directory):
    """A byte-level BPE trained offline on GSM8K-style text, saved as a tokenizer folder."""
    from recipe.atropos.demo.tiny_assets import build_tokenizer, make_problems

    tokenizer = build_tokenizer(make_problems(64, seed=0))
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(save_tiny_tokenizer(tmp_path_factory.mktemp("tokenizer")))


@pytest.mark.parametrize(
    ("response", "answer"),
    [
        ("so the total is \\boxed{18}.", "18"),
        ("\\boxed{1} then \\boxed{\\frac{3}{4}}", "\\frac{3}{4}"),  # the last box wins
        ("#### 72", "72"),
        ("Step 1 ... #### 5\nwait, #### $1,000.", "$1,000"),  # the last ####
        ("#### -3", "-3"),
        ("\\boxed{7} and later #### 8", "7"),  # a box beats ####
        ("\\boxed{12", None),  # truncated box, nothing else
        ("no final answer here: 42", None),
        ("", None),
    ],
)
def test_extract_answer(response, answer):
    assert extract_answer(response) == answer


def test_reference_answer_reads_gsm8k_solutions_and_plain_answers():
    assert reference_answer("She sold 48/2 = <<48/2=24>>24 clips.\n#### 72") == "72"
    assert reference_answer(" 1,000 ") == "1,000"


@pytest.mark.parametrize(
    ("text", "value"),
    [("1,000", "1000"), ("$1000", "1000"), ("\\$1{,}000", "1000"), ("1000.0", "1000"), ("1000.", "1000"),
     ("-5", "-5"), ("- 5", "-5"), ("0.25", "0.25"), ("18 dollars", "18"), ("18\\text{ dollars}", "18")],
)
def test_plain_numbers(text, value):
    assert plain_number(text) == plain_number(value) and plain_number(value) is not None


@pytest.mark.parametrize("text", ["3/4", "\\frac{1}{2}", "50%", "5 million", "1,00", "3,14", "x", "10^3"])
def test_not_plain_numbers_go_to_math_verify(text):
    assert plain_number(text) is None


@pytest.mark.parametrize(
    ("answer", "reference", "correct"),
    [
        ("1,000", "1000", True),
        ("$1000", "1000", True),
        ("1000.0", "1,000", True),
        ("1000", "#### 1000", True),
        ("-7", "-7", True),
        ("7", "-7", False),
        ("0.5", "\\frac{1}{2}", True),
        ("\\frac{2000}{2}", "1000", True),
        ("999", "1000", False),
        ("x" * 300, "1000", False),  # over max_answer_chars
    ],
)
def test_answer_matcher(answer, reference, correct):
    assert AnswerMatcher().matches(answer, reference_answer(reference)) is correct


def test_answer_matcher_refuses_untimed_risky_answers_off_the_main_thread():
    """Off the main thread math-verify has no timeout: an exponent tower must not hang the service."""
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        assert pool.submit(AnswerMatcher().matches, "10^{10^{10^{10}}}", "1000").result(timeout=20) is False


@pytest.mark.parametrize(
    ("line", "reward"),
    [
        ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.", 1),
        ("<<5*3=16>>16", -1),
        ("3 + 4 = 8", -1),
        ("So, $1,200 x 3 = $3,600 in all.", 1),
        ("2 + 3 + 1 = 5 + 1 = 6", 1),  # a chain of equal expressions
        ("5 + 3 = 8 * 2 = 16", 1),  # a running total
        ("It is 7 - 2 = 5. Then 5 * 2 = 11.", -1),  # one wrong equation makes the line wrong
        ("100/3 = 33.33", 1),  # rounded to the digits shown
        ("100/3 = 33", -1),
        ("5/0 = 0", -1),
        ("3 - 5 = -2", 1),
        ("Total = 12", 0),  # no operation
        ("She has 5 apples.", 0),
        ("a <= b", 0),
    ],
)
def test_step_reward(line, reward):
    assert step_reward(line) == reward


def test_split_steps_skips_blank_lines_and_points_at_last_visible_char():
    assert split_steps("a = 1\n\n  \nb + 1\nlast  ") == [("a = 1", 4), ("b + 1", 14), ("last  ", 19)]


def test_step_end_tokens_place_each_step_on_the_token_holding_its_last_char():
    char_ends_T = np.array([3, 6, 7, 10, 12])  # token t covers chars [ends[t-1], ends[t])
    np.testing.assert_array_equal(step_end_tokens([2, 6, 9], char_ends_T), [0, 2, 4])  # last step: last token
    assert step_end_tokens([], char_ends_T).size == 0


def test_decode_with_char_ends_matches_cumulative_decode(tiny_tokenizer):
    text = "Tom has 3+4 = <<3+4=7>>7 apples.\nThen ×2 é = 14\n#### 14"
    ids = tiny_tokenizer(text)["input_ids"] + [tiny_tokenizer.eos_token_id]
    decoded, ends_T = decode_with_char_ends(tiny_tokenizer.backend_tokenizer, ids)
    assert decoded == text
    for t in range(len(ids)):  # independent: decode every prefix
        prefix = tiny_tokenizer.decode(ids[: t + 1], skip_special_tokens=True)
        if "\ufffd" not in prefix:  # a prefix may end inside a multi-byte char
            assert ends_T[t] == len(prefix)


def _request(responses, ground_truths, group_ids=None, **extra):
    body = {"prompts": ["p"] * len(responses), "responses": responses, "ground_truths": ground_truths, **extra}
    if group_ids is not None:
        body["group_ids"] = group_ids
    return parse_evaluation_request(body)


def test_outcome_environment_scores_and_normalizes_within_groups():
    env = GSM8KEnvironment()
    request = _request(["\\boxed{3}", "#### 4", "\\boxed{3}", "none", "#### 9"], ["3"] * 4 + ["9"], [0, 0, 0, 0, 1])
    result = env.evaluate(request)
    np.testing.assert_array_equal(result.scores, [1, 0, 1, 0, 1])
    group = np.array([1.0, 0, 1, 0])
    np.testing.assert_allclose(result.advantages[:4], (group - group.mean()) / (group.std(ddof=1) + 1e-6))
    assert result.advantages[4] == pytest.approx(1.0 / (1.0 + 1e-6))  # a singleton keeps its raw score (verl: mean 0, std 1)
    assert result.metrics["accuracy"] == pytest.approx(0.6)
    assert result.metrics["answer_found_rate"] == pytest.approx(0.8)
    assert result.metrics["num_groups"] == 2
    assert result.metrics["identical_score_group_rate"] == 0.0


def test_missing_ground_truth_is_a_contract_error():
    with pytest.raises(ContractError, match=r"ground_truths\[1\]"):
        GSM8KEnvironment().evaluate(_request(["1", "2"], ["1", None]))


def test_process_mode_requires_a_tokenizer():
    with pytest.raises(ValueError, match="tokenizer_name"):
        GSM8KConfig(supervision="process")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ([1, 2], "body"),
        ({"responses": ["a"]}, "prompts"),
        ({"prompts": [], "responses": []}, "prompts"),
        ({"prompts": ["a"], "responses": ["a", "b"]}, "responses"),
        ({"prompts": ["a"], "responses": [3]}, "responses"),
        ({"prompts": ["a"], "responses": ["a"], "group_ids": [True]}, "group_ids"),
        ({"prompts": ["a"], "responses": ["a"], "response_lengths": [-1]}, "response_lengths"),
        ({"prompts": ["a"], "responses": ["a"], "response_token_ids": [[1, 2.5]]}, "response_token_ids"),
        ({"prompts": ["a"], "responses": ["a"], "response_token_ids": [[1, [2]]]}, "response_token_ids"),
        ({"prompts": ["a"], "responses": ["a"], "response_token_ids": [[2**70]]}, "response_token_ids"),
        ({"prompts": ["a"], "responses": ["a"], "response_token_ids": [[1]], "response_lengths": [2]}, "response_lengths"),
        ({"prompts": ["a"], "responses": ["a"], "response_lengths": [2**31 - 1]}, "response_lengths"),  # over the token cap
    ],
)
def test_parse_evaluation_request_names_the_field(body, field):
    with pytest.raises(ContractError) as caught:
        parse_evaluation_request(body, max_total_tokens=1000)
    assert caught.value.field == field


def test_parse_evaluation_request_accepts_msgpack_arrays_and_defaults_groups_to_prompts():
    request = parse_evaluation_request(
        {"prompts": ["a", "b", "a"], "responses": ["x"] * 3, "response_token_ids": [np.arange(3, dtype=np.int32)] * 3}
    )
    assert request.group_index_B().tolist() == [0, 1, 0]
    assert request.response_lengths_B.tolist() == [3, 3, 3]
    assert request.ground_truths == [None] * 3


def test_fastapi_validation_errors_follow_the_error_shape():
    """Routes that let FastAPI validate parameters answer 422 in the protocol's shape too."""
    from fastapi.testclient import TestClient

    app = create_app(GSM8KEnvironment(), ServiceSettings())

    @app.get("/echo")
    async def echo(count: int) -> dict:
        return {"count": count}

    with TestClient(app) as client:
        answer = client.get("/echo", params={"count": "many"})
    assert answer.status_code == 422
    assert answer.json()["error"]["code"] == "invalid_request" and "count" in answer.json()["error"]["message"]


def test_command_line_options_reach_settings_and_environment(monkeypatch):
    monkeypatch.setenv("ATROPOS_ENV_API_KEY", "from-env")
    settings, config = parse_command_line(
        GSM8KEnvironment, ["serve", "--slurm", "false", "--port", "9100", "--env.norm_adv_by_std", "false", "--env.epsilon", "0.01"]
    )
    assert (settings.host, settings.port, settings.api_key, settings.slurm) == ("127.0.0.1", 9100, "from-env", False)
    assert config.norm_adv_by_std is False and config.epsilon == 0.01 and config.supervision == "outcome"
    with pytest.raises(SystemExit):
        parse_command_line(GSM8KEnvironment, ["serve", "--env.supervision", "process"])  # no tokenizer


def test_evaluation_request_group_ids_compare_as_strings():
    request = EvaluationRequest(prompts=["a"] * 3, responses=["x"] * 3, group_ids=[1, "1", 2], ground_truths=[None] * 3)
    assert request.group_index_B().tolist() == [0, 0, 1]
