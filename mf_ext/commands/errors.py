"""The one exception a command raises for a user error (reported in one line, exit status 1)."""


class CliError(Exception):
    """A problem with the user's input (a file, the data, the device), not a bug."""
