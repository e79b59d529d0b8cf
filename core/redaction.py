"""Redaction: what may be a secret taken out of URIs and messages before they are written or printed.

The rule: every URI loses its userinfo (`user:pass@`, `TOKEN@`) and, for http(s), its whole query string
and fragment, where signed URLs keep their signatures, credentials and tokens (AWS SigV4 and SigV2, GCS
V4, Azure SAS, ...). Scheme, host and path stay, so rows still join back to a list of URLs.
"""

from __future__ import annotations

import os
import re

# A URI in a message: up to whitespace, a quote, or a bracket closing around it.
URI_IN_TEXT = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"`<>)\]]+")
# Query parameters that carry a signature, a credential or a token in the signed-URL schemes met in
# manifests: AWS SigV4 (X-Amz-*) and SigV2 (AWSAccessKeyId, Signature, Expires), GCS V4 (X-Goog-*) and V2
# (GoogleAccessId), Azure SAS (sv, ss, srt, sp, se, st, spr, sig, sk*, ...), and plain tokens and keys.
# A fallback only: URLs lose their whole query string (redact_uri); this masks such parameters where a
# query appears outside a URL.
SECRET_PARAMETER = re.compile(
    r"(?i)((?:^|[\s?&;\"'(])(?:X-Amz-[\w-]+|X-Goog-[\w-]+|AWSAccessKeyId|GoogleAccessId|Signature|Expires|"
    r"sig|sv|ss|srt|sp|se|st|spr|sip|sr|sdd|sk\w*|token|access_token|api_key|apikey|key|password)=)[^&\s'\"<>]+")


def redact_uri(uri: str) -> str:
    """A URI without what may be a secret: the userinfo (`user:pass@`, `TOKEN@`) of any scheme and, for
    http(s), the query string and fragment, where signed URLs keep their signatures, credentials and
    tokens. Scheme, host and path stay, so rows still join back to a list of URLs."""
    match = re.match(r"([a-zA-Z][a-zA-Z0-9+.-]*)://([^/?#]*)(.*)", uri, re.DOTALL)
    if not match:
        return uri
    scheme, authority, rest = match.groups()
    authority = authority.rpartition("@")[2]
    if scheme.lower() in ("http", "https"):
        rest = re.split(r"[?#]", rest, maxsplit=1)[0]
    return f"{scheme}://{authority}{rest}"


def redact(text: str) -> str:
    """Remove anything that looks like a credential from a message before it is logged, printed or
    stored: the values of the AWS credential variables, every URI's userinfo and http(s) query
    (redact_uri), and signed-URL parameters wherever else they appear."""
    secrets = [os.environ.get(name, "") for name in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID")]
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    text = URI_IN_TEXT.sub(lambda match: redact_uri(match.group(0)), text)
    return SECRET_PARAMETER.sub(r"\1***", text)
