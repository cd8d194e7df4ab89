"""The one error type geb raises for bad input; the CLI prints it as a one-line message, not a trace."""


class GebError(Exception):
    """A user-facing error: the message names the file, line or field and the problem."""
