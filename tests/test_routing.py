"""Task-aware routing for ``model: "auto"``: each condition, rule order, the default, the header."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from app.errors import NotFoundError
from app.pipeline.base import Deployment, ModelRequest
from app.pipeline.router import ModelRouter
from tests.resilience_support import AGENT_KEY, OTHER_KEY, post
from tests.support import gateway, make_settings

# the README's example: code, reasoning, long content, default fast
SEED = """
keys:
  - {key: sk-agent-tester-0001, agent: tester}
  - {key: sk-agent-other-0002, agent: other}
providers:
  demo: {kind: demo}
models:
  fast: [demo/fast-model]
  code: [demo/coder]
  reasoning: [demo/thinker]
  long: [demo/long-context]
  tools: [demo/tool-user]
  short: [demo/tiny]
  vip: [demo/vip]
routing:
  default: fast
  rules:
    - {if: {agents: [other], contains_any: [urgent]}, model: vip}
    - {if: {has_tools: true}, model: tools}
    - {if: {contains_any: [code, function, "def "]}, model: code}
    - {if: {regex: "(?i)\\\\b(prove|step by step|why)\\\\b"}, model: reasoning}
    - {if: {min_chars: 2000}, model: long}
    - {if: {max_chars: 5}, model: short}
"""


@pytest.fixture(scope="module")
def router() -> ModelRouter:
    return ModelRouter(make_settings(SEED))


def ask(router: ModelRouter, content: Any, agent: str = "tester", **body: Any) -> str:
    request = ModelRequest({"model": "auto", "messages": [{"role": "user", "content": content}], **body})
    return router.resolve(request, agent)[0]


def test_default_when_no_rule_matches(router: ModelRouter) -> None:
    assert ask(router, "tell me a joke about ships") == "fast"


def test_contains_any_is_case_insensitive(router: ModelRouter) -> None:
    assert ask(router, "Please review this CODE") == "code"
    assert ask(router, "a Function that sorts") == "code"
    assert ask(router, "def main():") == "code"
    assert ask(router, "undefined behaviour of the sea") == "fast"  # "def" without the space


def test_contains_any_reads_user_messages_only(router: ModelRouter) -> None:
    request = ModelRequest({"model": "auto", "messages": [{"role": "system", "content": "you write code"}, {"role": "user", "content": "hello there"}]})
    assert router.resolve(request, "tester")[0] == "fast"


def test_regex(router: ModelRouter) -> None:
    assert ask(router, "Prove that the sum is even") == "reasoning"
    assert ask(router, "explain step by step") == "reasoning"
    assert ask(router, "improve the wording") == "fast"  # \b: "prove" inside a word is no match


def test_min_chars(router: ModelRouter) -> None:
    assert ask(router, "x " * 1000) == "long"
    assert ask(router, "x " * 999) == "fast"


def test_max_chars(router: ModelRouter) -> None:
    assert ask(router, "hey") == "short"
    assert ask(router, "hello!") == "fast"


def test_has_tools(router: ModelRouter) -> None:
    tool = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}
    assert ask(router, "what is the weather", tools=[tool]) == "tools"
    assert ask(router, "what is the weather", functions=[tool["function"]]) == "tools"
    assert ask(router, "what is the weather", tools=[]) == "fast"


def test_has_tools_false_matches_only_without_tools() -> None:
    router = ModelRouter(make_settings(SEED.replace("has_tools: true", "has_tools: false")))
    assert ask(router, "what is the weather") == "tools"
    assert ask(router, "what is the weather", tools=[{"type": "function", "function": {"name": "f"}}]) == "fast"


def test_agents_and_conditions_combine(router: ModelRouter) -> None:
    assert ask(router, "urgent: the code is down", agent="other") == "vip"
    assert ask(router, "urgent: the code is down", agent="tester") == "code"  # not one of the agents
    assert ask(router, "nothing special here", agent="other") == "fast"  # agent alone is not enough


def test_first_matching_rule_wins(router: ModelRouter) -> None:
    # matches tools, code and reasoning: tools comes first
    tool = {"type": "function", "function": {"name": "f"}}
    assert ask(router, "why does this code fail", tools=[tool]) == "tools"
    assert ask(router, "why does this code fail") == "code"


def test_content_parts_are_read_and_odd_parts_ignored(router: ModelRouter) -> None:
    parts = [{"type": "text", "text": "review my code"}, {"type": "image_url", "image_url": {"url": "http://x/y.png"}}, {"type": "text", "text": 5}]
    assert ask(router, parts) == "code"


def test_auto_without_default_or_match_is_404() -> None:
    router = ModelRouter(make_settings(SEED.replace("  default: fast\n", "")))
    assert ask(router, "code please") == "code"
    with pytest.raises(NotFoundError):
        ask(router, "tell me a joke about ships")


def test_names_and_deployments_resolve(router: ModelRouter) -> None:
    route, deployments, strategy = router.resolve(ModelRequest({"model": "code", "messages": []}), "tester")
    assert (route, deployments, strategy) == ("code", [Deployment("demo", "coder")], "ordered")
    route, deployments, _ = router.resolve(ModelRequest({"model": "demo/org/some-model", "messages": []}), "tester")
    assert deployments == [Deployment("demo", "org/some-model")]
    with pytest.raises(NotFoundError):
        router.resolve(ModelRequest({"model": "nowhere/model", "messages": []}), "tester")


def test_the_route_header_names_the_chosen_model(tmp_path: Path) -> None:
    config = SEED + f'database: {{url: "sqlite+aiosqlite:///{tmp_path}/admiral.db"}}\ncache: {{enabled: false}}\n'
    with gateway(config) as gw:
        r = post(gw, {"model": "auto", "messages": [{"role": "user", "content": "def add(a, b):"}]}, key=AGENT_KEY)
        assert r.status_code == 200
        assert r.headers["x-admiral-route"] == "code"
        assert r.json()["model"] == "coder"
        r = post(gw, {"model": "auto", "messages": [{"role": "user", "content": "urgent!"}]}, key=OTHER_KEY)
        assert r.headers["x-admiral-route"] == "vip"
        r = post(gw, {"model": "auto", "messages": [{"role": "user", "content": "a quiet question"}]}, key=AGENT_KEY)
        assert r.headers["x-admiral-route"] == "fast"
