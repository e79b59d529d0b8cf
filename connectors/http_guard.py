"""The http(s) guard: a job's URL reads reach public hosts only, unless its manifest policy names more.

Manifest entries are checked when the job is planned (manifest_policy.py); this checks again when a URL
is fetched, where a name alone is no proof: every URL a request is sent to, redirects included, must not
name a loopback, private, link-local or metadata host (`localhost`, `127.0.0.1`, `10.x`, `192.168.x`,
`169.254.169.254`, `metadata.google.internal`, `[::1]`, in any spelling a resolver takes), and every
address a host name resolves to must be public (`169.254.169.254.nip.io` resolves to the metadata
endpoint), unless an http(s) prefix of `[input] manifest_allow` covers it ("*": anything).
"""

from __future__ import annotations

import errno
import ipaddress
import socket
from typing import Sequence
from urllib.parse import urlsplit

from scriptorium.core.redaction import redact_uri

HTTP = ("http", "https")
LOCAL_HOST_NAMES = ("localhost", "metadata", "metadata.google.internal")
LOCAL_HOST_SUFFIXES = (".localhost", ".internal", ".local")


def private_host(host: str) -> str | None:
    """Why `host` is not a public web host: a local or metadata name, or a loopback, private, link-local
    or reserved address, in any spelling a resolver accepts (`127.1`, `2130706433`, `[::1]`). None if public."""
    name = host.strip("[]").rstrip(".").lower()
    if not name:
        return "the URL has no host"
    if name in LOCAL_HOST_NAMES or name.endswith(LOCAL_HOST_SUFFIXES):
        return f"{host} is a local or metadata host name"
    address = _as_address(name)
    if address is not None and not address.is_global:
        return f"{host} is a loopback, private, link-local or reserved address"
    return None


def _as_address(name: str):
    try:
        return ipaddress.ip_address(name)
    except ValueError:
        pass
    try:  # the legacy IPv4 spellings getaddrinfo still takes
        return ipaddress.ip_address(socket.inet_aton(name))
    except OSError:
        return None


def comparable_url(url: str) -> str:
    """An http(s) URL as prefixes are matched: scheme and host lower-case, no userinfo, query or fragment."""
    parts = urlsplit(redact_uri(url))
    return f"{parts.scheme.lower()}://{parts.netloc.lower()}{parts.path}"


def url_allowed_by(url: str, allow: Sequence[str]) -> bool:
    """Does an http(s) prefix in `allow` (or "*") cover `url`?"""
    target = comparable_url(url)
    return any(p == "*" or (urlsplit(p).scheme.lower() in HTTP and target.startswith(comparable_url(p))) for p in allow)


def http_refusal(url: str, allow: Sequence[str]) -> str | None:
    """Why `url` may not be fetched: a private host that no `allow` prefix covers. None if it may."""
    if url_allowed_by(url, allow):
        return None
    private = private_host(urlsplit(url).hostname or "")
    return None if private is None else f"{redact_uri(url)} is not read: {private}; allow it with [input] manifest_allow"


def allowed_hosts(allow: Sequence[str]) -> set[str] | None:
    """Host names that may resolve to private addresses: those of http(s) prefixes (None: any, for "*")."""
    if "*" in allow:
        return None
    return {(urlsplit(p).hostname or "").lower() for p in allow if urlsplit(p).scheme.lower() in HTTP}


class PublicAddressResolver:
    """aiohttp's resolver, refusing host names that resolve to addresses that are not public."""

    def __init__(self, allowed: set[str] | None):
        import aiohttp

        self._resolver = aiohttp.DefaultResolver()
        self._allowed = allowed

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET) -> list:
        found = await self._resolver.resolve(host, port, family)
        if self._allowed is not None and host.lower() not in self._allowed:
            for address in found:
                if not ipaddress.ip_address(address["host"]).is_global:  # aiohttp's message shows strerror
                    raise PermissionError(errno.EACCES, f"{host} resolves to {address['host']}, not a public address: "
                                                        "not read; allow it with [input] manifest_allow")
        return found

    async def close(self) -> None:
        await self._resolver.close()


async def guarded_http_session(allow: tuple[str, ...], **kwargs):
    """An aiohttp session for fsspec's HTTPFileSystem (its `get_client`) that fetches only what the
    policy lets through: the URL asked for and every redirect's target are checked (`http_refusal`),
    and host names must resolve to public addresses unless `allow` names them."""
    import aiohttp
    from yarl import URL

    async def check_request(session, context, params) -> None:
        _refuse_unless_allowed(str(params.url), allow)

    async def check_redirect(session, context, params) -> None:
        location = params.response.headers.get("Location")
        if location:
            _refuse_unless_allowed(str(params.url.join(URL(location))), allow)

    trace = aiohttp.TraceConfig()
    trace.on_request_start.append(check_request)
    trace.on_request_redirect.append(check_redirect)
    connector = aiohttp.TCPConnector(resolver=PublicAddressResolver(allowed_hosts(allow)))
    return aiohttp.ClientSession(connector=connector, trace_configs=[trace], **kwargs)


def _refuse_unless_allowed(url: str, allow: Sequence[str]) -> None:
    refusal = http_refusal(url, allow)
    if refusal:
        raise PermissionError(refusal)
