"""Errors that are the user's to fix.

Anything raised as `UserInputError` is shown by the CLI as one paragraph (no traceback) and exits with code 2.
The message must name the offending file or value and say how to fix it.
"""


class UserInputError(Exception):
    """Bad input: a dataset, a spec or a run folder the user has to correct."""
