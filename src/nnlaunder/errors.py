"""The one exception type for user mistakes; the CLI turns it into a one-line error, exit 2."""


class UserError(Exception):
    """A mistake the user can fix (bad argument, missing file, wrong dataset for a model)."""
