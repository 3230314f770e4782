"""The one exception type users can cause, and its exit code."""


class ClipvizError(Exception):
    """A problem the user can fix; the message says what to do.

    `exit_code` is 2 for usage or configuration errors, 1 for failed inputs.
    """

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code
