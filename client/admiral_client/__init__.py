"""OpenAI SDK clients for agents behind Admiral Optimizer, with direct fallbacks while it is down.

    import admiral_client

    client = admiral_client.OpenAI(
        base_url="http://gateway:8000/v1",
        api_key="sk-agent-key",
        fallbacks=[{"base_url": "https://api.groq.com/openai/v1", "api_key": os.environ["GROQ_API_KEY"],
                    "models": {"fast": "llama-3.1-8b-instant"}}],
    )
    client.chat.completions.create(model="fast", messages=[...])   # the gateway, or Groq while it is down

Only an unreachable gateway sends a call elsewhere (refused or reset connection, no byte within
``first_byte_timeout``); whatever the gateway answers, errors included, is the answer.
"""

from admiral_client._clients import AsyncOpenAI, OpenAI
from admiral_client._routing import FALLBACK_HEADER, Fallback, Outage, load_fallbacks

__all__ = ["FALLBACK_HEADER", "AsyncOpenAI", "Fallback", "OpenAI", "Outage", "load_fallbacks"]
__version__ = "0.1.0"
