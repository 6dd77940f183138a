"""User-facing errors: the CLI prints these without a traceback and exits with code 2."""


class UserError(Exception):
    """A mistake the user can fix (bad config, bad data, missing file). The message says what to do."""


class BadRow(UserError):
    """A row that cannot be used; names the row, the column and the reason."""

    def __init__(self, reason: str, row_id: str, column: str | None, detail: str) -> None:
        self.reason, self.row_id, self.column, self.detail = reason, row_id, column, detail
        where = f"row {row_id}" + (f", column {column!r}" if column else "")
        super().__init__(
            f"{where}: {detail} (reason: {reason}). Fix the row, or set data.on_bad_row=skip to skip and count such rows."
        )
