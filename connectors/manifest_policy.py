"""What a manifest may point at: by default, what lies beside it and public web hosts.

A manifest is a list that someone else may have written, read with this job's credentials, and what its
entries hold ends up in the output (as transcriptions and captions). So by default an entry may name:

- an object in the manifest's own bucket (`s3://`, `gs://`, `memory://`), anywhere in it; for a local
  manifest, a file in the manifest's folder or below it; for a manifest served over http(s), a URL on
  the same scheme, host and port;
- an http(s) URL on a public host (URL lists are how captioning corpora ship): not a loopback,
  private, link-local or metadata address (`localhost`, `127.0.0.1`, `10.x`, `192.168.x`,
  `169.254.169.254`, `metadata.google.internal`, `fd00::/8`, ...). The name is checked when the job is
  planned, and again when the URL is fetched: every address it resolves to must be public, and so must
  every URL a redirect leads to (`guarded_http_session`).

Anything else (`file:///etc/passwd`, a local path outside the manifest's folder, another bucket through
`../../other-bucket/x.pdf`, a host on the private network) is an error row (stage "list") and is never
read, unless a prefix in `[input] manifest_allow` covers it, e.g. `["s3://other-bucket/", "/data/scans/",
"http://10.0.0.5:8080/"]`, or `["*"]` for anything. Entries are compared in their redacted form (no
userinfo, no query string: connectors/storage.py `redact_uri`).
"""

from __future__ import annotations

import errno
import ipaddress
import os
import posixpath
import socket
from typing import Sequence
from urllib.parse import urlsplit

from connectors.storage import protocol_of, redact_uri

HTTP = ("http", "https")
LOCAL_HOST_NAMES = ("localhost", "metadata", "metadata.google.internal")
LOCAL_HOST_SUFFIXES = (".localhost", ".internal", ".local")


def entry_refusal(uri: str, manifest_uri: str, allow: Sequence[str]) -> str | None:
    """Why manifest entry `uri` may not be read (None if it may), for its error row."""
    uri, manifest_uri = redact_uri(uri), redact_uri(manifest_uri)
    if allowed_by(uri, allow) or _beside(uri, manifest_uri):
        return None
    fix = f"allow it with [input] manifest_allow = [\"{_suggested_prefix(uri)}\"]"
    if protocol_of(uri) in HTTP:
        private = private_host(urlsplit(uri).hostname or "")
        return None if private is None else f"manifest entry {uri} is not read: {private}; {fix}"
    where = "folder" if protocol_of(manifest_uri) == "file" else ("host" if protocol_of(manifest_uri) in HTTP else "bucket")
    return f"manifest entry {uri} is not read: it is outside the manifest's {where}; {fix}"


def allowed_by(uri: str, allow: Sequence[str]) -> bool:
    """Does a prefix in `allow` (or "*") cover `uri`? Local paths are compared as absolute paths."""
    target = _comparable(uri)
    return any(prefix == "*" or target.startswith(_comparable(prefix)) for prefix in allow)


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


def _beside(uri: str, manifest_uri: str) -> bool:
    """In the manifest's own bucket, below its folder (local), or on its own origin (http)."""
    scheme = protocol_of(manifest_uri)
    if protocol_of(uri) != scheme:
        return False
    if scheme == "file":
        folder = os.path.dirname(_local_path(manifest_uri))
        return os.path.commonpath([folder, _local_path(uri)]) == folder
    if scheme in HTTP:
        return urlsplit(uri).netloc.lower() == urlsplit(manifest_uri).netloc.lower()
    return _bucket(uri) == _bucket(manifest_uri)


def _bucket(uri: str) -> str:
    return uri.split("://", 1)[-1].split("/", 1)[0]


def _local_path(uri: str) -> str:
    path = uri[len("file://"):] if uri.startswith("file://") else uri
    return os.path.abspath(os.path.expanduser(path))


def _comparable(uri: str) -> str:
    """`uri` as prefixes are matched: local paths absolute (a trailing / kept), http hosts lower-case."""
    if protocol_of(uri) == "file":
        return "file://" + _local_path(uri) + ("/" if uri.endswith("/") else "")
    if protocol_of(uri) in HTTP:
        parts = urlsplit(uri)
        return f"{parts.scheme.lower()}://{parts.netloc.lower()}{parts.path}"
    return uri


def _suggested_prefix(uri: str) -> str:
    """The prefix to allow for `uri`: its bucket, its host, or its folder."""
    scheme = protocol_of(uri)
    if scheme == "file":
        return posixpath.dirname(_local_path(uri)) + "/"
    if scheme in HTTP:
        parts = urlsplit(uri)
        return f"{parts.scheme}://{parts.netloc}/"
    return f"{scheme}://{_bucket(uri)}/"


# -- when http(s) URLs are fetched -------------------------------------------------------------------
def http_refusal(url: str, allow: Sequence[str]) -> str | None:
    """Why `url` may not be fetched: a private host that no `allow` prefix covers. None if it may."""
    url = redact_uri(url)
    if allowed_by(url, allow):
        return None
    private = private_host(urlsplit(url).hostname or "")
    return None if private is None else f"{url} is not read: {private}; allow it with [input] manifest_allow"


def allowed_hosts(allow: Sequence[str]) -> set[str] | None:
    """Host names that may resolve to private addresses: those of http(s) prefixes (None: any, for "*")."""
    if "*" in allow:
        return None
    return {(urlsplit(p).hostname or "").lower() for p in allow if protocol_of(p) in HTTP}


class PublicAddressResolver:
    """aiohttp's resolver, refusing host names that resolve to non-public addresses (a name is not
    proof: `169.254.169.254.nip.io` resolves to the metadata endpoint)."""

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
