"""Files a user hands us (recipes, hostfiles, DeepSpeed configs, a run's metrics), read and
parsed within bounds.

Whatever the path names, reading it costs at most `max_bytes` and never blocks: a FIFO, a
device or a directory is refused before a byte is read (opened non-blocking, then fstat).
Parsing refuses what would end in a traceback rather than a message: nesting past
MAX_DEPTH (the parsers recurse; a RecursionError is no answer) and integers past
MAX_INT_DIGITS (Python refuses to convert more than 4,300 digits, and no setting needs more
than a few dozen). Every refusal is one line naming the file and, where known, the line.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path

import yaml

from sdtrain.errors import UserInputError, decode_utf8, printable

MAX_DEPTH = 32  # a recipe nests 4 levels, a ds_config 3; 32 is no config
MAX_INT_DIGITS = 32  # 2**64 has 20 digits; a count, size or seed never needs more
MAX_YAML_VALUES = 100_000  # values once aliases are written out: refuses "billion laughs"


def read_text(path: str | Path, what: str, max_bytes: int, form: str = "text",
              error: type[UserInputError] = UserInputError) -> str:
    """The UTF-8 text of the regular file at `path`, refused past `max_bytes`.

    `what` names the file in messages ("recipe", "hostfile"); `form` says what it should hold
    ("YAML"), for the size message.
    """
    shown = printable(path)
    fd = open_regular(path, what, error)
    try:
        info = os.fstat(fd)
        if info.st_size > max_bytes:
            raise error(f"{what} {shown} is {info.st_size:,} bytes; a {what} is {form} of at most {max_bytes:,}")
        data = _read_at_most(fd, max_bytes + 1)  # + 1: a file that grew since fstat is still caught
    except OSError as exc:
        raise error(f"cannot read {what} {shown}: {exc.strerror}") from None
    finally:
        os.close(fd)
    if len(data) > max_bytes:
        raise error(f"{what} {shown} is over {max_bytes:,} bytes; a {what} is {form} of at most {max_bytes:,}")
    return decode_utf8(data, f"{what} {shown}", error)


def open_regular(path: str | Path, what: str, error: type[UserInputError] = UserInputError,
                 fix: str = "pass the file itself") -> int:
    """A read-only descriptor of the regular file at `path` (the caller closes it); a FIFO, a
    device, a socket or a directory is refused in one line, without blocking, ending in `fix`."""
    shown = printable(path)
    try:
        # O_NONBLOCK: opening a FIFO with no writer returns at once instead of waiting forever;
        # it changes nothing for a regular file.
        fd = os.open(Path(path), os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise error(f"cannot read {what} {shown}: {exc.strerror}") from None
    mode = os.fstat(fd).st_mode  # fstat of an open descriptor does not fail
    if stat.S_ISREG(mode):
        return fd
    os.close(fd)
    if stat.S_ISDIR(mode):  # worded as reading one says it (Is a directory)
        raise error(f"cannot read {what} {shown}: {os.strerror(errno.EISDIR)}")
    raise error(f"{what} {shown} is {_kind(mode)}, not a regular file; {fix}")


def read_lines(path: str | Path, what: str, max_bytes: int, max_line: int, fix: str,
               error: type[UserInputError] = UserInputError):
    """The lines of the regular file at `path`, one at a time, as text (newline dropped,
    undecodable bytes replaced): a FIFO or a device is refused as open_regular does, a file
    past `max_bytes` before a byte is read (both ending in `fix`), and a line longer than
    `max_line` comes as None, read through in pieces, never held whole."""
    shown = printable(path)
    with os.fdopen(open_regular(path, what, error, fix), "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size > max_bytes:
            raise error(f"{what} {shown} is {size:,} bytes, past the {max_bytes:,} it may have; {fix}")
        left = max_bytes + 1  # a file that grows while it is read stops here too
        while left > 0:
            raw = f.readline(min(max_line + 1, left))
            if not raw:
                return
            left -= len(raw)
            if len(raw) <= max_line or raw.endswith(b"\n"):
                yield raw.rstrip(b"\r\n").decode("utf-8", "replace")
                continue
            while raw and not raw.endswith(b"\n") and left > 0:  # the rest of the long line
                raw = f.readline(min(1 << 20, left))
                left -= len(raw)
            yield None


def _read_at_most(fd: int, limit: int) -> bytes:
    chunks, size = [], 0
    while size < limit:
        chunk = os.read(fd, min(limit - size, 1 << 20))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def _kind(mode: int) -> str:
    kinds = [(stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
             (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")]
    return next((name for test, name in kinds if test(mode)), "not a plain file")


class Refused(yaml.YAMLError):
    """A value past a bound, raised from inside the YAML parser; `line` is 1-based."""

    def __init__(self, message: str, line: int):
        super().__init__(message)
        self.message, self.line = message, line


class BoundedLoader(yaml.SafeLoader):
    """Safe YAML (data only, never objects) whose integers stay within MAX_INT_DIGITS."""

    def construct_yaml_int(self, node):
        digits = sum(ch.isalnum() for ch in node.value)  # 0x.., 1_000 and 1:30 (base 60) alike
        if digits > MAX_INT_DIGITS:
            raise Refused(f"an integer of {digits:,} digits is past the limit of {MAX_INT_DIGITS}",
                          node.start_mark.line + 1)
        return super().construct_yaml_int(node)


BoundedLoader.add_constructor("tag:yaml.org,2002:int", BoundedLoader.construct_yaml_int)


def parse_yaml(text: str, source: str, loader: type[BoundedLoader] = BoundedLoader,
               max_values: int = MAX_YAML_VALUES, error: type[UserInputError] = UserInputError):
    """YAML text -> data, refusing deep nesting, long integers and aliases that expand past
    `max_values` values."""
    try:
        _check_yaml_depth(text, loader)
        value = yaml.load(text, Loader=loader)  # noqa: S506 - a SafeLoader subclass
    except Refused as exc:
        raise error(f"{source} line {exc.line}: {exc.message}") from None
    except yaml.YAMLError as exc:
        raise error(f"{source} is not valid YAML: {exc}") from None
    check_shape(value, source, max_values, error)
    return value


def _check_yaml_depth(text: str, loader) -> None:
    # The event parser keeps its own stack; the composer that builds nodes from the events
    # recurses once per level, so the depth is checked on the events, before composing.
    depth = 0
    for event in yaml.parse(text, Loader=loader):
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_DEPTH:
                raise Refused(f"nested deeper than {MAX_DEPTH} levels", event.start_mark.line + 1)
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1


def parse_json(text: str, source: str, error: type[UserInputError] = UserInputError, **json_options):
    """JSON text -> data, refusing deep nesting and long integers; JSONDecodeError passes
    through (callers word it: a whole file or one line of a .jsonl)."""
    try:
        value = json.loads(text, parse_int=_bounded_int(source, error), **json_options)
    except RecursionError:
        raise error(f"{source}: nested deeper than {MAX_DEPTH} levels") from None
    check_shape(value, source, None, error)
    return value


def _bounded_int(source: str, error):
    def parse(digits: str) -> int:
        if len(digits.lstrip("-")) > MAX_INT_DIGITS:
            raise error(f"{source}: an integer of {len(digits.lstrip('-')):,} digits is past the limit of {MAX_INT_DIGITS}")
        return int(digits)
    return parse


def check_shape(value, source: str, max_values: int | None = None, error: type[UserInputError] = UserInputError) -> None:
    """Refuse nesting past MAX_DEPTH and, with `max_values`, more values than that once every
    YAML alias is written out (a self-referencing alias counts without end)."""
    count, stack = 0, [(value, 0)]
    while stack:
        item, depth = stack.pop()
        count += 1
        if max_values is not None and count > max_values:
            raise error(f"{source} expands to more than {max_values:,} values (YAML aliases nested into each other?); "
                        "write the values out")
        if depth > MAX_DEPTH:
            raise error(f"{source}: nested deeper than {MAX_DEPTH} levels")
        if isinstance(item, dict):
            stack.extend((child, depth + 1) for pair in item.items() for child in pair)
        elif isinstance(item, (list, tuple)):
            stack.extend((child, depth + 1) for child in item)
