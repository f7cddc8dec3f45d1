"""Data: the samples of global batch k depend on seed and k only; every source loads; bad
data is refused before launch."""

import json

import numpy as np
import pytest
import torch

from conftest import sdtrain
from sdtrain.batch import derive_batch
from sdtrain.errors import DataError
from sdtrain.recipe import DataConfig
from sdtrain.train.data import TRAIN, Batches
from sdtrain.train.sources import check_source, load_corpus


def samples_seen(tokens, world_size, step, global_batch=8, micro=None):
    plan = derive_batch(global_batch, micro, None, world_size)
    batches = Batches(tokens, 16, seed=7, plan=plan, split=TRAIN)
    rows = []
    for rank in range(world_size):
        for inputs, targets in batches.micro_batches(step, rank, torch.device("cpu")):
            assert torch.equal(inputs[:, 1:], targets[:, :-1])  # targets are inputs shifted by one
            rows.extend(inputs.tolist())
    return rows


def test_global_batch_does_not_depend_on_world_size():
    tokens = np.random.default_rng(0).integers(0, 256, 10_000).astype(np.uint8)
    for step in (0, 1, 17):
        reference = samples_seen(tokens, 1, step)
        assert len(reference) == 8
        for world_size, micro in ((2, 1), (2, 2), (4, 1), (4, 2), (8, 1)):
            assert samples_seen(tokens, world_size, step, micro=micro) == reference
    assert samples_seen(tokens, 1, 0) != samples_seen(tokens, 1, 1)


def test_seed_changes_the_order():
    tokens = np.arange(10_000) % 256
    plan = derive_batch(8, 8, None, 1)
    a = Batches(tokens, 16, seed=1, plan=plan, split=TRAIN).global_starts(0)
    b = Batches(tokens, 16, seed=2, plan=plan, split=TRAIN).global_starts(0)
    assert not np.array_equal(a, b)


def test_embedded_corpus_is_real_text_with_validation_split():
    corpus = load_corpus(DataConfig(max_bytes=100_000), seq_len=32)
    assert corpus.train.dtype == np.uint8
    assert len(corpus.train) + len(corpus.val) > 90_000
    assert b"def " in corpus.train.tobytes() and b"import" in corpus.train.tobytes()
    assert abs(len(corpus.val) / (len(corpus.train) + len(corpus.val)) - 0.05) < 0.01


def test_text_folder_jsonl_and_bin_sources(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("hello world " * 50)
    (tmp_path / "docs" / "b.txt").write_text("goodbye world " * 50)
    folder = load_corpus(DataConfig(source=str(tmp_path / "docs")), seq_len=16)
    assert bytes(folder.train[:11]) == b"hello world"

    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": f"document {i} " * 20}) for i in range(20)))
    corpus = load_corpus(DataConfig(source=str(jsonl)), seq_len=16)
    assert bytes(corpus.train[:10]) == b"document 0"

    tokens = (np.arange(5000) % 1000).astype(np.uint16)
    tokens.tofile(tmp_path / "tokens.bin")
    corpus = load_corpus(DataConfig(source=str(tmp_path / "tokens.bin")), seq_len=16)
    assert corpus.train[:3].tolist() == [0, 1, 2] and len(corpus.train) + len(corpus.val) == 5000
    assert check_source(DataConfig(source=str(tmp_path / "tokens.bin")), 16, 1000).endswith("(bin)")
    with pytest.raises(DataError, match="token ids up to 999 but model.vocab_size is 256"):
        check_source(DataConfig(source=str(tmp_path / "tokens.bin")), 16, 256)

    nanogpt = tmp_path / "nanogpt"
    nanogpt.mkdir()
    tokens.tofile(nanogpt / "train.bin")
    tokens[:500].tofile(nanogpt / "val.bin")
    corpus = load_corpus(DataConfig(source=str(nanogpt)), seq_len=16)
    assert len(corpus.train) == 5000 and len(corpus.val) == 500


def test_tokenizer_json(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog\n" * 200)
    tok.train([str(text)], trainers.BpeTrainer(vocab_size=60, special_tokens=["[UNK]"]))
    tok.save(str(tmp_path / "tokenizer.json"))
    cfg = DataConfig(source=str(text), tokenizer=str(tmp_path / "tokenizer.json"))
    corpus = load_corpus(cfg, seq_len=8)
    assert corpus.train.dtype == np.int32 and corpus.train.max() < tok.get_vocab_size()
    with pytest.raises(DataError, match="set model.vocab_size to at least"):
        check_source(cfg, 8, vocab_size=10)


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda p: str(p / "nothing-here"), "does not exist"),
        (lambda p: (p / "empty").mkdir() or str(p / "empty"), "empty folder"),
        (lambda p: (p / "short.txt").write_text("tiny") and str(p / "short.txt"), "4 tokens is too little for seq_len 32"),
        (lambda p: (p / "bad.jsonl").write_text('{"text": "ok"}\n{"txt": "no"}\n') and str(p / "bad.jsonl"), "bad.jsonl:2: each line needs a \"text\" string field"),
        (lambda p: (p / "broken.jsonl").write_text('{"text": "ok"}\n{nope\n') and str(p / "broken.jsonl"), "broken.jsonl:2: not valid JSON"),
        (lambda p: (p / "odd.bin").write_bytes(b"abc") and str(p / "odd.bin"), "odd size"),
        (lambda p: (p / "e.bin").write_bytes(b"") or str(p / "e.bin"), "is empty"),
    ],
)
def test_bad_data_is_refused(tmp_path, make, expected):
    source = make(tmp_path)
    with pytest.raises(DataError, match=expected):
        check_source(DataConfig(source=source), 32, 256)


def test_missing_data_exits_2_before_launch(write_recipe, tmp_path):
    recipe = write_recipe({"data": {"source": str(tmp_path / "nope.txt")}})
    result = sdtrain("launch", recipe, "--run-dir", tmp_path / "run")
    assert result.returncode == 2
    assert "data.source" in result.stderr and "does not exist" in result.stderr
    assert not (tmp_path / "run").exists()
