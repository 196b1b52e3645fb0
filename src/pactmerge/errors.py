"""One exception type for every user-facing failure: the CLI prints its message on one line."""


class PactMergeError(Exception):
    """Bad input or configuration. The message names the file and/or parameter at fault."""
