"""Errors a user can fix: every one of them ends the command with exit code 2."""


class UserInputError(Exception):
    """Bad recipe, hostfile, flag, data or checkpoint; the message says what and how to fix it."""

    exit_code = 2


class RecipeError(UserInputError):
    pass


class DataError(UserInputError):
    pass


class CheckpointError(UserInputError):
    pass
