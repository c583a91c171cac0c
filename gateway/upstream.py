"""Upstream HTTP client behind one small interface.

The client decides most of a Python relay's cost, so it is chosen by measurement
(bench/RESULTS.md). Everything the relay needs is `Pool.request()` and the `Response`
below; errors are mapped onto three classes so the relay can answer 502/504 or end a
stream with an in-band error.
"""

from __future__ import annotations

import ssl

import aiohttp
from yarl import URL

from .routes import Upstream


class UpstreamError(Exception):
    """Base of everything the upstream side can fail with."""


class UpstreamConnectError(UpstreamError):
    """Could not connect or the upstream answered no response head (502)."""


class UpstreamTimeout(UpstreamError):
    """Connect, idle-read or total deadline passed (504 before the head, in-band after)."""


class UpstreamClosed(UpstreamError):
    """The upstream closed or reset the connection mid-body."""


class Response:
    """A streamed upstream response; `read_chunk()` returns b"" at the end."""

    __slots__ = ("_resp", "status", "headers")

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self._resp = resp
        self.status = resp.status
        self.headers = resp.raw_headers

    async def read_chunk(self) -> bytes:
        content = self._resp.content
        # Fast path: data already buffered needs no wait.
        if content._buffer:  # noqa: SLF001 - aiohttp's StreamReader keeps no public peek
            return content.read_nowait(-1)
        try:
            return await content.readany()
        except (TimeoutError, aiohttp.ServerTimeoutError):
            raise UpstreamTimeout("upstream sent nothing within the read timeout") from None
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as e:
            raise UpstreamClosed(f"upstream connection broke mid-body ({type(e).__name__})") from None

    async def read_all(self, limit: int) -> bytes:
        parts = []
        size = 0
        while chunk := await self.read_chunk():
            size += len(chunk)
            if size > limit:
                self.close()
                raise UpstreamClosed("upstream response exceeds the size limit")
            parts.append(chunk)
        return b"".join(parts)

    def close(self) -> None:
        """Give the connection back if the body was read to the end, else drop it."""
        resp = self._resp
        if resp.content.at_eof():
            resp.release()
        else:
            resp.close()


class Pool:
    """Pooled keep-alive connections to every configured upstream (aiohttp underneath)."""

    def __init__(self, *, connect_timeout: float, read_timeout: float, total_timeout: float,
                 max_per_host: int = 256, keepalive_expiry: float = 30.0) -> None:
        self._connector = aiohttp.TCPConnector(
            limit=0, limit_per_host=max_per_host, keepalive_timeout=keepalive_expiry,
            ssl=ssl.create_default_context(), enable_cleanup_closed=False,
        )
        self._session = aiohttp.ClientSession(
            connector=self._connector,
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
            # sock_read is the idle-read timeout: it bounds the wait for the head and
            # every later read; total bounds the whole exchange.
            timeout=aiohttp.ClientTimeout(total=total_timeout, connect=None, sock_connect=connect_timeout,
                                          sock_read=read_timeout),
            cookie_jar=aiohttp.DummyCookieJar(),
        )

    async def request(self, method: str, upstream: Upstream, target: str,
                      headers: list[tuple[str, str]], body: bytes) -> Response:
        # encoded=True: the path and query go out exactly as the client sent them (a
        # re-quoted path would also break a SigV4 signature computed over it).
        url = URL(f"{upstream.scheme}://{upstream.host_header}{target}", encoded=True)
        try:
            resp = await self._session._request(  # noqa: SLF001 - skips a context-manager wrapper
                method, url, data=body or None, headers=headers, allow_redirects=False,
                compress=None, chunked=None, raise_for_status=False,
            )
        except (TimeoutError, aiohttp.ServerTimeoutError):
            raise UpstreamTimeout("upstream did not answer within the timeout") from None
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, aiohttp.ClientResponseError, OSError) as e:
            raise UpstreamConnectError(f"upstream unreachable ({type(e).__name__})") from None
        return Response(resp)

    async def aclose(self) -> None:
        await self._session.close()
