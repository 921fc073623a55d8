"""`p2pkv bench` from parsed flags to exit code: check everything that can be checked before a cache exists,
run each backend as a local pair or under torchrun, then print and write the results."""
from __future__ import annotations

import argparse
import json
import os
from typing import Any

from p2pkv.bench import connector
from p2pkv.bench.args import backend_options, backends_of, check_device, check_output
from p2pkv.bench.busy import ask_p_over_stdio
from p2pkv.bench.cache import check_memory
from p2pkv.bench.errors import BenchError
from p2pkv.bench.ranks import RESULT_TAG, local_pair, run_d, torchrun_pair
from p2pkv.bench.report import LEGEND, format_busy_table, format_table, plot, write_json

__all__ = ["main"]


def _under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1


def _connector(args: argparse.Namespace, backends: list[str]) -> int:
    """`--connector`: one backend, CPU caches, every row's bytes verified."""
    if len(backends) != 1 or args.device != "cpu" or args.option or _under_torchrun():
        raise BenchError("--connector runs one --backend on CPU caches, without --option or torchrun")
    check_output("--json", args.json)
    rows = connector.run(args)
    print(connector.format_connector_table(rows))
    if args.json:
        write_json(args, rows, args.json)
    return 0 if all(r["verified"] for r in rows) else 1


def main(args: argparse.Namespace) -> int:
    """Run the bench; 0 when every row verified, 1 when one did not (a BenchError for a run that cannot go on)."""
    backends = backends_of(args)
    for backend in backends:
        backend_options(args, backend)
    check_device(args, backends)
    if args.connector:
        return _connector(args, backends)
    if args.role == "d":
        rows = run_d(args, backends[0], args.connect, ask_p_over_stdio if args.busy else None)
        print(RESULT_TAG + json.dumps(rows), flush=True)
        return 0
    under_torchrun = _under_torchrun()
    if int(os.environ.get("RANK", "0")) == 0:
        check_output("--json", args.json)
        check_output("--plot", args.plot)
    check_memory(args, local_pair=not under_torchrun)
    rows: list[dict[str, Any]] = []
    for backend in backends:
        got = torchrun_pair(args, backend) if under_torchrun else local_pair(args, backend)
        if got is None:
            return 0
        rows += got
    print(format_table(rows) + "\n\n" + LEGEND)
    if args.busy:
        print("\nbusy engines (same requests, same run):\n" + format_busy_table(rows))
    if args.json:
        write_json(args, rows, args.json)
    if args.plot:
        plot(rows, args.plot)
    return 0 if all(r["verified"] for r in rows) else 1
