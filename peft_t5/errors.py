"""The toolkit's one user-facing error type: the CLI prints its message on one line and exits 2."""


class PeftT5Error(Exception):
    """Bad input or settings; the message names the file or setting, the record and the fix."""


class DataError(PeftT5Error):
    """A data file that cannot be read as the task expects."""


class Interrupted(PeftT5Error):
    """Ctrl-C: the CLI prints what was kept and how to continue, and exits 130 as a shell expects."""


class NotFoundError(PeftT5Error):
    """What was named does not exist (no such folder, no adapter in it): a server answers 404."""


class ConflictError(PeftT5Error):
    """The request clashes with what is already there (a name in use): a server answers 409."""
