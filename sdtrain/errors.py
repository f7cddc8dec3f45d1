"""Errors a user can fix: every one of them ends the command with exit code 2."""

EXCERPT_CHARS = 80  # a message quotes the input, never a megabyte of it


class UserInputError(Exception):
    """Bad recipe, hostfile, flag, data or checkpoint; the message says what and how to fix it."""

    exit_code = 2


class RecipeError(UserInputError):
    pass


class DataError(UserInputError):
    pass


class CheckpointError(UserInputError):
    pass


def excerpt(value, limit: int = EXCERPT_CHARS) -> str:
    """repr() of user input, cut to `limit` characters so an error message stays readable."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def decode_utf8(data: bytes, source: str, error: type[UserInputError] = UserInputError) -> str:
    """Text of a file that must be UTF-8; `error` names the file, line and byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise error(
            f"{source} line {line} is not UTF-8 text (byte 0x{data[exc.start]:02x}); save the file as UTF-8"
        ) from None


def printable(value) -> str:
    """str(value) with control and other invisible characters written as escapes (`\\x1b`, as
    repr writes them): user input echoed in a message cannot recolour the terminal, move the
    cursor or fake a line of output."""
    return "".join(ch if ch.isprintable() or ch == " " else repr(ch)[1:-1] for ch in str(value))
