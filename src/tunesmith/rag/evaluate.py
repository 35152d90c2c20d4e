"""Score retrieval (recall@k, MRR) against gold source sections, and answers (exact match, token F1) with and
without retrieval.

A retrieved chunk is relevant to a question when it comes from a gold section's file and at least half of the
chunk lies in the section, or at least half of the section lies in the chunk.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from tunesmith.errors import DataError
from tunesmith.eval.metrics import exact_match, mean, token_f1
from tunesmith.rag.retrieve import expand_query, retrieve


@dataclass
class GoldQuestion:
    question: str
    answer: str
    gold: list[dict]  # {"source": path relative to the document root, "start": char, "end": char}
    where: str
    kind: str = ""  # optional label to report subsets by (the shipped set: "heading" or "paraphrase")


@dataclass
class RetrievalScores:
    recall: dict[int, float]  # k → fraction of questions with a relevant chunk in the top k
    mrr: float  # mean of 1/rank of the first relevant chunk within the deepest k (0 when none)
    ranks: list[int | None] = field(default_factory=list)
    seconds_per_question: float = 0.0


@dataclass
class AnswerScores:
    condition: str
    exact_match: float
    f1: float
    mean_prompt_tokens: float
    seconds_per_answer: float
    cited: float | None = None  # fraction of answers citing at least one source that exists in the prompt
    rows: list[dict] = field(default_factory=list)


def load_questions(path) -> list[GoldQuestion]:
    from tunesmith.data.sources import read_records

    out = []
    for record in read_records(path):
        f = record.fields
        for key, kind in (("question", str), ("answer", str), ("gold", list)):
            if not isinstance(f.get(key), kind) or not f[key]:
                raise DataError(f"{record.where}: expected a non-empty '{key}' ({kind.__name__}); a question record "
                                "is {\"question\", \"answer\", \"gold\": [{\"source\", \"start\", \"end\"}]}")
        for g in f["gold"]:
            if not (isinstance(g, dict) and isinstance(g.get("source"), str) and isinstance(g.get("start"), int)
                    and isinstance(g.get("end"), int) and g["end"] > g["start"]):
                raise DataError(f"{record.where}: each gold entry needs 'source' (a path) and character offsets "
                                f"'start' < 'end'; got {g!r}")
        out.append(GoldQuestion(f["question"], f["answer"], f["gold"], record.where, str(f.get("kind") or "")))
    return out


def spread(questions: list, n: int | None) -> list:
    """n questions evenly spaced over the list (all of them when n is None or larger)."""
    if n is None or n >= len(questions):
        return list(questions)
    return questions[::len(questions) // n][:n]


def same_file(chunk_file: str, gold_source: str) -> bool:
    return chunk_file == gold_source or chunk_file.endswith("/" + gold_source.lstrip("/"))


def is_relevant(chunk: dict, gold: list[dict]) -> bool:
    for g in gold:
        if not same_file(chunk["source"], g["source"]):
            continue
        overlap = min(chunk["end"], g["end"]) - max(chunk["start"], g["start"])
        if overlap > 0 and overlap >= 0.5 * min(chunk["end"] - chunk["start"], g["end"] - g["start"]):
            return True
    return False


def first_relevant_rank(chunks: list[dict], gold: list[dict]) -> int | None:
    return next((rank for rank, c in enumerate(chunks, 1) if is_relevant(c, gold)), None)


def check_gold_sources(index, questions: list[GoldQuestion]) -> None:
    """Refuse a question set whose gold files the index does not hold: every score would silently be 0."""
    files = {c["source"] for c in index.chunks}
    for q in questions:
        for g in q.gold:
            if not any(same_file(f, g["source"]) for f in files):
                raise DataError(f"{q.where}: gold source '{g['source']}' is not in the index; index the documents "
                                "the questions were written for (e.g. data/pydoc_kb/docs)")


def score_retrieval(index, embedder, questions: list[GoldQuestion], ks: list[int], expansion: str = "none",
                    model=None, tokenizer=None, progress=None, virtual=None) -> RetrievalScores:
    depth = max(ks)
    ranks = []
    task = progress.add_task("retrieval", total=len(questions)) if progress else None
    started = time.perf_counter()
    for q in questions:
        hits = retrieve(index, embedder, expand_query(q.question, expansion, model, tokenizer, virtual), depth)
        ranks.append(first_relevant_rank([h.chunk for h in hits], q.gold))
        if progress:
            progress.advance(task)
    recall = {k: mean(r is not None and r <= k for r in ranks) for k in sorted(ks)}
    mrr = mean(1.0 / r if r else 0.0 for r in ranks)
    return RetrievalScores(recall, mrr, ranks, (time.perf_counter() - started) / max(1, len(questions)))


def score_answers(model, tokenizer, index, embedder, questions: list[GoldQuestion], top_k: int, budget: int,
                  max_new_tokens: int = 48, expansion: str = "none", progress=None, virtual=None
                  ) -> list[AnswerScores]:
    """Two rows: the bare question, then the question with the top-k retrieved sources."""
    from tunesmith.rag.ask import answer_without_retrieval, ask, prompt_length

    results = []
    for condition in ("without retrieval", f"with retrieval (top {top_k})"):
        task = progress.add_task(condition, total=len(questions)) if progress else None
        rows, started = [], time.perf_counter()
        for q in questions:
            if condition.startswith("without"):
                text = answer_without_retrieval(model, tokenizer, q.question, max_new_tokens, virtual)
                n_tokens, cited = prompt_length(tokenizer, [{"role": "user", "content": q.question}]), None
            else:
                answer = ask(model, tokenizer, index, embedder, q.question, top_k, expansion, max_new_tokens,
                             budget, q.where, virtual)
                text, n_tokens, cited = answer.text, answer.prompt.n_tokens, bool(answer.cited)
            rows.append({"where": q.where, "question": q.question, "reference": q.answer, "answer": text,
                         "condition": condition, "prompt_tokens": n_tokens, "cited": cited,
                         "exact_match": exact_match(text, q.answer), "f1": token_f1(text, q.answer)})
            if progress:
                progress.advance(task)
        elapsed = time.perf_counter() - started
        cited_rate = mean(r["cited"] for r in rows) if rows and rows[0]["cited"] is not None else None
        results.append(AnswerScores(condition, mean(r["exact_match"] for r in rows), mean(r["f1"] for r in rows),
                                    mean(r["prompt_tokens"] for r in rows), elapsed / max(1, len(rows)),
                                    cited_rate, rows))
    return results
