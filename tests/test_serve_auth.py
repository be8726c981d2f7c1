"""API keys without a server: where they come from (--api-key, ZIMAGE_TRT_API_KEYS, @FILE), how a header is
judged, and `serve`'s refusal to listen beyond loopback without keys, in one line (tests/test_serve_limits.py has
the keys against the running server)."""

from __future__ import annotations

import pytest

from zimage_trt.common.errors import UserError
from zimage_trt.serve_auth import ENV_KEYS, KeyCheck, auth_error, check_exposure, is_loopback, read_keys
from zimage_trt.serve_options import ServeOptions

from .test_user_errors import assert_one_line_error

KEY_A, KEY_B, KEY_C = "sk-alpha-0123456789", "sk-bravo-0123456789", "sk-charlie-0123456789"


def test_keys_come_from_flags_the_environment_and_files(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text(f"# the team's keys\n{KEY_B}\n\n{KEY_C}, {KEY_A}\n")
    got = read_keys([KEY_A, f"@{keys}"], {ENV_KEYS: f" {KEY_C},{KEY_B} "})
    assert got == (KEY_A, KEY_B, KEY_C)  # once each, in order of first mention
    assert read_keys(None, {ENV_KEYS: f"@{keys}"}) == (KEY_B, KEY_C, KEY_A)
    assert read_keys(None, {}) == ()


@pytest.mark.parametrize("item, needle", [
    ("short", "key 1 must be at least 8"),
    (f"{KEY_A},has space inside", "key 2 must be at least 8 printable ASCII"),
    ("sk-\u00e9\u00e9\u00e9\u00e9\u00e9\u00e9\u00e9", "printable ASCII"),
    ("@/nonexistent/keys", "cannot read the key file"),
])
def test_a_bad_key_is_one_line_that_never_shows_it(item, needle):
    with pytest.raises(UserError) as err:
        read_keys([item], {})
    assert needle in str(err.value) and "has space inside" not in str(err.value)


def test_a_header_is_judged_missing_malformed_invalid_or_valid():
    check = KeyCheck((KEY_A, KEY_B))
    assert check.enabled and not KeyCheck(()).enabled
    assert check.failure(None) == "missing" and check.failure("") == "missing"
    assert check.failure(f"Basic {KEY_A}") == "malformed" and check.failure("Bearer ") == "malformed"
    assert check.failure(f"Bearer {KEY_A}x") == "invalid" and check.failure(f"Bearer {KEY_A[:-1]}") == "invalid"
    assert check.failure("Bearer \udcff\udcfe") == "invalid"  # undecodable bytes in the header: no exception
    assert check.failure(f"Bearer {KEY_A}") is None and check.failure(f"bearer  {KEY_B} ") is None
    for reason, code in [("missing", "missing_api_key"), ("malformed", "invalid_authorization_header"),
                         ("invalid", "invalid_api_key")]:
        err = auth_error(reason)
        assert err.status == 401 and err.code == code and err.headers["WWW-Authenticate"].startswith("Bearer ")


def test_keys_never_appear_in_the_options_repr():
    assert KEY_A not in repr(ServeOptions(bundle="b", api_keys=(KEY_A,)))


def test_without_keys_only_loopback_unless_no_auth():
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        assert is_loopback(host)
        check_exposure(host, (), False)
    for host in ("0.0.0.0", "::", "10.0.0.5", "myhost.example"):
        assert not is_loopback(host)
        with pytest.raises(UserError, match="--no-auth"):
            check_exposure(host, (), False)
        check_exposure(host, (KEY_A,), False)
        check_exposure(host, (), True)
    with pytest.raises(UserError, match="contradicts"):
        check_exposure("0.0.0.0", (KEY_A,), True)


def test_serve_on_0000_without_keys_is_one_line(capsys, tmp_path, monkeypatch):
    """Refused before anything loads (the bundle need not exist)."""
    from zimage_trt.cli import main

    bundle = tmp_path / "zi"
    monkeypatch.delenv(ENV_KEYS, raising=False)
    code = main(["serve", "--bundle", str(bundle), "--host", "0.0.0.0"])
    assert_one_line_error(code, capsys.readouterr().err, "--host 0.0.0.0", "--api-key KEY", "--no-auth")
    code = main(["serve", "--bundle", str(bundle), "--host", "0.0.0.0", "--no-auth", "--api-key", KEY_A])
    assert_one_line_error(code, capsys.readouterr().err, "--no-auth contradicts")
    monkeypatch.setenv(ENV_KEYS, "tiny")
    code = main(["serve", "--bundle", str(bundle)])
    err = capsys.readouterr().err
    assert_one_line_error(code, err, ENV_KEYS, "key 1 must be at least 8")
    assert "tiny" not in err.replace("key 1", "")


@pytest.mark.parametrize("args, needle", [
    (["--max-body", "lots"], "--max-body 'lots' is not a size"),
    (["--body-timeout", "0"], "--body-timeout must be a positive"),
    (["--max-connections", "0"], "--max-connections and --max-prompt-chars must be at least 1"),
])
def test_bad_limits_are_one_line(capsys, tmp_path, args, needle):
    from zimage_trt.cli import main

    assert_one_line_error(main(["serve", "--bundle", str(tmp_path / "zi"), *args]), capsys.readouterr().err, needle)


def test_max_body_sizes():
    from zimage_trt.cli_serve import byte_count

    assert byte_count("1MiB") == 2**20 and byte_count("512KiB") == 2**19 and byte_count("2MB") == 2_000_000
    assert byte_count("1048576") == 2**20


def _status(app, path: str, headers: list) -> int:
    """One GET through the ASGI app, without starting it (no runtime: /metrics needs none)."""
    import asyncio

    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "path": path,
             "raw_path": path.encode(), "query_string": b"", "headers": headers, "client": ("127.0.0.1", 1),
             "server": ("127.0.0.1", 80), "scheme": "http", "root_path": ""}
    asyncio.run(app(scope, receive, send))
    return sent[0]["status"]


def test_metrics_need_a_key_unless_public():
    pytest.importorskip("fastapi")
    from zimage_trt.server import create_app

    bearer = [(b"authorization", f"Bearer {KEY_A}".encode())]
    closed = create_app(ServeOptions(bundle="zi", api_keys=(KEY_A,)))
    assert _status(closed, "/metrics", []) == 401 and _status(closed, "/metrics", bearer) == 200
    public = create_app(ServeOptions(bundle="zi", api_keys=(KEY_A,), metrics_public=True))
    assert _status(public, "/metrics", []) == 200 and _status(public, "/v1/models", []) == 401
    assert _status(create_app(ServeOptions(bundle="zi")), "/metrics", []) == 200  # no keys: loopback, open
