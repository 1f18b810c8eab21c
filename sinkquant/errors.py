"""One exception type for every user-facing failure, so the CLI can print a single clear line."""


class SinkquantError(Exception):
    """Bad input or an unsupported request; the message names what was wrong and what would be valid."""
