"""The path a request target routes to, shared by the HTTP server and the check of the URLs it serves.

The server percent-decodes a path before it looks it up and refuses (400) one that could mean something
else to a cache or file server in front of it; config refuses a CRL or CA URL the server would refuse,
so that no certificate or CRL points at a URL that cannot be fetched.
"""

from __future__ import annotations

import re
from urllib.parse import unquote, urlsplit

_TARGET = re.compile(r"[!-~]+")  # RFC 9112 3.2: visible ASCII, no spaces or controls
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")


def request_path(target: str) -> str:
    """The decoded path of a request target, as the server routes it; ValueError saying why it is refused."""
    return _decoded_path(_target_path(target))


def _target_path(target: str) -> str:
    """The path of an origin-form (/path?query) or absolute-form (http://host/path) request target (RFC 9112 3.2).

    An origin-form target is not given to urlsplit, which read //host/path as an authority and a shorter path.
    """
    if not _TARGET.fullmatch(target):
        raise ValueError("the request target has a character other than visible ASCII")
    if target.startswith("/"):
        path = target.partition("?")[0]
        if any(c in path for c in "#[]"):  # RFC 3986 3.3: gen-delims a path may not hold (//[x was read as an IPv6 host)
            raise ValueError("the path has #, [ or ], which a URL path may not")
        return path
    if target[:7].lower() == "http://" or target[:8].lower() == "https://":
        try:
            return urlsplit(target).path or "/"
        except ValueError:  # e.g. an unclosed IPv6 bracket
            raise ValueError("the request target is not a valid URL") from None
    raise ValueError("the request target is neither a path nor an http:// URL")


def _decoded_path(raw: str) -> str:
    """raw with its percent-escapes decoded, segment by segment; ValueError saying why it is refused.

    An escape may not smuggle in what a path is split or resolved by: an encoded slash, a NUL, or a
    dot-segment, which a cache or file server in front of this one may resolve where we do not.
    """
    if _BAD_ESCAPE.search(raw):
        raise ValueError("the path has a % not followed by two hex digits")
    segments = []
    for segment in raw.split("/"):
        try:
            decoded = unquote(segment, errors="strict")
        except UnicodeDecodeError:
            raise ValueError("the path does not decode to UTF-8") from None
        if "/" in decoded or "\0" in decoded:
            raise ValueError("the path has an encoded slash or NUL")
        if decoded in (".", ".."):
            raise ValueError("the path has a dot-segment (/./ or /../)")
        segments.append(decoded)
    return "/".join(segments)


def rename_in_path(url: str, old: str, new: str) -> str:
    """url with old replaced by new in its path alone; scheme, host, port, query and fragment stay as written.

    The configured CRL and CA URLs name the configured key by its label, and every other key's are made by putting its
    label there. Replaced in the whole URL, a label that is also part of the host ("1" in 127.0.0.1, "ca" in http://ca/)
    sent relying parties to another host, and one in the query changed nothing the server routes by.
    """
    start = url.find("//")
    start = url.find("/", start + 2) if start != -1 else 0  # the path begins at the first / after the authority
    if start == -1:
        return url  # no path: nothing names the key
    end = min((i for i in (url.find("?", start), url.find("#", start)) if i != -1), default=len(url))
    return url[:start] + url[start:end].replace(old, new) + url[end:]


__all__ = ["rename_in_path", "request_path"]
