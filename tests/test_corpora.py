"""Corpus streaming, packing, shuffling, sharding, fingerprints and tokenizer loading."""

from __future__ import annotations

import gzip
import itertools
import json
import os
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from shared_data import require_shared

from rbridge_core.corpora import (
    CorpusError,
    CorpusSpec,
    fingerprint,
    iter_documents,
    iter_token_blocks,
    shuffled_blocks,
)
from rbridge_core.errors import ModelLoadError
from rbridge_core.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tok512():
    return load_tokenizer(require_shared("tokenizers/tinystories_tok512/tok512.model"))


def spec(*paths, **kw) -> CorpusSpec:
    return CorpusSpec("c", tuple(str(p) for p in paths), **kw)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


DOCS = ["Once upon a time there was a cat.", "The dog ran home.", "Lily liked red balls. " * 5]


def zstd_frames(chunks: list[str]) -> bytes:
    """``chunks`` zstd-compressed one frame each, the frames concatenated (a valid .zst file)."""
    codec = pa.Codec("zstd")
    return b"".join(codec.compress(c.encode(), asbytes=True) for c in chunks)


# ---------------------------------------------------------------------------------- formats


def test_formats_read_the_same_documents(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"text": d, "id": i} for i, d in enumerate(DOCS)])
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.writelines(json.dumps({"text": d}) + "\n" for d in DOCS)
    pq.write_table(
        pa.table({"text": DOCS, "n": [1, 2, 3]}), tmp_path / "c.parquet", row_group_size=2
    )
    (tmp_path / "d.txt").write_text("\n\n \n".join(DOCS) + "\n\n")
    # zstd, one frame per document: files written by parallel or appending compressors have many
    (tmp_path / "e.jsonl.zst").write_bytes(
        zstd_frames([json.dumps({"text": d}) + "\n" for d in DOCS])
    )
    (tmp_path / "f.txt.zst").write_bytes(zstd_frames([d + "\n\n" for d in DOCS]))
    names = ["a.jsonl", "b.jsonl.gz", "c.parquet", "d.txt", "e.jsonl.zst", "f.txt.zst"]
    for name in names:
        assert list(iter_documents(spec(tmp_path / name))) == DOCS, name
    # a folder: recursive, sorted, known suffixes only, hidden files skipped
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "g.txt").write_text("last")
    (tmp_path / "notes.csv").write_text("ignored")
    (tmp_path / ".hidden.txt").write_text("ignored")
    assert list(iter_documents(spec(tmp_path))) == DOCS * len(names) + ["last"]
    assert list(iter_documents(spec(tmp_path, format="parquet"))) == DOCS
    # explicit format reads a file whatever its suffix
    (tmp_path / "corpus.en").write_text("a b\nc\n\nd\n")
    assert list(iter_documents(spec(tmp_path / "corpus.en", format="text"))) == ["a b\nc", "d"]


def test_custom_text_field(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"content": "x"}, {"content": ""}, {"content": "y"}])
    assert list(iter_documents(spec(tmp_path / "a.jsonl", text_field="content"))) == ["x", "y"]


def test_long_text_document_is_cut_at_line_boundaries(tmp_path, monkeypatch):
    import rbridge_core.corpora as corpora

    monkeypatch.setattr(corpora, "MAX_TEXT_DOC_CHARS", 10)
    (tmp_path / "a.txt").write_text("abcd\nefgh\nijkl\n")
    docs = list(iter_documents(spec(tmp_path / "a.txt")))
    assert "".join(docs).replace("\n", "") == "abcdefghijkl"
    assert all(len(d) <= 10 for d in docs) and len(docs) > 1


def test_real_corpora_slices():
    wiki = list(iter_documents(spec(require_shared("corpora/wikitext2/valid.txt"))))
    assert len(wiki) > 100 and wiki[0].strip() == "= Homarus gammarus ="
    code = iter_documents(
        spec(require_shared("corpora/python_code/cpython_3.11.7_Lib_sample.jsonl"))
    )
    assert '"""Record of phased-in' in next(code)
    web = sorted(require_shared("corpora/web").glob("*.json*"))
    docs = list(iter_documents(spec(*web)))
    assert len(docs) == 60 and all(isinstance(d, str) and d for d in docs)


# ---------------------------------------------------------------------------------- packing


def eos_stream(tok, docs: list[str]) -> list[int]:
    out: list[int] = []
    for d in docs:
        out += tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return out


