"""The one exception type the CLI turns into a single clear line and exit code 1."""


class BitnetError(Exception):
    """A problem the user can fix: bad input, a missing file, an unavailable device."""


class Reported(BitnetError):
    """An error another process (rank 0 of a distributed job) has already reported: this one
    stops with exit code 1 and says nothing more."""
