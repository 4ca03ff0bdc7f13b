"""mmjax's own errors. Every error mmjax raises on purpose derives from `MmjaxError`.

The `mmjax` command prints such an error as one line, `mmjax: error: <message>`, and exits with its
`exit_code`: 2 for usage and config problems (the default), 1 for faults met while running (storage, data,
a diverged run). Any other exception is a bug or an unexpected fault and shows its traceback.
"""

from __future__ import annotations

from collections.abc import Sequence


class MmjaxError(Exception):
    """Base of mmjax's errors; `exit_code` is what the `mmjax` command exits with."""

    exit_code = 2


class RuntimeFault(MmjaxError):
    """A fault met while running (storage, data, a diverged run): the `mmjax` command exits 1."""

    exit_code = 1


class ConfigError(MmjaxError, ValueError):
    """One or more config problems; the message lists each with its key and a fix."""

    def __init__(self, problems: Sequence[str]):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid config ({len(self.problems)} problem(s)):\n{lines}")


class NotAWorkdirError(MmjaxError, FileNotFoundError):
    """A folder given as a workdir has no config.json."""
