"""Embedding vectors in OpenAI's two wire forms: a list of floats, or base64 of little-endian float32.

The gateway keeps a vector as base64 (the compact form, exact for the float32 values every
provider computes in) and writes floats only for a client that asked for them: as numpy float32
arrays, which orjson writes in float32's shortest form (``0.1``, as OpenAI does, not the double
``0.10000000149011612``), half the JSON and a third of the time of Python floats.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

import numpy as np
import numpy.typing as npt

#: the two values of ``encoding_format``
FLOAT = "float"
BASE64 = "base64"
#: OpenAI's base64 vectors: little-endian float32
_F32 = np.dtype("<f4")


def floats_to_base64(values: list[float] | npt.NDArray[Any]) -> str:
    """Base64 of the values as little-endian float32 (OpenAI's ``encoding_format: base64``)."""
    return base64.b64encode(np.asarray(values, dtype=_F32).tobytes()).decode("ascii")


def base64_to_array(text: str) -> npt.NDArray[np.float32]:
    """The float32 values a base64 vector holds."""
    return np.frombuffer(base64.b64decode(text), dtype=_F32)


def base64_to_floats(text: str) -> list[float]:
    """The float32 values a base64 vector holds, as Python floats."""
    return base64_to_array(text).tolist()  # type: ignore[no-any-return]


def as_base64(vector: Any) -> str | None:
    """A provider's vector (floats or base64) as base64; None when it is neither."""
    if isinstance(vector, str):
        try:
            raw = base64.b64decode(vector, validate=True)
        except (binascii.Error, ValueError):
            return None
        return vector if raw and len(raw) % 4 == 0 else None
    if not isinstance(vector, list) or not vector:
        return None
    try:
        values = np.asarray(vector)
    except (ValueError, TypeError):
        return None
    # numbers only (a bool or a string is no vector component), finite, one dimension
    if values.ndim != 1 or values.dtype.kind not in "fiu" or not np.isfinite(values).all():
        return None
    return floats_to_base64(values)


def in_format(vector: Any, encoding_format: str) -> Any:
    """The vector in the form the client asked for (unchanged when it already is in it); floats
    from base64 come as a float32 array, for ``orjson.dumps(..., option=orjson.OPT_SERIALIZE_NUMPY)``."""
    if encoding_format == BASE64:
        return vector if isinstance(vector, str) else floats_to_base64(vector)
    return base64_to_array(vector) if isinstance(vector, str) else vector
