"""`selfhost run` options as a shell passes them."""

import typer
from typer.testing import CliRunner

from selfhost.cli.options import unescape
from selfhost.cli.run import register


def test_escapes_in_stop_strings_are_read_as_users_mean_them():
    assert unescape(r"\n\n") == "\n\n"
    assert unescape(r"a\tb\r\\n") == "a\tb\r\\n"  # an escaped backslash stays one backslash
    assert unescape(r"C:\path\x") == r"C:\path\x"  # anything else is left as typed
    assert unescape("already\nreal") == "already\nreal"


def test_run_stops_at_a_newline_typed_as_backslash_n():
    app = typer.Typer()
    register(app)
    app.command("noop")(lambda: None)  # keep `run` a sub-command, as in the real app
    result = CliRunner().invoke(app, ["run", "To be, or not", "--temperature", "0", "-n", "40", "--stop", r"\n"])
    assert result.exit_code == 0, result.output
    printed = result.stdout
    # The demo model writes verse, one line per line break: greedy, its first line ends within 40 tokens.
    assert printed.startswith("To be, or not") and len(printed) > len("To be, or not\n")
    assert printed.count("\n") == 1 and printed.endswith("\n")
