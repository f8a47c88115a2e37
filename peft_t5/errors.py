"""The toolkit's one user-facing error type: the CLI prints its message on one line and exits 2."""


class PeftT5Error(Exception):
    """Bad input or settings; the message names the file or setting, the record and the fix."""


class DataError(PeftT5Error):
    """A data file that cannot be read as the task expects."""
