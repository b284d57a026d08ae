"""The command line: help, config errors, ``data check``."""

from __future__ import annotations

import json

from helpers import run_cli

from saferlhf.cli import main


def test_stage_help_lists_every_key_with_default(capsys):
    try:
        main(["rm", "--help"])
    except SystemExit as e:
        assert e.code == 0
    out = capsys.readouterr().out
    assert "optim.lr = 2e-05" in out and "deepspeed.zero_stage = 0" in out and "run.out_dir" in out


def test_unknown_key_is_an_error_naming_it(capsys, tmp_path):
    assert main(["sft", f"run.out_dir={tmp_path}", "optim.lrr=1"]) == 2
    assert "unknown config key 'optim.lrr'" in capsys.readouterr().err


def test_unknown_command(capsys):
    assert main(["frobnicate"]) == 2


def test_data_check_reports_counts_and_every_error(tmp_path):
    good = {"prompt": "p", "response_0": "a", "response_1": "b", "is_response_0_safe": True,
            "is_response_1_safe": False, "better_response_id": 0, "safer_response_id": 0}
    rows = [good, {**good, "better_response_id": 2}, {**good, "response_1": "a"},
            {k: v for k, v in good.items() if k != "prompt"}]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    result = run_cli(["data", "check", str(path), "--kind", "preference", "--json"])
    assert result.returncode == 1
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["n_valid"] == 1 and report["n_skipped"] == 1
    assert any("row 1" in e and "better_response_id" in e for e in report["errors"])
    assert any("row 3" in e and "prompt" in e for e in report["errors"])
    path.write_text(json.dumps(good) + "\n")
    assert run_cli(["data", "check", str(path), "--kind", "preference"]).returncode == 0
