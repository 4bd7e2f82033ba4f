"""Shard building, inspection and the tokenizer, checked against independent readers: webdataset
and tarfile for the shards, the `rwkv` package's pure-Python trie tokenizer for the token ids."""

from __future__ import annotations

import argparse
import json
import logging
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from rwkvx_data.build import build_shards, default_corpus_paths, find_input_files
from rwkvx_data.cli import add_data_subcommands
from rwkvx_data.format import MANIFEST_NAME, ShardSetError, decode_tokens, read_manifest, sha256_file
from rwkvx_data.inspect_shards import format_summary, inspect_shard_set, verify_shards
from rwkvx_lightning.tokenizer import Tokenizer

TEXT_FILES = {
    "a.txt": "The quick brown fox jumps over the lazy dog. " * 3,
    "b.md": "# Title\n\nSome *markdown* with ünïcödé, 中文 and emoji 🚀.\n",
    "nested/c.py": "def square(x):\n    return x * x\n\nprint(square(12))\n",
    "nested/deeper/d.rst": "Heading\n=======\n\nA paragraph of reStructuredText.\n",
    "empty.txt": "",
    "blank.txt": "  \n\t\n",
    "ignored.bin": "not matched by the default patterns",
}
JSONL_DOCS = [f"JSONL document number {i}: " + "lorem ipsum " * (i % 4 + 1) for i in range(12)]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer()


@pytest.fixture
def corpus(tmp_path) -> tuple[list[str], list[str]]:
    """(inputs, expected documents in build order): a directory walked in sorted order, then JSONL."""
    root = tmp_path / "corpus"
    for name, text in TEXT_FILES.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")
    jsonl = tmp_path / "docs.jsonl"
    lines = [json.dumps({"text": t, "id": i}) for i, t in enumerate(JSONL_DOCS)]
    jsonl.write_text("\n".join(lines[:6] + [""] + lines[6:]) + "\n", encoding="utf-8")
    in_dir_order = ["a.txt", "b.md", "nested/c.py", "nested/deeper/d.rst"]
    return [str(root), str(jsonl)], [TEXT_FILES[n] for n in in_dir_order] + JSONL_DOCS


def build(inputs, out, **kwargs):
    kwargs = {"val_fraction": 0.2, "shard_tokens": 40, "workers": 1, "progress": False, **kwargs}
    return build_shards(inputs, out, **kwargs)


def test_round_trip_through_webdataset(corpus, tokenizer, tmp_path):
    inputs, documents = corpus
    out = tmp_path / "shards"
    manifest = build(inputs, out, workers=2)

    read_back = {}
    for shard in manifest.shards:
        samples = list(wds.WebDataset(str(out / shard.name), shardshuffle=False))
        assert len(samples) == shard.documents
        assert sum(decode_tokens(s["tokens.npy"]).size for s in samples) == shard.tokens
        assert sha256_file(out / shard.name) == shard.sha256
        read_back.update({int(s["__key__"]): (shard.split, decode_tokens(s["tokens.npy"])) for s in samples})

    assert sorted(read_back) == list(range(len(documents)))
    for index, text in enumerate(documents):
        tokens = read_back[index][1]
        assert tokens.dtype == np.uint16
        assert tokens.tolist() == tokenizer.encode(text)
    assert manifest.documents == len(documents)
    assert manifest.tokens == sum(len(tokenizer.encode(t)) for t in documents)
    assert len(manifest.split("train")) > 1 and manifest.split("val")
    assert read_manifest(out) == manifest
    assert sorted(os.listdir(out)) == sorted([MANIFEST_NAME] + [s.name for s in manifest.shards])


def test_builds_are_byte_identical_whatever_the_worker_count(corpus, tmp_path):
    inputs, _ = corpus
    build(inputs, tmp_path / "one", workers=1)
    build(inputs, tmp_path / "two", workers=2)
    names = sorted(os.listdir(tmp_path / "one"))
    assert names == sorted(os.listdir(tmp_path / "two"))
    for name in names:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name


def test_seed_changes_the_val_split(corpus, tmp_path):
    inputs, _ = corpus
    first = build(inputs, tmp_path / "s0", seed=0)
    second = build(inputs, tmp_path / "s1", seed=1)
    assert [s.tokens for s in first.split("val")] != [s.tokens for s in second.split("val")]


def test_val_split_exists_with_two_documents(tmp_path):
    for name in ("one.txt", "two.txt"):
        (tmp_path / name).write_text(f"document {name}")
    manifest = build([str(tmp_path)], tmp_path / "out", val_fraction=1e-9)
    assert [(s.split, s.documents) for s in manifest.shards] == [("train", 1), ("val", 1)]
    no_val = build([str(tmp_path)], tmp_path / "out0", val_fraction=0)
    assert not no_val.split("val")


def test_missing_input_is_named(tmp_path):
    missing = tmp_path / "no_such_dir"
    with pytest.raises(ShardSetError, match="no_such_dir.*does not exist"):
        build([str(missing)], tmp_path / "out")


def test_empty_corpus(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.md").write_text(" \n\n ")
    with pytest.raises(ShardSetError, match="empty corpus"):
        build([str(tmp_path)], tmp_path / "out")
    with pytest.raises(ShardSetError, match="empty corpus: no files matching"):
        build([str(tmp_path)], tmp_path / "out2", patterns=["*.rst"])


@pytest.mark.parametrize("bad_line", ["{not json", '{"content": "no text field"}', '["a list"]'])
def test_bad_jsonl_line_names_file_and_line_and_leaves_no_shard_set(tmp_path, bad_line):
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"text": "also fine"}) + "\n" + bad_line + "\n")
    out = tmp_path / "out"
    with pytest.raises(ShardSetError, match=r"data\.jsonl:3: "):
        build([str(jsonl)], out)
    assert os.listdir(out) == []  # no manifest, no shards, no staging directory


