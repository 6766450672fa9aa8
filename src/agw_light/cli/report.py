"""Collect a sweep into the results table: `python -m agw_light.report <multirun dir> [--out DIR]`.

Writes results.md, results.csv and the plots described in `agw_light.reporting`. Exit status: 0 when every
run finished, 1 when some did not (the others are still reported), 2 when none did or the folder holds no
run (nothing is written then).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from agw_light.reporting import NoFinishedRunsError, write_report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m agw_light.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("multirun_dir", type=Path, help="folder of a sweep (`python -m agw_light.train -m ...`)")
    parser.add_argument("--out", type=Path, default=None, help="where to write the report (default: multirun_dir)")
    arguments = parser.parse_args(argv)
    try:
        summary = write_report(arguments.multirun_dir, arguments.out, warn=lambda text: print(text, file=sys.stderr))
    except (FileNotFoundError, NoFinishedRunsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for failure in summary.failures:
        print(failure.describe(), file=sys.stderr)
    comparison = summary.comparison_text()
    if comparison:
        print(comparison)
    for path in summary.written:
        print(f"wrote {path}")
    return 1 if summary.failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
