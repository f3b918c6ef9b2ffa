"""Corpora: formats, cleaning with counted drops, the benchmark split rule, bad input."""

from __future__ import annotations

import hashlib
import json

import pytest

from logit2prompt.data.corpus import clean, load_corpus, normalise, read_rows, split_of
from logit2prompt.errors import CorpusError

ROWS = [
    "  What is  the capital\nof France? ",
    "List three primes.",
    "",
    "List three primes.",
    "A prompt that is far far far far far far far too long to keep",
]


def _write_all_formats(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps({"text": r, "k": 1}) for r in ROWS))
    (tmp_path / "c.json").write_text(json.dumps([{"text": r} for r in ROWS]))
    (tmp_path / "c.txt").write_text("\n".join(r.replace("\n", " ") for r in ROWS))
    (tmp_path / "c.csv").write_text("text,k\n" + "\n".join(f'"{r}",1' for r in ROWS))
    pq.write_table(pa.table({"text": ROWS}), tmp_path / "c.parquet")


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".txt", ".csv", ".parquet"])
def test_every_format_reads_and_cleans_the_same(tmp_path, suffix):
    _write_all_formats(tmp_path)
    field = "prompt" if suffix == ".txt" else "text"
    words = lambda texts: [len(t.split()) for t in texts]  # noqa: E731
    corpus = load_corpus(
        str(tmp_path / f"c{suffix}"), field_name=field, count_tokens=words, max_tokens=8
    )
    assert corpus.texts == ["What is the capital of France?", "List three primes."]
    assert corpus.dropped["empty"] == 1
    assert corpus.dropped["duplicate"] == 1
    assert corpus.dropped["too_long"] == 1


def test_byte_order_marks_line_separators_and_non_text_values(tmp_path):
    # A BOM is not part of the first prompt; U+2028, U+0085 and form feeds are whitespace
    # inside a prompt, not line breaks (JSON Lines written with ensure_ascii=False hold them).
    jsonl = tmp_path / "c.jsonl"
    rows = [{"prompt": "first\u2028line"}, {"prompt": ["a", "chat"]}, {"prompt": 7}]
    rows.append({"prompt": "second\x85prompt"})
    text = "\r\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\r\n"
    jsonl.write_text("\ufeff" + text, encoding="utf-8")
    corpus = load_corpus(str(jsonl), max_tokens=None)
    assert corpus.texts == ["first line", "second prompt"]
    assert corpus.dropped["not_text"] == 2  # a message list and a number are not a prompt
    txt = tmp_path / "c.txt"
    txt.write_text("\ufeffone\x0cprompt\r\ntwo\n", encoding="utf-8")
    assert load_corpus(str(txt), max_tokens=None).texts == ["one prompt", "two"]
    csv = tmp_path / "c.csv"
    csv.write_text("\ufeffprompt\nhello\n", encoding="utf-8")
    assert load_corpus(str(csv), max_tokens=None).texts == ["hello"]


def test_normalise_and_split_rule():
    assert normalise("  a\t b\n\nc ") == "a b c"
    for text in ["hello world", "What is the capital of France?", "x" * 50]:
        h = int(hashlib.sha256(" ".join(text.split()).encode()).hexdigest(), 16) % 100
        expected = "test" if h < 2 else "validation" if h == 2 else "train"
        assert split_of(text) == expected == split_of("  " + text.replace(" ", "   ") + "\n")
    splits = [split_of(f"prompt number {i}") for i in range(5000)]
    assert 0.01 < splits.count("test") / 5000 < 0.03
    assert 0.003 < splits.count("validation") / 5000 < 0.02


def test_split_selection_is_deterministic(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("\n".join(f"prompt number {i}" for i in range(3000)))
    a = load_corpus(str(path), split="test")
    b = load_corpus(str(path), split="test")
    assert a.texts == b.texts and all(split_of(t) == "test" for t in a.texts)
    assert a.sha256() == b.sha256()
    assert (
        load_corpus(str(path), split="train", limit=7).texts
        == [t for t in load_corpus(str(path)).texts if split_of(t) == "train"][:7]
    )


def test_meta_fields_are_kept(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps({"prompt": "hi there", "task": "greet", "nested": {"a": 1}}))
    (record,) = clean(read_rows(str(path)), str(path)).records
    assert record.meta == {"task": "greet"}


def test_bad_corpora_give_specific_errors(tmp_path):
    with pytest.raises(CorpusError, match="does not exist"):
        load_corpus(str(tmp_path / "missing.jsonl"))
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    with pytest.raises(CorpusError, match="not valid UTF-8"):
        load_corpus(str(bad))
    nofield = tmp_path / "nofield.jsonl"
    nofield.write_text(json.dumps({"question": "why?"}))
    with pytest.raises(CorpusError, match="'prompt'.*question"):
        load_corpus(str(nofield))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "ok"}\n{"prompt": \n')
    with pytest.raises(CorpusError, match="broken.jsonl:2"):
        load_corpus(str(broken))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n\t\n")
    with pytest.raises(CorpusError, match="no prompts left.*empty=3"):
        load_corpus(str(empty))
    long = tmp_path / "long.txt"
    long.write_text("one two three four\nfive six seven eight nine\n")
    with pytest.raises(CorpusError, match="too_long=2"):
        load_corpus(str(long), count_tokens=lambda ts: [len(t.split()) for t in ts], max_tokens=3)
    with pytest.raises(CorpusError, match="unknown corpus format"):
        (tmp_path / "x.xml").write_text("<a/>")
        load_corpus(str(tmp_path / "x.xml"))
    with pytest.raises(CorpusError, match="unknown split"):
        load_corpus(str(long), split="dev")
