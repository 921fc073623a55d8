"""The `p2pkv` command: `p2pkv bench` (the P→D microbenchmark, torchrun-ready)
and `p2pkv doctor` (which backends, devices and versions this machine has)."""
from __future__ import annotations

import argparse
import logging
import sys

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    from p2pkv import __version__, bench
    p = argparse.ArgumentParser(prog="p2pkv", description="Point-to-point KV cache transfer for prefill/decode disaggregation.")
    p.add_argument("--version", action="version", version=f"p2pkv {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench", help="move random KV blocks P→D, verify every byte, compare with the raw link",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    bench.add_arguments(b)
    d = sub.add_parser("doctor", help="report backends, devices and versions")
    d.add_argument("--json", action="store_true", help="print JSON instead of text")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.command == "bench":
        from p2pkv import bench
        from p2pkv.transport import TransferError
        try:
            return bench.main(args)
        except (bench.BenchError, ValueError, TransferError, OSError, ImportError) as e:
            if args.verbose:
                raise
            print(f"p2pkv bench: error: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("p2pkv bench: interrupted", file=sys.stderr)
            return 130
    from p2pkv import doctor
    return doctor.main(as_json=args.json)


if __name__ == "__main__":
    sys.exit(main())
