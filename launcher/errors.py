"""The one exception type for user mistakes: printed as one line, exit code 2, no traceback."""


class UserError(Exception):
    """A mistake in the user's input (config, plan, hostfile, CLI, model files).

    The message is one line that names what is wrong and how to fix it. A command that relays a
    failed job passes that job's exit status as exit_code.
    """

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code
