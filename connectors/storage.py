"""URIs to filesystems: the one place that knows where bytes live.

`s3://`, `gs://`, `memory://`, `file://` and plain paths all resolve to an fsspec filesystem plus the
path inside it. Credentials come from the standard places (AWS env vars and profiles,
`AWS_ENDPOINT_URL`, GCS application credentials) unless the job's `[storage]` section overrides the
endpoint, region, profile or asks for anonymous access (MinIO, R2, Ceph and other S3-compatible stores).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import fsspec

from jobs.spec import StorageSpec


@dataclass(frozen=True)
class StorageOptions:
    """What a worker needs to open a URI. Picklable, so it travels to Ray workers; holds no secrets."""

    endpoint_url: str = ""
    region: str = ""
    profile: str = ""
    anon: bool = False

    @classmethod
    def from_spec(cls, spec: StorageSpec) -> "StorageOptions":
        return cls(spec.endpoint_url, spec.region, spec.profile, spec.anon)


def protocol_of(uri: str) -> str:
    match = re.match(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://", uri)
    if not match:
        return "file"
    proto = match.group(1).lower()
    return {"s3a": "s3", "gcs": "gs"}.get(proto, proto)


def fsspec_options(protocol: str, options: StorageOptions) -> dict:
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
        return {"token": "anon"} if options.anon else {}
    if protocol == "file":
        return {"auto_mkdir": True}
    return {}


def filesystem_for(uri: str, options: StorageOptions | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return (fsspec filesystem, path within it) for a URI."""
    options = options or StorageOptions()
    protocol = protocol_of(uri)
    fs = fsspec.filesystem(protocol, **fsspec_options(protocol, options))
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


def read_bytes(uri: str, options: StorageOptions | None = None) -> bytes:
    fs, path = filesystem_for(uri, options)
    with fs.open(path, "rb") as handle:
        return handle.read()


def redact(text: str) -> str:
    """Remove anything that looks like a credential from a message before it is logged or stored."""
    secrets = [os.environ.get(name, "") for name in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID")]
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    # Presigned-URL style query strings and inline user:password@ credentials.
    text = re.sub(r"(X-Amz-(Credential|Signature|Security-Token)=)[^&\s]+", r"\1***", text)
    text = re.sub(r"(://)[^/\s:@]+:[^/\s@]+@", r"\1***:***@", text)
    return text
