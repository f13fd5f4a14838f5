"""The one error type that ``main.py`` turns into ``error: <message>`` and exit status 1."""


class UserError(Exception):
    """Bad input from the user (a file, a flag, a config): the message says what and how to fix it."""
