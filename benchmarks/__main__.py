"""Run every benchmark: ``python -m benchmarks [--quick]``."""

from __future__ import annotations

import argparse

from benchmarks import daemon_cost, rolling


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes, 10 s daemon run")
    args = parser.parse_args()
    if args.quick:
        rolling.run(100, 500)
        daemon_cost.run(10, 1.0)
    else:
        rolling.run(1000, 2000)
        daemon_cost.run(60, 1.0)


if __name__ == "__main__":
    main()
