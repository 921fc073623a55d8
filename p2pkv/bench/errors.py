"""The bench's one error type: a mistake or failure the CLI prints as one `p2pkv bench: error: ...` line."""

__all__ = ["BenchError"]


class BenchError(Exception):
    """A bench run that cannot start or did not finish, with a message that says why and what to change."""
