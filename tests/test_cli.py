"""The command table: every command imports, and its --help shows every parameter's text."""

import inspect

import pytest

from vlmtune import cli


@pytest.mark.parametrize("name", list(cli.COMMANDS))
def test_every_command_has_help(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(name.split() + ["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    fn = cli._load(cli.COMMANDS[name][0])
    docs = cli._arg_docs(fn)
    for param in inspect.signature(fn).parameters:
        assert param in docs, f"{name}: parameter {param!r} has no Args: entry in the docstring"
        assert docs[param].split()[0] in text


def test_top_level_help_lists_every_command(capsys):
    assert cli.main(["--help"]) == 0
    text = capsys.readouterr().out
    for name in cli.COMMANDS:
        assert name in text


def test_unknown_command_is_a_usage_error(capsys):
    assert cli.main(["trian"]) == 2
    assert "unknown command" in capsys.readouterr().err


def test_user_errors_print_one_line_without_traceback(tmp_path, capsys):
    assert cli.main(["train", str(tmp_path / "missing.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "missing.yaml" in err and "Traceback" not in err
