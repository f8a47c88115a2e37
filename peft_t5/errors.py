"""The toolkit's errors: a PeftT5Error is bad input or settings, in one line (the CLI prints it and exits 2); an
Interrupted is Ctrl-C after what was finished was kept."""
from __future__ import annotations


class PeftT5Error(Exception):
    """Bad input or settings; the message names the file or setting, the record and the fix."""


class DataError(PeftT5Error):
    """A data file that cannot be read as the task expects."""


class NotFoundError(PeftT5Error):
    """What was named does not exist (no such folder, no adapter in it): a server answers 404."""


class ConflictError(PeftT5Error):
    """The request clashes with what is already there (a name in use): a server answers 409."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, raised once what was finished is kept: the message says what that is. `resumable`: the same run
    continues from it with resume=True (--resume); the CLI prints its own command line to do so."""

    def __init__(self, kept: str, resumable: bool = False):
        super().__init__(f"{kept}; continue with resume=True" if resumable else kept)
        self.kept, self.resumable = kept, resumable