def test_packing_concatenates_back_to_the_eos_joined_stream(tmp_path, tok512):
    docs = [f"Story {i}: " + "Tom saw a big tree. " * (i % 7 + 1) for i in range(50)]
    write_jsonl(tmp_path / "a.jsonl", [{"text": d} for d in docs])
    s = spec(tmp_path / "a.jsonl")
    stream = eos_stream(tok512, docs)
    blocks = list(iter_token_blocks(s, tok512, seq_len=31, batch_docs=7))
    assert all(b.dtype == np.int32 and b.shape == (32,) for b in blocks)
    assert len(blocks) == len(stream) // 32
    assert np.concatenate(blocks).tolist() == stream[: len(blocks) * 32]


def test_shards_are_disjoint_and_cover(tmp_path, tok512):
    write_jsonl(tmp_path / "a.jsonl", [{"text": f"doc {i} " * 9} for i in range(40)])
    s = spec(tmp_path / "a.jsonl")
    full = list(iter_token_blocks(s, tok512, seq_len=15))
    shards = [
        list(iter_token_blocks(s, tok512, seq_len=15, rank=r, world_size=3)) for r in range(3)
    ]
    for r, shard in enumerate(shards):
        assert [b.tolist() for b in shard] == [b.tolist() for b in full[r::3]]
    assert sum(map(len, shards)) == len(full)


def test_max_blocks_repeat_and_budget_error(tmp_path, tok512, caplog):
    write_jsonl(tmp_path / "a.jsonl", [{"text": "The cat sat on the mat."}] * 4)
    s = spec(tmp_path / "a.jsonl")
    n_epoch = len(list(iter_token_blocks(s, tok512, seq_len=7)))
    assert len(list(iter_token_blocks(s, tok512, seq_len=7, max_blocks=2))) == 2
    with pytest.raises(CorpusError, match=r"corpus 'c' \(.*\) has \d+ tokens, fewer than"):
        list(iter_token_blocks(s, tok512, seq_len=7, max_blocks=n_epoch + 5))
    blocks = list(iter_token_blocks(s, tok512, seq_len=7, max_blocks=3 * n_epoch, repeat=True))
    assert len(blocks) == 3 * n_epoch
    assert "starting epoch 2" in caplog.text


def test_shuffle_is_deterministic_and_a_permutation():
    items = list(range(100))
    a = list(shuffled_blocks(iter(items), buffer_size=16, seed=3))
    assert a == list(shuffled_blocks(iter(items), buffer_size=16, seed=3))
    assert a != list(shuffled_blocks(iter(items), buffer_size=16, seed=4))
    assert a != items and sorted(a) == items
    assert list(shuffled_blocks(iter(items), buffer_size=1, seed=0)) == items


# ------------------------------------------------------------------------- s3:// (moto server)


def write_mixed_corpus(folder: Path, docs: list[str]) -> None:
    """``docs`` spread over every format, in the folder's sorted path order, plus a hidden file."""
    parts = [docs[i : i + 5] for i in range(0, len(docs), 5)]
    assert len(parts) == 6
    (folder / "sub").mkdir(parents=True)
    write_jsonl(folder / "a.jsonl", [{"text": d} for d in parts[0]])
    with gzip.open(folder / "b.jsonl.gz", "wt") as f:
        f.writelines(json.dumps({"text": d}) + "\n" for d in parts[1])
    (folder / "c.jsonl.zst").write_bytes(
        zstd_frames([json.dumps({"text": d}) + "\n" for d in parts[2]])
    )
    (folder / "d.txt").write_text("\n\n".join(parts[3]) + "\n")
    pq.write_table(pa.table({"text": parts[4]}), folder / "e.parquet", row_group_size=2)
    (folder / "sub" / "f.txt.zst").write_bytes(zstd_frames([d + "\n\n" for d in parts[5]]))
    write_jsonl(folder / ".hidden.jsonl", [{"text": "never read"}])


