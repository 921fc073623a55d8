"""Progress lines on stderr (stdout carries the table, and D's results when it is P's child)."""
import sys

__all__ = ["progress"]


def progress(msg: str) -> None:
    """One `[p2pkv bench] ...` line on stderr, flushed at once."""
    print(f"[p2pkv bench] {msg}", file=sys.stderr, flush=True)
