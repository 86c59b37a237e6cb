"""`python -m bench [streaming] [pipeline] [admission]`: run the benchmarks and print their tables (Markdown)."""

from __future__ import annotations

import argparse

from bench import admission, pipeline, streaming

SUITES = {"streaming": streaming.run, "pipeline": pipeline.run, "admission": admission.run}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("suites", nargs="*", metavar="suite", help=f"one of {', '.join(SUITES)} (default: all)")
    args = parser.parse_args()
    unknown = set(args.suites) - set(SUITES)
    if unknown:
        parser.error(f"unknown suite(s): {', '.join(sorted(unknown))}")
    for name in args.suites or SUITES:
        print(f"## {name}\n")
        print(SUITES[name]())
        print()


if __name__ == "__main__":
    main()
