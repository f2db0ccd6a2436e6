"""The one exception type for user mistakes: printed as one line, exit code 2, no traceback."""


class UserError(Exception):
    """A mistake in the user's input (config, plan, hostfile, CLI, model files).

    The message is one line that names what is wrong and how to fix it. A command that relays a
    failed job passes that job's exit status as exit_code.
    """

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


def read_text(path: str, missing: str, not_text: str) -> str:
    """A user-named text file's contents; a missing file, a directory or non-UTF-8 bytes become
    UserErrors with the caller's one-line messages."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        raise UserError(missing) from None
    except (IsADirectoryError, UnicodeDecodeError):
        raise UserError(not_text) from None
