"""Gateway keys: the Bearer token names the calling agent."""

from __future__ import annotations

import hashlib

from app.config import KeyConfig
from app.errors import AuthenticationError
from app.memo import Recent


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def bearer_token(authorization: str | None, what: str) -> str:
    """The token of ``Authorization: Bearer <token>``; 401 naming ``what`` when missing or malformed."""
    if not authorization:
        raise AuthenticationError(f"Missing {what}: send 'Authorization: Bearer <{what}>'.", code="missing_api_key")
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise AuthenticationError(f"Malformed Authorization header: expected 'Bearer <{what}>'.")
    return token


class Authenticator:
    """Maps a Bearer token to its key entry; with no keys configured every caller is anonymous."""

    def __init__(self, keys: list[KeyConfig]) -> None:
        self._by_digest = {key_digest(k.key.get_secret_value()): k for k in keys}
        # accepted header value -> key, so a known caller costs a dict lookup rather than a SHA-256
        # each time (only valid keys get in, so few are ever remembered)
        self._known: Recent[str | None, KeyConfig] = Recent()

    @property
    def required(self) -> bool:
        return bool(self._by_digest)

    def identify(self, authorization: str | None) -> KeyConfig | None:
        if not self._by_digest:
            return None
        key = self._known.get(authorization)
        if key is not None:
            return key
        key = self._by_digest.get(key_digest(bearer_token(authorization, "gateway key")))
        if key is None:
            raise AuthenticationError("Incorrect API key provided.")
        self._known.put(authorization, key)
        return key
