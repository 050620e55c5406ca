"""The CLI's tables keep every value whole, however narrow the output."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from rich.console import Console

from ota.cli import output
from ota.cli.main import main


def test_a_narrow_table_keeps_every_value_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    out = io.StringIO()
    monkeypatch.setattr(output, "console", Console(file=out, width=60))
    name = "bundles/lane-assist/1.0.0"
    sha = "3e64d92f58a53f0883b5e887a627b1420fab8d681be5700f424e8a53382160e3"
    output.table("Bundles", ["name", "state", "sha256"], [[name, "published", sha]])
    text = out.getvalue()
    assert "…" not in text
    rows = [line.split("│")[1:-1] for line in text.splitlines() if line.startswith("│")]
    assert rows[0][0].strip() == name  # the identifier on one line, as main's rule has it
    assert "".join(cells[2].strip() for cells in rows) == sha  # the others fold, not cut


def test_a_plan_file_that_cannot_be_read_is_one_line_naming_it_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "plan.yaml"
    assert main(["rollout", "create", "--plan", str(missing), "--server", "127.0.0.1:1"]) == 1
    assert capsys.readouterr().err == f"ota: error: {missing}: No such file or directory\n"
