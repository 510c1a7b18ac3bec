"""A provider without a profile that refuses ``stream_options`` (which the gateway adds for usage)."""

from __future__ import annotations

import openai

from tests.fake_upstream import FakeUpstream
from tests.hostile import AGENT_KEY, PROVIDER_KEY
from tests.support import gateway


def test_a_refused_stream_options_is_left_out_from_then_on(upstream: FakeUpstream) -> None:
    upstream.refuse_params = {"stream_options"}
    upstream.error_shape = "top"
    cfg = f"""
keys: [{{key: {AGENT_KEY}, agent: streamer}}]
providers:
  plain: {{kind: openai, base_url: "{upstream.base_url}", api_key: {PROVIDER_KEY}}}
models:
  m: [plain/fake-model]
cache: {{enabled: false}}
"""
    with gateway(cfg) as gw:
        sdk = openai.OpenAI(base_url=gw.base_url, api_key=AGENT_KEY, max_retries=0)
        chunks = list(sdk.chat.completions.create(model="m", messages=[{"role": "user", "content": "one two"}], stream=True, stream_options={"include_usage": True}))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "echo: one two"
        usage = chunks[-1].usage
        assert usage is not None and usage.model_extra == {"estimated": True}
        assert ["stream_options" in r.body for r in upstream.chat_requests] == [True, False]
        # remembered: the next stream goes without it at once
        list(sdk.chat.completions.create(model="m", messages=[{"role": "user", "content": "three"}], stream=True))
        assert ["stream_options" in r.body for r in upstream.chat_requests] == [True, False, False]
