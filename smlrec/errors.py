"""Errors the user can act on. Each names the file or object and the problem."""


class SmlrecError(Exception):
    """Base class for errors reported to the user as one clear message (no traceback)."""


class DataError(SmlrecError, ValueError):
    """Input data is unusable: missing columns, unparseable values, empty files..."""

    def __init__(self, source: object, problem: str):
        self.source = str(source)
        self.problem = problem
        super().__init__(f"{self.source}: {problem}")


class IntegrityError(SmlrecError):
    """A stored file does not match its recorded checksum, or a manifest is inconsistent."""


class StorageError(SmlrecError):
    """A store could not be written (disk full, read-only, no permission); nothing changed."""
