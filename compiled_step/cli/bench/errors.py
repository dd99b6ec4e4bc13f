"""The bench's one error type, apart so that every bench module can raise it without importing another."""


class BenchError(Exception):
    """A bad option or an unavailable method: reported as one line, exit status 2."""
