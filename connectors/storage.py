"""URIs to filesystems: the one place that knows where bytes live.

`s3://`, `gs://`, `memory://`, `file://` and plain paths all resolve to an fsspec filesystem plus the
path inside it. Credentials come from the standard places (AWS env vars and profiles,
`AWS_ENDPOINT_URL`, GCS application credentials) unless the job's `[storage]` section overrides the
endpoint, region, profile or asks for anonymous access (MinIO, R2, Ceph and other S3-compatible stores).
The `StorageSpec` travels to every worker with the job; it holds no secrets.
"""

from __future__ import annotations

import logging
import os
import random
import re
import time
from typing import Callable, TypeVar

import fsspec

from scriptorium.core.redaction import redact
from scriptorium.core.spec import StorageSpec

log = logging.getLogger("scriptorium.storage")
T = TypeVar("T")


def protocol_of(uri: str) -> str:
    match = re.match(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://", uri)
    if not match:
        return "file"
    proto = match.group(1).lower()
    return {"s3a": "s3", "gcs": "gs"}.get(proto, proto)


def fsspec_options(protocol: str, options: StorageSpec) -> dict:
    """Keyword arguments for fsspec.filesystem(protocol) from the job's storage settings."""
    if protocol == "s3":
        kwargs: dict = {}
        endpoint = options.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        client_kwargs = {}
        if endpoint:
            client_kwargs["endpoint_url"] = endpoint
        region = options.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if region:
            client_kwargs["region_name"] = region
        if client_kwargs:
            kwargs["client_kwargs"] = client_kwargs
        if options.profile:
            kwargs["profile"] = options.profile
        if options.anon:
            kwargs["anon"] = True
        # Retries with backoff on throttling, 5xx and timeouts are botocore's "adaptive" mode.
        kwargs["config_kwargs"] = {"retries": {"max_attempts": 8, "mode": "adaptive"}}
        return kwargs
    if protocol == "gs":
        kwargs = {"token": "anon"} if options.anon else {}
        if options.gcs_endpoint_url:  # an emulator or gateway; gcsfs itself reads STORAGE_EMULATOR_HOST
            kwargs["endpoint_url"] = options.gcs_endpoint_url
        return kwargs
    if protocol == "file":
        return {"auto_mkdir": True}
    if protocol in ("http", "https") and options.http_allow is not None:
        from functools import partial

        from scriptorium.connectors.http_guard import guarded_http_session

        return {"get_client": partial(guarded_http_session, options.http_allow)}
    return {}


def _filesystem(protocol: str, **kwargs) -> fsspec.AbstractFileSystem:
    emulator = os.environ.get("STORAGE_EMULATOR_HOST", "") not in ("", "default")  # as gcsfs reads it
    if protocol == "gs" and (kwargs.get("endpoint_url") or emulator):
        # gcsfs's default class asks the gRPC Storage Control API for a bucket's layout (zonal,
        # hierarchical) before most calls, and does not remember a failed answer. Emulators speak the
        # JSON API only, so every read would wait out a minute of gRPC retries; the plain class doesn't ask.
        from gcsfs.core import GCSFileSystem

        return GCSFileSystem(**kwargs)
    return fsspec.filesystem(protocol, **kwargs)


def filesystem_for(uri: str, options: StorageSpec | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return (fsspec filesystem, path within it) for a URI."""
    options = options or StorageSpec()
    protocol = protocol_of(uri)
    fs = _filesystem(protocol, **fsspec_options(protocol, options))
    if protocol == "file":
        path = uri[len("file://"):] if uri.startswith("file://") else uri
        return fs, os.path.abspath(os.path.expanduser(path))
    return fs, fs._strip_protocol(uri)


def uri_for(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """The user-facing URI of a path inside `fs` (the inverse of filesystem_for)."""
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if protocol in ("file", "local"):
        return path
    return f"{protocol}://{path}"


# Throttling, server-side and network trouble: worth trying again after a pause. Anything else
# (no such key, access denied, bad request) will fail the same way every time.
TRANSIENT_HTTP_STATUS = {408, 429, 500, 502, 503, 504}
TRANSIENT_ERROR_CODES = {
    "SlowDown", "Throttling", "ThrottlingException", "TooManyRequestsException", "RequestLimitExceeded",
    "RequestTimeout", "RequestTimeoutException", "InternalError", "ServiceUnavailable", "503", "500",
}
CLIENT_RETRIES = {"s3", "gs"}  # protocols whose fsspec client retries transient errors itself
PERMANENT_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


def is_transient(exc: BaseException) -> bool:
    """Would the same request plausibly succeed later? Looks through the exception's cause chain,
    because s3fs re-raises botocore's ClientError as an OSError subclass with the original as cause."""
    seen = 0
    while exc is not None and seen < 5:
        if isinstance(exc, PERMANENT_ERRORS):
            return False
        if isinstance(exc, (TimeoutError, ConnectionError)):
            return True
        response = getattr(exc, "response", None)  # botocore ClientError
        if isinstance(response, dict):
            code = str(response.get("Error", {}).get("Code", ""))
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            return code in TRANSIENT_ERROR_CODES or status in TRANSIENT_HTTP_STATUS
        status = getattr(exc, "status", None) or getattr(exc, "code", None)  # aiohttp, gcsfs HttpError
        if isinstance(status, int) and status in TRANSIENT_HTTP_STATUS:
            return True
        name = type(exc).__name__
        if name in ("ReadTimeoutError", "ConnectTimeoutError", "EndpointConnectionError", "ServerDisconnectedError",
                    "ClientPayloadError", "IncompleteRead", "FSTimeoutError"):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def with_retries(call: Callable[[], T], attempts: int = 5, first_delay_s: float = 0.5, max_delay_s: float = 20.0) -> T:
    """Run `call`, retrying transient storage errors with jittered exponential backoff; permanent
    errors are raised at once. For stores whose client has no retries of its own (see read_bytes)."""
    for attempt in range(1, attempts + 1):
        try:
            return call()
        except Exception as exc:
            if attempt == attempts or not is_transient(exc):
                raise
            delay = min(max_delay_s, first_delay_s * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)
            log.warning("transient storage error (attempt %d of %d), retrying in %.1f s: %s",
                        attempt, attempts, delay, redact(f"{type(exc).__name__}: {exc}"))
            time.sleep(delay)
    raise AssertionError("unreachable")


def describe_error(exc: BaseException, uri: str = "") -> str:
    """A short, credential-free reason for a storage failure: the kind of problem, the URI, the detail."""
    if isinstance(exc, FileNotFoundError):
        kind = "no such object"
    elif isinstance(exc, PermissionError):
        kind = "access denied"
    elif is_transient(exc):
        kind = "storage unavailable (gave up after retries)"
    else:
        kind = type(exc).__name__
    detail = str(exc).strip()
    if len(detail) > 300:
        detail = detail[:300] + "..."
    text = f"{kind}: {uri}" if uri else kind
    if detail and not (uri and uri.endswith(detail.removeprefix("/"))):
        text += f" ({detail})" if uri else f": {detail}"
    return redact(text)


def read_bytes(uri: str, options: StorageSpec | None = None) -> bytes:
    """The whole object, in one GET where the store allows it. Transient errors are retried; a missing
    or forbidden object raises FileNotFoundError / PermissionError whose message says which and where."""
    fs, path = filesystem_for(uri, options)
    # S3 and GCS clients already retry throttling, 5xx and timeouts with backoff (botocore's adaptive
    # mode per request, see fsspec_options, and s3fs/gcsfs around each whole read, body included);
    # retrying on top would multiply the attempts into minutes per document on a store that is down.
    attempts = 1 if protocol_of(uri) in CLIENT_RETRIES else 5
    try:
        return with_retries(lambda: fs.cat_file(path), attempts=attempts)
    except FileNotFoundError as exc:
        raise FileNotFoundError(describe_error(exc, uri)) from None
    except PermissionError as exc:
        raise PermissionError(describe_error(exc, uri)) from None


# -- fail-fast checks before a job starts ------------------------------------------------------------
# A job's own reads and writes retry for minutes (botocore adaptive mode x s3fs retries), which is right
# for a busy store mid-run and wrong for "is this endpoint even there?": a probe gets one retry and
# short timeouts, so a wrong --endpoint-url or a dead network is reported in seconds.
PROBE_CONFIG = {"retries": {"max_attempts": 2, "mode": "standard"}, "connect_timeout": 5, "read_timeout": 20}


def probe_filesystem(uri: str, options: StorageSpec | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """Like filesystem_for, but with few retries and short timeouts (and a fresh, uncached instance)."""
    _, path = filesystem_for(uri, options)
    protocol = protocol_of(uri)
    kwargs = fsspec_options(protocol, options or StorageSpec())
    if protocol == "s3":
        kwargs["config_kwargs"] = PROBE_CONFIG
    fs = _filesystem(protocol, skip_instance_cache=True, **kwargs)
    if protocol == "s3":
        fs.retries = 1  # s3fs's own retry loop around botocore's (a class attribute, not an argument)
    return fs, path


GENERIC_HINT = "check the URI, --endpoint-url and the credentials"


def storage_hint(exc: BaseException) -> str:
    """What to do about a storage failure, for the one line a user sees."""
    names = set()
    while exc is not None and len(names) < 6:
        names.add(type(exc).__name__)
        exc = exc.__cause__ or exc.__context__
    if "NoCredentialsError" in names or "PartialCredentialsError" in names:
        return ("no credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or pass --profile, "
                "or --anon for a public bucket")
    if "ProfileNotFound" in names:
        return "the AWS profile is not in the AWS config files: check --profile (or AWS_PROFILE)"
    if names & {"EndpointConnectionError", "ConnectTimeoutError", "ConnectionError", "ConnectionRefusedError",
                "ClientConnectorError", "ConnectTimeout", "TimeoutError"}:
        return "cannot connect to the storage endpoint: check --endpoint-url (or AWS_ENDPOINT_URL) and the network"
    if names & {"PermissionError", "AccessDenied"}:
        return "access denied: check that the credentials may read/write this bucket and prefix"
    return GENERIC_HINT


def unreachable_reason(uri: str, options: StorageSpec | None = None) -> str | None:
    """None if the store behind `uri` answers, else one line saying what failed and what to do about it.
    Takes seconds, not minutes. Only an endpoint that cannot be reached and missing credentials count:
    a missing object, or a 403 on this probe's HEAD (credentials that may list or write but not read),
    is left to the job's own requests, which say what they could not do."""
    if protocol_of(uri) == "file":
        return None
    fs, path = probe_filesystem(uri, options)
    for glob_char in "*?[":  # probe the fixed part of a glob
        if glob_char in path:
            path = path[: path.index(glob_char)].rsplit("/", 1)[0]
    try:
        fs.info(path)
    except (FileNotFoundError, PermissionError):
        return None
    except Exception as exc:
        hint = storage_hint(exc)
        if hint == GENERIC_HINT or hint.startswith("access denied"):
            return None
        detail = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        return redact(f"{hint} ({type(exc).__name__}{': ' + detail if detail else ''})")
    return None
