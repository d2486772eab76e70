"""The command line as a whole: what every command shares (secrets never echoed, help, usage errors)."""

import os

import pytest
import torch

from camkd.models import create_model

KEY_ID, SECRET_PART = "AKIAXXEXAMPLE", "XUtnFEMIK7MDENG"
# AWS secrets hold '/' and '+'; '@' and a percent-encoded '/' cannot cut the recognition short either
SECRETS = [f"{KEY_ID}:wJalr/{SECRET_PART}+bPxRfiCY@bucket",
           f"{KEY_ID}:wJ@lr/{SECRET_PART}@bucket",
           f"{KEY_ID}:wJalr%2F{SECRET_PART}@bucket",
           f"{KEY_ID}/{SECRET_PART}@bucket",
           f"{KEY_ID}@bucket"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    path = tmp_path_factory.mktemp("t") / "t.pth"
    torch.manual_seed(0)
    torch.save({"model": create_model("resnet8", num_classes=10, in_channels=3).state_dict()}, path)
    return f"resnet8={path}"


def _pieces(creds: str) -> list[str]:
    """Every part of the credentials that must not be shown: the key, the secret and its fragments."""
    user = creds.rsplit("@", 1)[0]
    return [p for p in (KEY_ID, SECRET_PART, user, *user.replace(":", "/").replace("@", "/").split("/")) if len(p) >= 4]


@pytest.mark.parametrize("creds", SECRETS)
def test_credentials_in_a_url_are_refused_and_never_echoed(creds, cli, one_error, teacher, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    url = f"s3://{creds}/stores/x.zarr"
    runs = [cli("cache-info", url),
            cli("cache-verify", url),
            cli("distill", "-m", "resnet8", "-c", url, "--epochs", "1", "--device", "cpu", "--out", tmp_path / "run"),
            cli("cache-teachers", "-t", teacher, "-d", "synthetic", "-V", "1", "--limit", "8", "--no-eval",
                "--device", "cpu", "-o", url)]
    for r in runs:
        line = one_error(r, r"the s3:// URL carries credentials.*environment")
        for piece in _pieces(creds):
            assert piece not in line, (piece, line)
    # refused before anything was made: no run folder, no store, no cache folder
    assert os.listdir(tmp_path) == []


def test_a_bucket_path_with_an_at_sign_is_not_credentials():
    from camkd.store.location import parse_location

    assert parse_location("s3://bucket/runs@2026/x.zarr").path == "bucket/runs@2026/x.zarr"
    assert parse_location("http://127.0.0.1:9000/x.zarr").path == "127.0.0.1:9000/x.zarr"


@pytest.mark.parametrize("command, usage", [("cache-info", "Usage: camkd cache-info [OPTIONS] STORE"),
                                            ("report", "Usage: camkd report [OPTIONS] RUN..."),
                                            ("evaluate", "Usage: camkd evaluate [OPTIONS] CKPT")])
def test_help_names_arguments_by_their_metavar(command, usage, cli):
    r = cli(command, "--help")
    assert r.exit_code == 0, r.output
    assert usage in r.output, r.output
    assert "<str>" not in r.output.split("Options:")[0] and "list[Path]" not in r.output, r.output


def test_missing_argument_is_one_line(cli, one_error):
    one_error(cli("cache-info"), r"missing argument 'STORE'; see 'camkd cache-info --help'")


def test_credentials_in_a_file_url_are_refused_too(cli, one_error):
    line = one_error(cli("cache-info", "file://user:s3cr3tpw@host/x.zarr"), r"the file:// URL carries credentials")
    assert "s3cr3tpw" not in line and "user" not in line


def test_a_store_url_that_cannot_connect_is_one_line(cli, one_error):
    """ftp's client connects when it is made (port 9 on the loopback: refused at once, no DNS, no network)."""
    one_error(cli("cache-info", "ftp://127.0.0.1:9/x.zarr"), r"cannot reach ftp://127.0.0.1:9/x.zarr: ")


def test_a_missing_choice_option_is_one_line_naming_the_choices(cli, one_error):
    one_error(cli("train-teacher", "-m", "resnet8"), r"missing option '--dataset' / '-d'; choose from cifar10, .*synthetic")


def test_an_empty_store_is_a_missing_store(cli, one_error):
    one_error(cli("distill", "-c", "", "-m", "resnet8", "--device", "cpu"), r"give --cache STORE")


COMMANDS = [["train-teacher"], ["cache-teachers"], ["cache-info"], ["cache-verify"], ["distill"], ["report"], ["evaluate"],
            ["models"], ["demo"], ["bench", "speed"], ["bench", "accuracy"], ["bench", "storage"]]


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_help_shows_no_python_types(command, cli):
    """Options are named by their metavar or name (--arch ARCH), choices as a|b; never typer's <str>, <int range>."""
    r = cli(*command, "--help")
    assert r.exit_code == 0, r.output
    for noise in ("<str>", "<int", "<float", "<path>", "list[", "<bool>"):
        assert noise not in r.output, (noise, r.output)
