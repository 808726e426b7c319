"""One argparse formatter for every `pyrag` command: each option's help ends with its default, so `--help` shows
what a run does without flags (argparse's ArgumentDefaultsHelpFormatter skips options that have no help text)."""

from __future__ import annotations

import argparse


class DefaultsFormatter(argparse.HelpFormatter):
    def _format_action(self, action):
        if action.option_strings and _shows_default(action) and "%(default)" not in (action.help or ""):
            text = (action.help or "").strip()
            action.help = (text + " " if text else "") + "(default: %(default)s)"
        return super()._format_action(action)


def _shows_default(action) -> bool:
    d = action.default  # identity, not ==: a default of 0 is worth showing, unlike None / False (a flag)
    return d is not None and d is not False and d is not argparse.SUPPRESS and action.nargs != 0