def test_s3_corpus_streams_the_tokens_of_its_plain_text(tmp_path, tok512, s3_bucket):
    import s3fs

    docs = [f"Story {i}: " + "Tom saw a big tree. " * (i % 4 + 1) for i in range(30)]
    local = tmp_path / "corpus"
    write_mixed_corpus(local, docs)
    fs = s3fs.S3FileSystem()
    for path in sorted(local.rglob("*")):
        if path.is_file():
            fs.pipe(f"{s3_bucket}/corpus/{path.relative_to(local).as_posix()}", path.read_bytes())
    url = f"{s3_bucket}/corpus"

    assert list(iter_documents(spec(url))) == docs
    assert list(iter_documents(spec(f"{url}/sub/f.txt.zst"))) == docs[25:]
    stream = eos_stream(tok512, docs)
    for source in (url, local):
        blocks = list(iter_token_blocks(spec(source), tok512, seq_len=15, batch_docs=4))
        assert len(blocks) == len(stream) // 16 > 10, source
        assert np.concatenate(blocks).tolist() == stream[: len(blocks) * 16], source
    shard = list(iter_token_blocks(spec(url), tok512, seq_len=15, rank=1, world_size=2))
    assert [b.tolist() for b in shard] == [b.tolist() for b in blocks[1::2]]

    # the strong fingerprint is the content's, wherever it is stored; the cheap one sees a change
    assert fingerprint(spec(url), strong=True) == fingerprint(spec(local), strong=True)
    cheap = fingerprint(spec(url))
    assert fingerprint(spec(url)) == cheap
    fs.pipe(f"{url}/a.jsonl", b'{"text": "changed"}\n')
    assert fingerprint(spec(url)) != cheap
    with pytest.raises(CorpusError, match=f"{url}/missing.jsonl"):
        iter_documents(spec(f"{url}/missing.jsonl"))
    fs.pipe(f"{url}/c.jsonl.zst", zstd_frames(["not json\n"]))
    with pytest.raises(CorpusError, match=r"c\.jsonl\.zst' line 1"):
        list(iter_documents(spec(url)))


# ----------------------------------------------------------------------------- fingerprints


def test_fingerprint_tracks_content_and_mtime(tmp_path):
    f = write_jsonl(tmp_path / "a.jsonl", [{"text": "abc"}])
    s = spec(tmp_path)
    cheap, strong = fingerprint(s), fingerprint(s, strong=True)
    assert cheap == fingerprint(s) and strong == fingerprint(s, strong=True)
    assert len(cheap) == 64 and cheap != strong
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert fingerprint(s) != cheap and fingerprint(s, strong=True) == strong
    # same size, same mtime, different bytes: only the strong fingerprint sees it
    write_jsonl(f, [{"text": "abd"}])
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert fingerprint(s) == cheap and fingerprint(s, strong=True) != strong
    assert fingerprint(spec(tmp_path, text_field="body")) != cheap


# --------------------------------------------------------------------------------- bad input


