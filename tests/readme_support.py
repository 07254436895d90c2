"""Reading README.md's sections, code blocks and tables, for the tests that keep it true."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def section(title_prefix: str) -> str:
    """The text of the first '## ' section whose title starts with ``title_prefix``."""
    text = README.read_text()
    match = re.search(rf"^## {re.escape(title_prefix)}.*?$(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"README.md has no section starting with '## {title_prefix}'"
    return match.group(1)


def code_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", text, re.M | re.S)


def table_rows(text: str) -> list[list[str]]:
    """Rows of the markdown tables in ``text`` (header and rule rows dropped); '\\|' stays inside a cell."""
    rows = []
    for line in text.splitlines():
        if not line.startswith("|") or set(line) <= {"|", "-", " "}:
            continue
        cells = [cell.strip().replace("\\|", "|") for cell in re.split(r"(?<!\\)\|", line)[1:-1]]
        if cells and cells[0] != "flag":
            rows.append(cells)
    return rows
