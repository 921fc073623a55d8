"""`p2pkv bench`: a P rank and a D rank build the same paged KV cache, D reads random non-contiguous P blocks
into other random D blocks, every byte is verified, and each row stands next to a same-run baseline of the raw
link. Without torchrun P runs here and D as a child process; under torchrun rank 0 is P and rank 1 is D.

Modules by job: args (flags and their checks), cache (size, contents, verification), requests (the idle
measurement and its row), busy (--busy), ranks (P's and D's sides and how they meet), report (table, JSON,
plot), command (the whole run)."""
from p2pkv.bench.args import add_arguments
from p2pkv.bench.busy import PBusyLoad
from p2pkv.bench.command import main
from p2pkv.bench.errors import BenchError
from p2pkv.bench.report import format_busy_table, format_table

__all__ = ["add_arguments", "main", "format_table", "format_busy_table", "PBusyLoad", "BenchError"]
