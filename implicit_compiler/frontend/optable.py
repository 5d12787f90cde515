"""Print the table of supported ONNX ops: ``python -m implicit_compiler.frontend.optable``.

The README's table is this output (a test keeps them equal); ``--update README.md`` rewrites
the part of a file between the markers ``<!-- ops-table -->`` and ``<!-- /ops-table -->``.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from . import supported_ops_table
from .patterns import folded_patterns_table

BEGIN, END = "<!-- ops-table -->", "<!-- /ops-table -->"
# the decompositions folded before lowering (frontend/patterns/), a second table
FOLDED_BEGIN, FOLDED_END = "<!-- folded-patterns -->", "<!-- /folded-patterns -->"


def replace_table(text: str, table: str, begin: str = BEGIN, end: str = END) -> str:
    """``text`` with the part between the markers replaced by ``table``."""
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.DOTALL)
    if not pattern.search(text):
        raise ValueError(f"no {begin} ... {end} markers found")
    return pattern.sub(lambda _: f"{begin}\n{table}\n{end}", text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Print the supported ONNX ops as a markdown table.")
    parser.add_argument("--update", type=Path, help="rewrite the table between the markers in this file")
    args = parser.parse_args(argv)
    table, folded = supported_ops_table(), folded_patterns_table()
    if args.update:
        text = replace_table(args.update.read_text(), table)
        if FOLDED_BEGIN not in text:  # first time: the folded patterns go right after the op table
            text = text.replace(
                END,
                f"{END}\n\nFolded before lowering (exporters' decompositions, one op each):\n\n"
                f"{FOLDED_BEGIN}\n{FOLDED_END}",
                1,
            )
        args.update.write_text(replace_table(text, folded, FOLDED_BEGIN, FOLDED_END))
    else:
        print(f"{table}\n\n{folded}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
