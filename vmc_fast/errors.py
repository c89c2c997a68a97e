"""The one exception type that reaches the user as a single clear line."""


class VmcError(Exception):
    """A user mistake or an unusable input: the message names the problem and the fix.

    The CLI prints it as one line and exits with status 2; library callers can catch it.
    """


class VmcWarning(UserWarning):
    """Something the user should know about an input or option (printed as one line by the CLI)."""
