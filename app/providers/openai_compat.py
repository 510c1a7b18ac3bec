"""Any OpenAI-compatible HTTP API, through one shared aiohttp session per provider."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import aiohttp
import orjson
from opentelemetry import trace

from app.config import ProviderConfig
from app.errors import (
    ProviderErrorFields,
    UpstreamAuthError,
    UpstreamBadResponseError,
    UpstreamClientError,
    UpstreamError,
    UpstreamRateLimitError,
    UpstreamTimeoutError,
    provider_error_fields,
)
from app.providers.base import UpstreamRequest
from app.shapes import Events, finishes

log = logging.getLogger(__name__)

_MAX_ERROR_BODY = 4096
#: each endpoint's path under the provider's base URL, and the list its answer must hold
_PATHS = {"chat": "/chat/completions", "completions": "/completions", "embeddings": "/embeddings"}
_ANSWER_LIST = {"chat": "choices", "completions": "choices", "embeddings": "data"}
_ANSWER_NAME = {"chat": "a chat completion", "completions": "a text completion", "embeddings": "an embeddings list"}
#: the data of the event that ends a stream
_DONE_DATA = b"[DONE]"
_DONE_EVENT = b"data: [DONE]\n\n"


def parse_retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


class OpenAICompatibleProvider:
    """A provider reached over HTTP with the OpenAI chat completions protocol."""

    def __init__(self, name: str, config: ProviderConfig) -> None:
        self.name = name
        self._config = config
        base = (config.base_url or "").rstrip("/")
        self._urls = {endpoint: base + path for endpoint, path in _PATHS.items()}
        self._secret = config.api_key.get_secret_value() if config.api_key else ""
        # a provider that refuses stream_options (its profile drops it) is not asked for usage:
        # dispatch estimates it instead
        self._stream_usage = "stream_options" not in config.drop_params
        # a provider may take its key in a header of its own (x-api-key): a provider that echoes
        # credentials back in an error must not get them into our errors and logs
        self._secrets = [v for v in (self._secret, *config.headers.values()) if len(v) >= 8]
        self._session: aiohttp.ClientSession | None = None
        #: set when tracing is on: the current (attempt) span's traceparent headers for each call
        self.trace_headers: Callable[[], dict[str, str]] | None = None
        #: given each answer's headers (its x-ratelimit-* announcements feed the provider budget)
        self.on_headers: Callable[[str, Mapping[str, str]], None] | None = None
        read_s = config.first_byte_timeout_s or config.timeout_s
        self._timeout = aiohttp.ClientTimeout(
            total=config.timeout_s,
            sock_connect=config.connect_timeout_s,
            # a silence as long as the whole call's limit is cut by that limit anyway; without a read
            # timeout aiohttp arms no timer for each read of the answer
            sock_read=read_s if read_s < config.timeout_s else None,
        )
        # a stream may run longer than one plain call; the read timeout bounds each silence
        self._stream_timeout = aiohttp.ClientTimeout(total=None, sock_connect=config.connect_timeout_s, sock_read=read_s)

    async def start(self) -> None:
        headers = {"Content-Type": "application/json", **self._config.headers}
        if self._secret:
            headers["Authorization"] = f"Bearer {self._secret}"
        connector = aiohttp.TCPConnector(limit=self._config.max_concurrency, keepalive_timeout=30, ttl_dns_cache=300)
        # no cookie jar: a cookie one agent's call got back must not ride along on another agent's call
        self._session = aiohttp.ClientSession(headers=headers, connector=connector, cookie_jar=aiohttp.DummyCookieJar(), raise_for_status=False, auto_decompress=True)

    def ready(self) -> bool:
        return self._session is not None

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _clean(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def _session_or_fail(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise UpstreamError(f"provider {self.name} is not started", backend=self.name)
        return self._session

    def _answered(self, resp: aiohttp.ClientResponse) -> None:
        """An answer's head, error or not: its announced limits to the provider budget and, when
        tracing (``trace_headers`` set), its status to the attempt's span, current during the call."""
        if self.on_headers is not None:
            self.on_headers(self.name, resp.headers)
        if self.trace_headers is not None:
            trace.get_current_span().set_attribute("http.response.status_code", resp.status)

    async def _error_for(self, resp: aiohttp.ClientResponse) -> UpstreamError:
        raw = await resp.content.read(_MAX_ERROR_BODY)
        try:
            said = provider_error_fields(orjson.loads(raw))
        except orjson.JSONDecodeError:
            said = ProviderErrorFields(raw.decode("utf-8", "replace"))
        detail = said.message
        # cleaned whole, then cut: a cut through a key would leave a piece the cleaning misses
        detail = self._clean(detail)[:500]
        message = f"{self.name} answered {resp.status}" + (f": {detail}" if detail else "")
        status = resp.status
        if status == 429:
            return UpstreamRateLimitError(message, backend=self.name, retry_after=parse_retry_after(resp.headers.get("Retry-After")))
        if status in (401, 403):
            return UpstreamAuthError(f"{self.name} rejected the gateway's provider key ({status})", backend=self.name)
        if status in (400, 404, 413, 422):
            fields = said._asdict()
            return UpstreamClientError(
                message, status=status, backend=self.name, error_type=self._field(fields, "type"), code=self._field(fields, "code"), param=self._field(fields, "param")
            )
        if status in (408, 504):
            return UpstreamTimeoutError(message, backend=self.name)
        return UpstreamError(message, backend=self.name)

    def _event_object(self, data: bytes) -> dict[str, Any]:
        """The JSON object a streamed ``data:`` line carries (a bad event raised)."""
        try:
            parsed = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise UpstreamBadResponseError(f"{self.name} sent a stream event that is not JSON", backend=self.name) from exc
        if not isinstance(parsed, dict):
            raise UpstreamBadResponseError(f"{self.name} sent a stream event that is not an object", backend=self.name)
        return parsed

    def _chunk(self, data: bytes) -> dict[str, Any]:
        """The chunk a ``data:`` line carries; the provider's error (or a bad event) raised."""
        parsed = self._event_object(data)
        if "error" in parsed:
            err = parsed["error"]
            detail = str(err.get("message") or "") if isinstance(err, dict) else str(err)
            raise UpstreamError(f"{self.name} failed mid-stream: {self._clean(detail)}", backend=self.name)
        return parsed

    def _field(self, error: dict[str, Any], name: str) -> str | None:
        """One of the provider's error fields, as short clean text (a code may come as a number)."""
        value = error.get(name)
        if value is None or isinstance(value, (dict, list, bool)):
            return None
        return self._clean(str(value))[:200] or None

    def _translate(self, exc: BaseException) -> UpstreamError:
        if isinstance(exc, (asyncio.TimeoutError, aiohttp.ServerTimeoutError)):
            return UpstreamTimeoutError(f"{self.name} timed out", backend=self.name)
        if isinstance(exc, aiohttp.ClientConnectorError):
            return UpstreamError(f"{self.name} is unreachable: {exc.os_error.strerror or exc.os_error}", backend=self.name)
        return UpstreamError(f"{self.name} connection failed: {type(exc).__name__}", backend=self.name)

    async def complete(self, request: UpstreamRequest) -> dict[str, Any]:
        session = self._session_or_fail()
        endpoint = request.endpoint
        payload = {**request.payload, "model": request.model}
        if endpoint != "embeddings":
            payload["stream"] = False
            payload.pop("stream_options", None)
        try:
            headers = self.trace_headers() if self.trace_headers is not None else None
            async with session.post(self._urls[endpoint], data=orjson.dumps(payload), timeout=self._timeout, headers=headers) as resp:
                self._answered(resp)
                if resp.status >= 400:
                    raise await self._error_for(resp)
                raw = await resp.read()
        except UpstreamError:
            raise
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise self._translate(exc) from exc
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise UpstreamBadResponseError(f"{self.name} answered a body that is not JSON", backend=self.name) from exc
        items = body.get(_ANSWER_LIST[endpoint]) if isinstance(body, dict) else None
        if not isinstance(items, list) or not items:
            raise UpstreamBadResponseError(f"{self.name} answered JSON that is not {_ANSWER_NAME[endpoint]}", backend=self.name)
        return body  # type: ignore[no-any-return]

    def stream(self, request: UpstreamRequest) -> AsyncIterator[dict[str, Any]]:
        payload = {**request.payload, "model": request.model, "stream": True}
        if self._stream_usage:
            payload["stream_options"] = {"include_usage": True}
        return EventStream(self, self._urls[request.endpoint], payload)

    async def _open(self, url: str, payload: dict[str, Any]) -> aiohttp.ClientResponse:
        """The streamed answer's response, its head read (an error answer raised as the gateway's error).

        A provider no profile says refuses ``stream_options`` may still: its 400/422 naming it is
        answered by asking once more without it, and streams to it go without from then on (dispatch
        estimates the usage they lack)."""
        session = self._session_or_fail()
        while True:
            headers = self.trace_headers() if self.trace_headers is not None else None
            resp = await session.post(url, data=orjson.dumps(payload), timeout=self._stream_timeout, headers=headers)
            self._answered(resp)
            if resp.status < 400:
                return resp
            try:
                error = await self._error_for(resp)
            finally:
                await resp.__aexit__(None, None, None)
            if "stream_options" not in payload or not _refuses_stream_options(error):
                raise error
            log.warning("provider %s refused stream_options (%s); streams to it go without (give it drop_params: [stream_options])", self.name, error.message)
            self._stream_usage = False
            payload = {k: v for k, v in payload.items() if k != "stream_options"}


