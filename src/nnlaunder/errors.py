"""The one exception type for user mistakes; the CLI turns it into a one-line error, exit 2 (and the tool's
own warnings into one-line warnings)."""

from __future__ import annotations

import contextlib
import sys
import warnings
from collections.abc import Iterator


class UserError(Exception):
    """A mistake the user can fix (bad argument, missing file, wrong dataset for a model)."""


class Inconclusive(UserError):
    """No verdict can be given: the model's outputs on the inputs that decide it are not real
    predictions (NaN or Inf). The CLI says so and exits with code 3, never "owned"."""


def os_error_line(e: OSError) -> str:
    """An OSError as the one line a user reads: the path and the system's reason."""
    return f"{e.filename}: {e.strerror}" if e.filename and e.strerror else (str(e).splitlines() or [""])[0][:300]


@contextlib.contextmanager
def one_line_warnings(prog: str = "nnlaunder") -> Iterator[None]:
    """While active, the tool's own warnings (UserWarning) print as one line on stderr, as its errors do
    ("nnlaunder: warning: ..."); other warnings as Python shows them."""
    default = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        if issubclass(category, UserWarning):
            print(f"{prog}: warning: {message}", file=file or sys.stderr)
        else:
            default(message, category, filename, lineno, file, line)

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield
