"""What the vLLM tests share: how the engine is set up for the tiny model."""

from __future__ import annotations

from typing import Any

MAX_MODEL_LEN = 512

#: the KV cache size is explicit: by default vLLM on CPU reserves a share of the whole machine's
#: memory and refuses to start when other processes hold too much of it
ENGINE: dict[str, Any] = {"dtype": "float32", "max_model_len": MAX_MODEL_LEN, "kv_cache_memory_bytes": 1 << 30}
