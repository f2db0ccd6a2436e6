"""The one exception type for user mistakes: printed as one line, exit code 2, no traceback."""


class UserError(Exception):
    """A mistake in the user's input (config, plan, hostfile, CLI, model files).

    The message is one line that names what is wrong and how to fix it.
    """

    exit_code = 2
