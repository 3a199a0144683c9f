"""The one exception type the CLI turns into a single clear line and exit code 1."""


class BitnetError(Exception):
    """A problem the user can fix: bad input, a missing file, an unavailable device."""


class Reported(BitnetError):
    """An error another process (rank 0 of a distributed job) has already reported: this one
    stops with exit code 1 and says nothing more."""


def first_line(error: BaseException, limit: int = 200) -> str:
    """An exception's message in one line, for the one-line errors and notices: its first
    non-blank line, cut to `limit` characters, or the exception's type where it says nothing."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0][:limit] if lines else type(error).__name__


def typed_first_line(error: BaseException, limit: int = 200) -> str:
    """`first_line` after the exception's type, as in "OSError: disk full" (the type alone
    where the message says nothing)."""
    line, name = first_line(error, limit), type(error).__name__
    return name if line == name else f"{name}: {line}"
