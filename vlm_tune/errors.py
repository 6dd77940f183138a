"""User-facing errors: the CLI prints these without a traceback and exits with code 2."""


class UserError(Exception):
    """A mistake the user can fix (bad config, bad data, missing file). The message says what to do."""
