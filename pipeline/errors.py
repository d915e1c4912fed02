"""Errors a user can fix. The CLI turns them into exit code 2 with the message on stderr."""


class UsageError(Exception):
    """Bad input or settings: the message says what is wrong and what to do."""
