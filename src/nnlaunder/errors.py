"""The one exception type for user mistakes; the CLI turns it into a one-line error, exit 2."""


class UserError(Exception):
    """A mistake the user can fix (bad argument, missing file, wrong dataset for a model)."""


class Inconclusive(UserError):
    """No verdict can be given: the model's outputs on the inputs that decide it are not real
    predictions (NaN or Inf). The CLI says so and exits with code 3, never "owned"."""


def os_error_line(e: OSError) -> str:
    """An OSError as the one line a user reads: the path and the system's reason."""
    return f"{e.filename}: {e.strerror}" if e.filename and e.strerror else (str(e).splitlines() or [""])[0][:300]