def test_non_utf8_file_is_decoded_with_replacement_and_named(tmp_path, tokenizer, caplog):
    (tmp_path / "latin1.txt").write_bytes("café crème".encode("latin-1"))
    with caplog.at_level(logging.WARNING):
        manifest = build([str(tmp_path / "latin1.txt")], tmp_path / "out")
    assert "latin1.txt" in caplog.text
    assert manifest.tokens == len(tokenizer.encode("caf\ufffd cr\ufffdme"))


def test_overwrite_is_refused_unless_asked(corpus, tmp_path):
    inputs, _ = corpus
    out = tmp_path / "shards"
    first = build(inputs, out, shard_tokens=20)
    (out / "notes.txt").write_text("a file that is not part of the shard set")
    with pytest.raises(ShardSetError, match="shards.*is not empty"):
        build(inputs, out)
    second = build(inputs, out, shard_tokens=10_000, overwrite=True)
    assert len(second.shards) < len(first.shards)
    expected = sorted([MANIFEST_NAME, "notes.txt"] + [s.name for s in second.shards])
    assert sorted(os.listdir(out)) == expected
    assert inspect_shard_set(out)["documents"] == second.documents


def test_inspect_summary(corpus, tokenizer, tmp_path):
    inputs, documents = corpus
    out = tmp_path / "shards"
    manifest = build(inputs, out)
    summary = inspect_shard_set(out)
    lengths = [len(tokenizer.encode(t)) for t in documents]
    assert summary["documents"] == len(documents) and summary["tokens"] == sum(lengths)
    assert summary["splits"]["train"]["documents"] + summary["splits"]["val"]["documents"] == len(documents)
    assert summary["shards"] == len(manifest.shards)
    assert summary["doc_tokens"] == {"min": min(lengths), "mean": sum(lengths) / len(lengths), "max": max(lengths)}
    assert summary["tokenizer"] == "rwkv_vocab_v20230424"
    assert "verified" in format_summary(summary)
    assert inspect_shard_set(out, verify=False)["doc_tokens"]["max"] is None


def test_truncated_shard_is_named(corpus, tmp_path):
    inputs, _ = corpus
    out = tmp_path / "shards"
    shard = build(inputs, out).shards[0]
    path = out / shard.name
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ShardSetError, match=shard.name):
        inspect_shard_set(out)
    inspect_shard_set(out, verify=False)  # the manifest alone still reads


def test_flipped_bytes_fail_the_sha256_check(corpus, tmp_path):
    inputs, _ = corpus
    out = tmp_path / "shards"
    shard = build(inputs, out).shards[-1]
    path = out / shard.name
    with tarfile.open(path) as tar:
        last = tar.getmembers()[-1]
    data = bytearray(path.read_bytes())
    data[last.offset_data + last.size - 2] ^= 0xFF  # the last token's low byte: the .npy header stays intact
    path.write_bytes(bytes(data))
    with pytest.raises(ShardSetError, match=f"{shard.name} is corrupt: sha256"):
        verify_shards(out)


def test_default_corpus_is_the_stdlib_without_site_packages():
    (stdlib,) = default_corpus_paths()
    files = find_input_files([stdlib], ["*.py"])
    assert Path(stdlib, "os.py") in files
    assert not any("site-packages" in f.parts or "__pycache__" in f.parts for f in files)


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="rwkvx")
    add_data_subcommands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_build_and_inspect(corpus, tmp_path, capsys):
    inputs, documents = corpus
    out = str(tmp_path / "shards")
    assert run_cli(["data", "build", *inputs, "--out", out, "--shard-tokens", "50", "--workers", "2", "--quiet"]) == 0
    assert f"wrote {len(documents)} documents" in capsys.readouterr().out
    assert run_cli(["data", "inspect", out]) == 0
    assert f"{len(documents)} documents" in capsys.readouterr().out


def test_cli_errors_are_one_line_and_exit_2(tmp_path, capsys):
    assert run_cli(["data", "build", str(tmp_path / "missing"), "--out", str(tmp_path / "out")]) == 2
    assert run_cli(["data", "inspect", str(tmp_path / "not_a_shard_set")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and "missing" in err[0] and "not_a_shard_set" in err[1]


UNICODE_SAMPLES = [
    "Hello, world!",
    "ünïcödé naïve café, Ελληνικά, русский, العربية, हिन्दी",
    "中文，日本語のテキスト、한국어 🚀🌍👩‍💻",
    "def f(x):\n\treturn x ** 2  # comment\r\n",
    "   leading spaces\n\n\n\x00\x01 zero-width\u200bjoin",
]


def test_tokenizer_round_trips_unicode(tokenizer):
    for text in UNICODE_SAMPLES:
        assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.encode_batch(UNICODE_SAMPLES) == [tokenizer.encode(t) for t in UNICODE_SAMPLES]
    assert tokenizer.decode(tokenizer.encode("🚀")[:1]) == "\ufffd"  # a character cut mid-way
    assert tokenizer.decode([tokenizer.eod_token_id]) == ""
    assert (tokenizer.name, tokenizer.vocab_size, tokenizer.eod_token_id) == ("rwkv_vocab_v20230424", 65536, 0)


def test_tokenizer_matches_rwkv_reference_trie(tokenizer):
    import rwkv
    from rwkv.rwkv_tokenizer import TRIE_TOKENIZER

    reference = TRIE_TOKENIZER(os.path.join(os.path.dirname(rwkv.__file__), "rwkv_vocab_v20230424.txt"))
    for text in UNICODE_SAMPLES + [TEXT_FILES["nested/c.py"] * 5]:
        assert tokenizer.encode(text) == reference.encode(text)
