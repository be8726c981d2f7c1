"""API keys: where they come from (--api-key, ZIMAGE_TRT_API_KEYS, @FILE), how a request's key is checked (in
constant time), and the rule that a server without keys stays on loopback unless told --no-auth.

A key is never printed: errors name its source and position, the options' repr leaves keys out, and a failed
check is counted by reason (missing | malformed | invalid) in zimage_auth_failures_total, not logged.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os

from zimage_trt.common.errors import UserError

from .serve_options import ApiError

ENV_KEYS = "ZIMAGE_TRT_API_KEYS"
MIN_KEY_CHARS = 8
REALM = 'Bearer realm="zimage-trt"'


def _split_keys(text: str) -> list[str]:
    """Keys separated by commas or newlines; blank entries and `#` comment lines are skipped."""
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    return [k.strip() for line in lines for k in line.split(",") if k.strip()]


def _expand(item: str, source: str) -> list[str]:
    if not item.startswith("@"):
        return _split_keys(item)
    path = item[1:]
    try:
        with open(path, encoding="utf-8") as f:
            return _split_keys(f.read())
    except (OSError, UnicodeDecodeError) as exc:
        why = getattr(exc, "strerror", None) or exc
        raise UserError(f"{source} @{path}: cannot read the key file ({why})") from None


def read_keys(flags: list[str] | None, environ=None) -> tuple[str, ...]:
    """The keys of `--api-key` (repeatable) and of ZIMAGE_TRT_API_KEYS, each a comma-separated list or @FILE."""
    environ = os.environ if environ is None else environ
    sources = [("--api-key", item) for item in flags or []]
    if environ.get(ENV_KEYS, "").strip():
        sources.append((ENV_KEYS, environ[ENV_KEYS].strip()))
    keys: list[str] = []
    for source, item in sources:
        for i, key in enumerate(_expand(item, source), 1):
            if len(key) < MIN_KEY_CHARS or not key.isascii() or not key.isprintable() or " " in key:
                raise UserError(f"{source}: key {i} must be at least {MIN_KEY_CHARS} printable ASCII characters "
                                "without spaces (it travels in an HTTP header)")
            if key not in keys:
                keys.append(key)
    return tuple(keys)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name that resolves elsewhere, or 0.0.0.0 / ::, is not loopback


def check_exposure(host: str, keys: tuple[str, ...], no_auth: bool) -> None:
    """Without keys, only loopback unless --no-auth says otherwise; keys and --no-auth together are a mistake."""
    if keys and no_auth:
        raise UserError("--no-auth contradicts the API keys given (--api-key or ZIMAGE_TRT_API_KEYS); pick one")
    if not keys and not no_auth and not is_loopback(host):
        raise UserError(f"--host {host} would let anyone who reaches it generate: give --api-key KEY (or set "
                        f"{ENV_KEYS}), or pass --no-auth to serve without keys")


class KeyCheck:
    """`Authorization: Bearer KEY` against the server's keys. Digests of equal length are compared, every key each
    time, so the time taken tells nothing about a key's length, prefix or position."""

    def __init__(self, keys: tuple[str, ...]):
        self.digests = [hashlib.sha256(k.encode()).digest() for k in keys]

    @property
    def enabled(self) -> bool:
        return bool(self.digests)

    def failure(self, header: str | None) -> str | None:
        """None if the header carries a valid key, else why not: missing | malformed | invalid."""
        if not header:
            return "missing"
        scheme, _, token = header.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return "malformed"
        digest = hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()
        found = False
        for known in self.digests:
            found |= hmac.compare_digest(digest, known)
        return None if found else "invalid"


def auth_error(reason: str) -> ApiError:
    """The 401 for a failed check, with WWW-Authenticate (RFC 6750)."""
    if reason == "missing":
        return ApiError(401, "no API key: send it as 'Authorization: Bearer KEY'", code="missing_api_key",
                        headers={"WWW-Authenticate": REALM})
    if reason == "malformed":
        return ApiError(401, "the Authorization header must be 'Bearer KEY'", code="invalid_authorization_header",
                        headers={"WWW-Authenticate": f'{REALM}, error="invalid_request"'})
    return ApiError(401, "the API key is not valid", code="invalid_api_key",
                    headers={"WWW-Authenticate": f'{REALM}, error="invalid_token"'})
