"""The command line's help (issue 16 item 8): every option has a sentence and its default; --version."""

import argparse

import pytest

from scm_distill import __version__
from scm_distill.cli import HelpFormatter, build_parser, main


def test_every_option_has_a_sentence_and_its_default():
    parser = build_parser()
    formatter = HelpFormatter("scm-distill")
    for name, command in parser._subparsers._group_actions[0].choices.items():
        assert command.formatter_class is HelpFormatter, name
        for action in command._actions:
            if not action.option_strings or isinstance(action, argparse._HelpAction):
                continue
            assert action.help and len(action.help.split()) >= 2, (name, action.option_strings)
            shown = formatter._get_help_string(action)
            assert action.required or "default" in shown, (name, action.option_strings, shown)
    distill = parser._subparsers._group_actions[0].choices["distill"]
    assert "(default: 16)" in parser._subparsers._group_actions[0].choices["sample"].format_help()
    assert "(default: off)" in " ".join(distill.format_help().split())


def test_version(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"scm-distill {__version__}"
