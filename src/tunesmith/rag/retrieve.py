"""Retrieve chunks for a question: optional query expansion into several queries, merged by reciprocal rank fusion."""

from __future__ import annotations

import re
from dataclasses import dataclass

from tunesmith.errors import ConfigError

EXPANSIONS = ("none", "keywords", "llm", "both")
RRF_K = 60  # the usual reciprocal-rank-fusion constant (Cormack et al., 2009)
STOPWORDS = frozenset("""a about an and are as at be by can could do does did for from how i if in into is it its
my me of on or should so than that the their them then there these this to was what when where which who why will
with would you your we our use using get""".split())
_REWRITE_LABEL = re.compile(r"^\s*(?:\d+[.)]|[-*•])?\s*(?:(?:search\s+)?(?:query|question)\s*\d*\s*:)?\s*", re.I)
REWRITE_PROMPT = ("Rewrite the question below as {n} different short search queries for a documentation search "
                  "engine. Write one query per line and nothing else.\n\nQuestion: {question}")


@dataclass
class Hit:
    position: int  # the chunk's position in the index
    chunk: dict
    score: float  # cosine similarity for one query; the reciprocal-rank-fusion score for several


def keyword_query(question: str) -> str:
    """The question's content words (stopwords and punctuation removed), as a terse extra query."""
    words = re.findall(r"[A-Za-z_][\w.]*|\d+", question)
    return " ".join(w for w in words if w.lower() not in STOPWORDS)


def llm_rewrites(question: str, model, tokenizer, n: int = 3, max_new_tokens: int = 64, virtual=None) -> list[str]:
    from tunesmith.infer.generate import generate_chat

    request = [{"role": "user", "content": REWRITE_PROMPT.format(n=n, question=question)}]
    return parse_rewrites(generate_chat(model, tokenizer, request, max_new_tokens=max_new_tokens, virtual=virtual), n)


def parse_rewrites(reply: str, n: int) -> list[str]:
    """One query per line, list markers and 'Query 2:' / 'Question:' labels removed; lines of one word dropped."""
    lines = [_REWRITE_LABEL.sub("", line).strip().strip('"') for line in reply.splitlines()]
    return [line for line in lines if len(line.split()) >= 2][:n]


def expand_query(question: str, expansion: str = "none", model=None, tokenizer=None, virtual=None) -> list[str]:
    """The question first, then the extra queries the expansion adds (duplicates removed). `virtual`: the loaded
    adapter's virtual tokens, if any (infer/generate.py)."""
    if expansion not in EXPANSIONS:
        raise ConfigError(f"--expand {expansion}: expected one of {', '.join(EXPANSIONS)}")
    queries = [question]
    if expansion in ("keywords", "both"):
        queries.append(keyword_query(question))
    if expansion in ("llm", "both"):
        if model is None:
            raise ConfigError(f"--expand {expansion}: rewriting queries needs a language model")
        queries.extend(llm_rewrites(question, model, tokenizer, virtual=virtual))
    seen, unique = set(), []
    for q in queries:
        if q.strip() and q.lower() not in seen:
            seen.add(q.lower())
            unique.append(q)
    return unique


def fuse(rankings: list[list[tuple[int, float]]], k: int) -> list[tuple[int, float]]:
    """Reciprocal rank fusion: each chunk scores sum(1 / (RRF_K + rank)) over the rankings that hold it."""
    if len(rankings) == 1:
        return rankings[0][:k]
    fused: dict[int, float] = {}
    for ranking in rankings:
        for rank, (position, _) in enumerate(ranking, start=1):
            fused[position] = fused.get(position, 0.0) + 1.0 / (RRF_K + rank)
    return sorted(fused.items(), key=lambda item: (-item[1], item[0]))[:k]


def retrieve(index, embedder, queries: list[str], k: int) -> list[Hit]:
    """Top-k chunks for the queries (each query searched to depth max(k, 20) before fusing)."""
    if k < 1:
        raise ConfigError(f"--top-k {k}: expected at least 1")
    depth = k if len(queries) == 1 else max(k, 20)
    rankings = index.search(embedder.encode(queries), depth)
    return [Hit(position, index.chunks[position], score) for position, score in fuse(rankings, k)]
