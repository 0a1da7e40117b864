"""User-facing errors.

Anything a user can cause (a missing file, an unknown name, a plan for another model) raises
`RSparseError` with a one-line message; the CLI prints it and exits with status 2. Internal bugs
keep their tracebacks.
"""


class RSparseError(Exception):
    """A problem with the user's input, reported as one line (CLI exit status 2)."""