def _refuses_stream_options(error: UpstreamError) -> bool:
    return isinstance(error, UpstreamClientError) and error.status in (400, 422) and (error.param == "stream_options" or "stream_options" in error.message)


class EventStream:
    """A provider's streamed answer as chunks, parsed a network read at a time.

    :meth:`batch` hands over every chunk a read brought at once, as :class:`~app.shapes.Events`
    that keep the events' bytes: a burst from the provider passes the layers above as one batch,
    and a client that gets it unchanged is written the provider's bytes. ``__anext__`` hands them
    over one by one (the provider protocol). The request is made at the first read; the response
    is released at the end or on :meth:`aclose`.
    """

    __slots__ = ("_at", "_closed", "_error", "_finished", "_over", "_parsed", "_payload", "_provider", "_resp", "_rest", "_url")

    def __init__(self, provider: OpenAICompatibleProvider, url: str, payload: dict[str, Any]) -> None:
        self._provider = provider
        self._url = url
        self._payload = payload
        self._resp: aiohttp.ClientResponse | None = None
        #: the last read's chunks, and how many of them were handed over
        self._parsed: list[dict[str, Any]] | Events = []
        self._at = 0
        #: the start of a line the last read cut
        self._rest = b""
        #: a choice said why it ended ([DONE] counts too): an end without it is a cut stream
        self._finished = False
        #: [DONE] or the end of the body was read
        self._over = False
        self._closed = False
        #: a failure read after some chunks: raised once those are handed over
        self._error: UpstreamError | None = None

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> dict[str, Any]:
        while self._at >= len(self._parsed):
            await self._next_read()
        chunk = self._parsed[self._at]
        self._at += 1
        return chunk

    async def batch(self) -> list[dict[str, Any]] | Events:
        """The chunks not handed over yet: the rest of the last read, else all the next read brings
        (as :class:`~app.shapes.Events`, unless it may hold an error); [] at the end."""
        while self._at >= len(self._parsed):
            try:
                await self._next_read()
            except StopAsyncIteration:
                return []
        at, self._at = self._at, len(self._parsed)
        return self._parsed[at:] if at else self._parsed

    async def _next_read(self) -> None:
        """Read once more; at the end, the stream's error, or StopAsyncIteration."""
        if self._error is not None or self._over or self._closed:
            await self.aclose()
            if self._error is not None:
                raise self._error
            if not self._finished:
                raise UpstreamError(f"{self._provider.name} ended the stream before it finished", backend=self._provider.name)
            raise StopAsyncIteration
        try:
            await self._read()
        except BaseException:
            await self.aclose()
            raise

    async def _read(self) -> None:
        provider = self._provider
        try:
            if self._resp is None:
                self._resp = await provider._open(self._url, self._payload)
            data = await self._resp.content.readany()
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise provider._translate(exc) from exc
        datas = _whole_events(data) if not self._rest else None
        # an error event has an "error" key (in a string a quote is escaped)
        suspect = datas is not None and b'"error"' in data
        #: the events as they came, when the read was nothing but them
        raw: bytes | None = data if datas is not None else None
        if datas is None:
            if data:
                *lines, self._rest = (self._rest + data if self._rest else data).split(b"\n")
            else:
                lines, self._rest, self._over = [self._rest], b"", True
            datas = [line[5:].strip() for line in lines if line.startswith(b"data:")]
            suspect = any(b'"error"' in each for each in datas)
        if datas and datas[-1] == _DONE_DATA:
            datas.pop()
            self._over = self._finished = True
            raw = raw[: -len(_DONE_EVENT)] if raw is not None else None
        elif _DONE_DATA in datas:
            del datas[datas.index(_DONE_DATA) :]
            self._over = self._finished = True
            raw = None
        parsed: list[dict[str, Any]] | Events
        if suspect:
            # maybe the provider's error: event by event, those before it go out, then the error
            parsed = []
            try:
                for each in datas:
                    parsed.append(provider._chunk(each))
            except UpstreamError as exc:
                self._error = exc
            if not self._finished:
                self._finished = any(map(finishes, reversed(parsed)))
        else:
            parsed = Events(datas, provider.name, raw)
            if not self._finished:
                self._finished = parsed.finishes()
        self._parsed = parsed
        self._at = 0

    async def aclose(self) -> None:
        self._closed = True
        resp, self._resp = self._resp, None
        if resp is not None:
            await resp.__aexit__(None, None, None)


def _whole_events(data: bytes) -> list[bytes] | None:
    """The events' data when a read is nothing but whole ``data: ...`` events, each one line and a
    blank one (what providers send): one split, no work per line; None for anything else (a cut
    event, comments, other fields, an event of several lines, CRLF), which the line by line path
    reads. Space or a CR around an event's JSON is left in its data: JSON reads it as space."""
    if not data.startswith(b"data: ") or not data.endswith(b"\n\n"):
        return None
    datas = data[6:-2].split(b"\n\ndata: ")
    return datas if data.count(b"\n") == 2 * len(datas) else None


async def _lines(body: aiohttp.StreamReader) -> AsyncIterator[list[bytes]]:
    """The body's lines, a list for whatever each read brought: no await per line (reading line by
    line, ``StreamReader.readline`` held 15 % of the gateway's samples under the stream benchmark)."""
    rest = b""
    async for data in body.iter_any():
        *lines, rest = (rest + data if rest else data).split(b"\n")
        yield lines
    yield [rest]