def bad_cases(tmp_path: Path) -> list[tuple[CorpusSpec, str]]:
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "blank.txt").write_text("\n \n\n")
    (tmp_path / "x.parquet").write_bytes(np.random.default_rng(0).bytes(2000))
    write_jsonl(tmp_path / "nofield.jsonl", [{"body": "x", "id": 1}])
    write_jsonl(tmp_path / "nonstr.jsonl", [{"text": "ok"}, {"text": 5}])
    (tmp_path / "badjson.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "nofield.parquet")
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "int.parquet")
    pq.write_table(pa.table({"text": ["a", None]}), tmp_path / "null.parquet")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / "notgz.jsonl.gz").write_text("plain")
    (tmp_path / "notzst.jsonl.zst").write_text("plain")
    whole = zstd_frames(["".join(f"line {i}: {i * i}\n" for i in range(2000))])
    (tmp_path / "cut.txt.zst").write_bytes(whole[: len(whole) // 2])  # an interrupted download
    (tmp_path / "noformat.bin").write_text("x")
    (tmp_path / "emptydir").mkdir()
    return [
        (spec(tmp_path / "missing.jsonl"), "missing.jsonl"),
        (spec(tmp_path / "empty.jsonl"), "empty.jsonl"),
        (spec(tmp_path / "blank.txt"), "blank.txt"),
        (spec(tmp_path / "x.parquet"), "x.parquet"),
        (spec(tmp_path / "nofield.jsonl"), "nofield.jsonl.*fields present: \\['body', 'id'\\]"),
        (spec(tmp_path / "nonstr.jsonl"), "nonstr.jsonl' line 2.*int"),
        (spec(tmp_path / "badjson.jsonl"), "badjson.jsonl' line 2"),
        (spec(tmp_path / "nofield.parquet"), "nofield.parquet.*columns present: \\['body'\\]"),
        (spec(tmp_path / "int.parquet"), "int.parquet.*int64"),
        (spec(tmp_path / "null.parquet"), "null.parquet' row 1"),
        (spec(tmp_path / "latin1.txt"), "latin1.txt.*UTF-8"),
        (spec(tmp_path / "notgz.jsonl.gz"), "notgz.jsonl.gz"),
        (spec(tmp_path / "notzst.jsonl.zst"), "notzst.jsonl.zst"),
        (spec(tmp_path / "cut.txt.zst"), "cut.txt.zst"),
        (spec(tmp_path / "noformat.bin"), "noformat.bin"),
        (spec(tmp_path / "emptydir"), "emptydir"),
    ]


def test_every_bad_input_is_one_corpus_error_naming_the_file(tmp_path, tok512):
    for s, pattern in bad_cases(tmp_path):
        with pytest.raises(CorpusError, match=pattern):
            list(iter_documents(s))
    with pytest.raises(CorpusError, match="missing.jsonl"):
        iter_token_blocks(spec(tmp_path / "missing.jsonl"), tok512, seq_len=8)
    with pytest.raises(CorpusError, match="missing.jsonl"):
        fingerprint(spec(tmp_path / "missing.jsonl"))


# ------------------------------------------------------------------------------ flat memory


def test_streaming_a_50mb_jsonl_keeps_memory_flat(tmp_path):
    path = tmp_path / "big.jsonl"
    line = json.dumps({"text": "word " * 2000, "meta": "x" * 100}) + "\n"  # ~10 kB
    with path.open("w") as f:
        for _ in range(50_000_000 // len(line)):
            f.write(line)
    size = path.stat().st_size
    assert size > 45_000_000
    tracemalloc.start()
    try:
        n = sum(1 for _ in iter_documents(spec(path)))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert n == 50_000_000 // len(line)
    assert peak < size / 20, f"peak {peak} bytes for a {size}-byte file"


# -------------------------------------------------------------------------------- tokenizers


@pytest.mark.parametrize(
    "rel, eos",
    [
        ("gpt_neox_olmo/tokenizer.json", "<|endoftext|>"),
        ("gpt2_bpe", "<|endoftext|>"),
        ("tinystories_tok512/tok512.model", "</s>"),
    ],
)
def test_load_tokenizer_kinds(rel, eos):
    from transformers import PreTrainedTokenizerFast

    tok = load_tokenizer(require_shared(f"tokenizers/{rel}"))
    assert isinstance(tok, PreTrainedTokenizerFast)
    assert tok.eos_token == eos and tok.pad_token_id == tok.eos_token_id is not None
    ids = tok("Once upon a time", add_special_tokens=False)["input_ids"]
    assert len(ids) > 1 and tok.decode(ids) == "Once upon a time"


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="nope"):
        load_tokenizer(tmp_path / "nope")
    (tmp_path / "t.bin").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="t.bin"):
        load_tokenizer(tmp_path / "t.bin")
    # a tokenizer.json whose vocabulary has no EOS-like token
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")).save(
        str(tmp_path / "tokenizer.json")
    )
    with pytest.raises(ModelLoadError, match=r"tokenizer\.json.*no EOS token"):
        load_tokenizer(tmp_path / "tokenizer.json")


def test_shuffle_takes_a_generator_of_blocks():
    gen = (np.full(3, i, dtype=np.int32) for i in range(10))
    out = list(itertools.islice(shuffled_blocks(gen, buffer_size=4, seed=0), 10))
    assert sorted(int(b[0]) for b in out) == list(range(10))


# --- the demo's shipped corpus slices ---

DEMO_CORPORA = Path(__file__).resolve().parents[1] / "rbridge_core" / "examples" / "corpora"


@pytest.mark.parametrize("name", ["math", "fiction", "wiki", "web", "code"])
def test_demo_corpus_folder_has_source_licence_and_size(name: str) -> None:
    folder = DEMO_CORPORA / name
    files = [p for p in folder.iterdir() if p.is_file()]
    assert (folder / "SOURCE.txt").is_file()
    assert "Slice shipped with rbridge" in (folder / "SOURCE.txt").read_text()
    assert any(p.name.upper().startswith("LICENSE") for p in files)
    size = sum(p.stat().st_size for p in files)
    assert 100_000 <= size <= 500_000, f"{name}: {size} bytes"
