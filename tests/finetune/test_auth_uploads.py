"""Admin password sessions and dataset uploads."""
from __future__ import annotations

import time

import pytest

from finetune import FinetuneError
from finetune.ui.auth import AdminAuth, AuthError
from finetune.ui.uploads import MAX_UPLOAD_BYTES, safe_filename, store_upload


def test_login_issues_a_token_that_require_accepts():
    auth = AdminAuth("s3cret", max_delay_s=0.01)
    token = auth.login("s3cret", "1.2.3.4")
    auth.require(token)
    auth.logout(token)
    with pytest.raises(AuthError):
        auth.require(token)


@pytest.mark.parametrize("token", [None, "", "guess", "s3cret"])
def test_require_refuses_anything_but_an_issued_token(token):
    with pytest.raises(AuthError, match="Log in"):
        AdminAuth("s3cret").require(token)


def test_failures_slow_down_and_reset_on_success():
    auth = AdminAuth("s3cret", max_delay_s=0.4)
    delays = []
    for _ in range(3):
        started = time.monotonic()
        with pytest.raises(AuthError):
            auth.login("wrong", "client")
        delays.append(time.monotonic() - started)
    assert delays[0] >= 0.2 and delays[2] >= 0.4 - 0.01  # 0.5 s doubling, capped
    auth.login("s3cret", "client")
    assert auth._failures.get("client") is None


def test_sessions_expire():
    auth = AdminAuth("pw", session_ttl_s=0.05)
    token = auth.login("pw")
    time.sleep(0.1)
    assert not auth.is_valid(token)


def test_generated_password_is_printed_once(capsys):
    AdminAuth("")
    out = capsys.readouterr().out
    assert "admin password for this run:" in out and len(out.strip().split()[-1]) >= 12


@pytest.mark.parametrize("name,expected", [
    ("../../etc/passwd", "passwd"), ("..\\..\\x.csv", "x.csv"), (".hidden.json", "hidden.json"),
    ("/abs/path/data.jsonl", "data.jsonl"), ("we ird;name$.csv", "we_ird_name_.csv"), ("", "dataset"),
])
def test_safe_filename_never_escapes(name, expected):
    assert safe_filename(name) == expected


def test_store_upload_checks_and_keeps_files_inside(tmp_path):
    uploads = tmp_path / "uploads"
    good = tmp_path / "in.jsonl"
    good.write_text('{"question": "q", "answer": "a"}\n')
    stored = store_upload(good, "../../evil/data.jsonl", uploads)
    assert stored.parent == uploads and stored.name.endswith("-data.jsonl")

    bad_ext = tmp_path / "x.exe"
    bad_ext.write_text("hi")
    empty = tmp_path / "e.csv"
    empty.write_text("")
    latin1 = tmp_path / "l.csv"
    latin1.write_bytes("question,answer\ncaf\xe9,ok\n".encode("latin-1"))
    huge = tmp_path / "h.json"
    with open(huge, "wb") as fh:
        fh.truncate(MAX_UPLOAD_BYTES + 1)
    for path, message in [(bad_ext, "upload a .json"), (empty, "empty"),
                          (latin1, "not UTF-8"), (huge, "limit")]:
        with pytest.raises(FinetuneError, match=message):
            store_upload(path, path.name, uploads)
    assert [p.name for p in uploads.iterdir()] == [stored.name]
