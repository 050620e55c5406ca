"""The CLI's tables keep every value whole, however narrow the output."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from rich.console import Console

from ota.cli import output
from ota.cli.main import main


def test_a_narrow_table_folds_long_names_instead_of_cutting_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = io.StringIO()
    monkeypatch.setattr(output, "console", Console(file=out, width=40))
    name = "bundles/lane-assist-for-every-model/1.0.0"
    output.table("Bundles", ["name", "state", "sha256"], [[name, "published", "3e64d92f58a53f08"]])
    text = out.getvalue()
    assert "…" not in text
    cells = "".join(
        line.split("│")[1].strip() for line in text.splitlines() if line.startswith("│")
    )
    assert cells == name


def test_a_plan_file_that_cannot_be_read_is_one_line_naming_it_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "plan.yaml"
    assert main(["rollout", "create", "--plan", str(missing), "--server", "127.0.0.1:1"]) == 1
    assert capsys.readouterr().err == f"ota: error: {missing}: No such file or directory\n"
