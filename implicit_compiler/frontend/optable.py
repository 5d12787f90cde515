"""Print the table of supported ONNX ops: ``python -m implicit_compiler.frontend.optable``.

The README's table is this output (a test keeps them equal); ``--update README.md`` rewrites
the part of a file between the markers ``<!-- ops-table -->`` and ``<!-- /ops-table -->``.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from . import supported_ops_table

BEGIN, END = "<!-- ops-table -->", "<!-- /ops-table -->"


def replace_table(text: str, table: str) -> str:
    """``text`` with the part between the markers replaced by ``table``."""
    pattern = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END), re.DOTALL)
    if not pattern.search(text):
        raise ValueError(f"no {BEGIN} ... {END} markers found")
    return pattern.sub(lambda _: f"{BEGIN}\n{table}\n{END}", text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Print the supported ONNX ops as a markdown table.")
    parser.add_argument("--update", type=Path, help="rewrite the table between the markers in this file")
    args = parser.parse_args(argv)
    table = supported_ops_table()
    if args.update:
        args.update.write_text(replace_table(args.update.read_text(), table))
    else:
        print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
