"""Writes the recorded CPU profile's table into README.md, between its ``profile-table`` markers.

The table is fastml's own report of bench/results/cpu-amd-epyc-2c-profile.json (what
``python -m fastml bench`` wrote), so the README's numbers come from the command, never typed;
tests/test_readme.py checks that they still match. After a new profile:

    python -m fastml bench --out /tmp/profile
    cp /tmp/profile/fastml-bench.json bench/results/cpu-amd-epyc-2c-profile.json
    cp /tmp/profile/fastml-bench.png bench/results/cpu-amd-epyc-2c-profile.png
    python bench/update_readme.py
"""

from __future__ import annotations

import re
from pathlib import Path

from fastml import _bench

ROOT = Path(__file__).resolve().parents[1]
PROFILE = ROOT / "bench" / "results" / "cpu-amd-epyc-2c-profile.json"
BEGIN, END = "<!-- profile-table: begin (bench/update_readme.py) -->", "<!-- profile-table: end -->"


def table_block(profile: Path = PROFILE) -> str:
    """The README's block: the markers around a text code block of the profile's table."""
    return f"{BEGIN}\n```text\n{_bench.format_report(_bench.load_report(profile))}\n```\n{END}"


def main() -> None:
    readme = ROOT / "README.md"
    text = readme.read_text()
    pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), flags=re.S)
    if not pattern.search(text):
        raise SystemExit(f"README.md has no {BEGIN} ... {END} markers")
    readme.write_text(pattern.sub(lambda _: table_block(), text))
    print(f"README.md: table from {PROFILE.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
