"""One rule for where a bearer token comes from (serve/api/auth.py read_bearer_token), used by `lmforge serve`,
`chat`, `eval` and `bench serve`: a named file or environment variable that holds no token is an error naming it."""

from __future__ import annotations

import pytest

from lifecycle.cli import main
from lifecycle.errors import ConfigError
from serve.api.auth import read_bearer_token

VAR = "LMFORGE_TEST_TOKEN_SOURCE"


def test_a_token_from_a_file_or_a_variable(tmp_path, monkeypatch):
    path = tmp_path / "token"
    path.write_text("s3cret\n")
    assert read_bearer_token(str(path), None) == "s3cret"
    monkeypatch.setenv(VAR, "  s3cret  ")
    assert read_bearer_token(None, VAR) == "s3cret"
    assert read_bearer_token(None, None) is None


@pytest.mark.parametrize("env, message", [
    (None, f"--auth-token-env: the environment variable ${VAR} is not set"),
    ("", f"--auth-token-env: the environment variable ${VAR} is empty"),
    ("  \n", f"--auth-token-env: the environment variable ${VAR} is empty"),
])
def test_a_named_variable_without_a_token_is_refused(monkeypatch, env, message):
    monkeypatch.delenv(VAR, raising=False)
    if env is not None:
        monkeypatch.setenv(VAR, env)
    with pytest.raises(ConfigError, match=message.replace("$", r"\$")):
        read_bearer_token(None, VAR)


def test_a_named_file_without_a_token_is_refused(tmp_path):
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(ConfigError, match=f"--auth-token-file: {empty} is empty"):
        read_bearer_token(str(empty), None)
    with pytest.raises(ConfigError, match=f"--auth-token-file: cannot read {tmp_path / 'missing'}"):
        read_bearer_token(str(tmp_path / "missing"), None)
    with pytest.raises(ConfigError, match="give one source"):
        read_bearer_token(str(empty), VAR)


@pytest.mark.parametrize("argv", [
    ["chat", "--target", "127.0.0.1:1"],
    ["eval", "--target", "grpc://127.0.0.1:1", "--task", "arc_easy"],
    ["serve", "--model", "{ckpt}"],
    ["bench", "serve", "--target", "127.0.0.1:1"],
])
def test_every_command_refuses_an_unset_variable_naming_it(argv, tmp_path, monkeypatch, capsys):
    """Before: chat sent no token when the variable was unset (and the server answered UNAUTHENTICATED)."""
    monkeypatch.delenv(VAR, raising=False)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    argv = [a.format(ckpt=ckpt) for a in argv] + ["--auth-token-env", VAR]
    assert main(argv) == 2
    assert f"${VAR} is not set" in capsys.readouterr().err
