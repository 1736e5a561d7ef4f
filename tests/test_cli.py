import json
import re
import subprocess
import sys

import pytest

from conftest import make_corpus
from miniplm.cli import main


def test_prepare_help_documents_every_option_with_its_default(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["prepare", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    # one block of help per option: from its flags to the next option's
    blocks = {}
    for block in re.split(r"\n(?=  --)", out):
        flags = re.findall(r"--[\w.-]+", block.splitlines()[0])
        for flag in flags:
            blocks[flag] = " ".join(block.split())
    for option, default in [("--max-len", "default: 1024]"), ("--tokenizer", "default: smollm2]"),
                            ("--on-bad-record", "default: skip]"), ("--splits", "fraction: 0.05"),
                            ("--inputs", "default: [default]]"), ("--seed", "default: 10]"),
                            ("--progress", "default: true]"), ("--max-chunks-per-document", "default: 2000]")]:
        assert default in blocks[option], (option, blocks.get(option))


def help_of(capsys, *command) -> str:
    with pytest.raises(SystemExit) as exc:
        main([*command, "--help"])
    assert exc.value.code == 0
    return capsys.readouterr().out


def test_help_shows_each_options_type_in_its_metavar(capsys):
    out = help_of(capsys, "train")
    for shown in ("--batch_size INT", "--lr FLOAT", "--progress {true,false}", "--output PATH", "--corpus PATH",
                  "--order {stored,shuffled}", "--split TEXT", "--precision {auto,fp32,bf16,fp16}"):
        assert shown in out, shown
    assert "--inputs YAML [YAML ...]" in help_of(capsys, "prepare")  # paths or {path, format, domain} mappings
    assert "--domain_quota YAML" in help_of(capsys, "select")
    from miniplm.cli import COMMANDS

    for command in COMMANDS:
        assert " VALUE" not in help_of(capsys, *command.name.split()), command.name
    # and a bad value keeps its clear one-line refusal
    assert main(["train", "--batch-size", "big"]) == 2
    assert "batch_size: expected an integer, got 'big'" in capsys.readouterr().err


def test_cli_options_yaml_and_dotted_overrides(tmp_path, capsys):
    cfg = tmp_path / "p.yaml"
    cfg.write_text("max_len: 64\nseed: 3\nsplits:\n  ref:\n    fraction: 0.1\n")
    code = main(["prepare", "-c", str(cfg), "--seed", "4", "--inputs", "a/*.jsonl", "{path: b, domain: web}",
                 "splits.ref.fraction=0.2", "--print-config"])
    assert code == 0
    out = capsys.readouterr().out
    assert "max_len: 64" in out and "seed: 4" in out and "fraction: 0.2" in out
    assert "- a/*.jsonl" in out and "domain: web" in out


def test_cli_errors_are_one_clear_line(tmp_path, capsys):
    assert main(["prepare", "max_lenn=64"]) == 2
    assert "did you mean 'max_len'" in capsys.readouterr().err
    assert main(["prepare", "--max-len", "4"]) == 2
    assert "max_len: must be at least 8" in capsys.readouterr().err
    assert main(["prepare", "--inputs", str(tmp_path / "none*.jsonl"), "--progress", "false"]) == 2
    assert "matched no readable files" in capsys.readouterr().err


def test_prepare_end_to_end_through_the_entry_point(tmp_path, tokenizer_dir):
    make_corpus(tmp_path / "corpus", n_docs=20)
    cmd = [sys.executable, "-m", "miniplm", "prepare", "--inputs", str(tmp_path / "corpus"),
           "--tokenizer", str(tokenizer_dir), "--output", str(tmp_path / "out"), "--max-len", "32"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    for column in ("domain", "documents", "skipped", "tokens", "instances", "train", "ref"):
        assert column in result.stdout
    assert "documents read 40 = packed 40 + skipped 0" in result.stdout
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["documents"]["read"] == 40
    again = subprocess.run(cmd, capture_output=True, text=True)
    assert again.returncode == 0 and "up to date" in again.stdout
