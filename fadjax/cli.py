"""The command-line style of every fadjax entry point: absl flags, and a user's error in one line.

``train.py``, ``python -m fadjax.data`` and ``fadjax.bench`` parse the process-wide ``absl.flags.FLAGS``
(``train.py`` through ml_collections' ``config_flags``). The library entry points that tests and
``fadjax.reproduce`` also call in-process with an argument list (``sample``, ``evaluate``, ``report``,
``reproduce``) each define their flags on a :class:`Flags` of their own, so that importing several
of them defines no flag twice and each call parses afresh.

A user's error (a bad or missing flag, a folder that is not a run, a busy workdir, a bad config
value) ends the program with one line on stderr, ``PROG: error: MESSAGE``, and a non-zero exit
status: 2 for the command line itself, 1 for what it names. No traceback.
"""
from __future__ import annotations

import sys
from typing import Callable, Sequence

from absl import flags


class UserError(Exception):
    """A mistake in what the user asked for, reported in one line (exit status 1)."""


def user_errors() -> tuple[type[BaseException], ...]:
    """The exception types that are a user's mistake, not a bug: reported in one line."""
    from fadjax.config_lib import ConfigError
    from fadjax.data import DataError
    from fadjax.workdir import WorkdirError
    return (UserError, ConfigError, DataError, WorkdirError, FileNotFoundError, NotADirectoryError)


class Flags(flags.FlagValues):
    """The flags of one entry point; ``parse(argv)`` resets them to their defaults, then parses ``argv``."""

    def __init__(self, prog: str, epilog: str = ""):
        super().__init__()
        self.__dict__["prog"] = prog  # FlagValues keeps its own attributes in __dict__.
        self.__dict__["epilog"] = epilog

    def parse(self, argv: Sequence[str] | None) -> "Flags":
        """Parses ``argv`` (without the program name; None = ``sys.argv[1:]``); ``-h``/``--help`` prints the usage.

        Raises:
          SystemExit(0): after printing the usage, for ``-h`` or ``--help``.
          SystemExit(2): an unknown flag, a bad value, a missing required flag or a stray argument,
            named in one line.
        """
        argv = list(sys.argv[1:] if argv is None else argv)
        if any(a in ("-h", "--help", "--helpshort", "--helpfull") for a in argv):
            print(self.usage(), flush=True)
            raise SystemExit(0)
        self.unparse_flags()
        try:
            rest = self([self.prog, *argv])
        except flags.Error as e:
            raise usage_error(self.prog, str(e)) from None
        if len(rest) > 1:
            raise usage_error(self.prog, f"unexpected arguments {rest[1:]}")
        return self


    def usage(self) -> str:
        """``usage: PROG [flags]`` and every flag with its help and default."""
        lines = [f"usage: {self.prog} [flags]", ""]
        for flag in sorted({self[name] for name in self}, key=lambda f: f.name):  # A short name is the same flag.
            default = "" if flag.default is None else f" (default: {flag.default_as_str})"
            lines.append(f"  --{flag.name}: {flag.help}{default}")
        return "\n".join(lines + ["", self.epilog] if self.epilog else lines)


def usage_error(prog: str, message: str) -> SystemExit:
    """Prints ``PROG: error: MESSAGE`` on stderr; the returned SystemExit(2) is for the caller to raise."""
    print(f"{prog}: error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
    return SystemExit(2)


def run(main: Callable[[Sequence[str] | None], object], prog: str) -> None:
    """Runs ``main(None)`` (it parses ``sys.argv``); a user's error ends it in one line with exit status 1."""
    try:
        main(None)
    except user_errors() as e:
        print(f"{prog}: error: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
