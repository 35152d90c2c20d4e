"""Handlers of `tunesmith rag index | ask | eval` (their parsers: cli/rag.py)."""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from tunesmith.errors import ConfigError, DataError, ModelError
from tunesmith.infer.embedding import DEFAULT_EMBEDDER, load_embedder, resolve_embedder
from tunesmith.rag.chunking import DEFAULT_CHUNK_TOKENS, DEFAULT_OVERLAP_TOKENS
from tunesmith.rag.index import RagIndex

out = Console()
err = Console(stderr=True)


def _index_embedder(index: RagIndex, folder) -> object:
    """The embedding model the index was built with, checked against the manifest."""
    try:
        embedder = load_embedder(index.embedding_model)
    except ModelError as e:
        raise ModelError(f"{folder}: the index was built with the embedding model '{index.embedding_model}', which "
                         f"cannot be loaded here ({e})") from None
    index.check_embedder(embedder.name, embedder.dim, folder)
    return embedder


def _open_index(folder: str):
    index = RagIndex.load(folder)
    return index, _index_embedder(index, folder)


def cmd_index(args) -> int:
    from tunesmith.cli.output import progress_bar
    from tunesmith.rag.documents import collect

    started = time.perf_counter()
    dest = Path(args.out)
    if dest.exists() and not dest.is_dir():
        raise DataError(f"--out {dest}: is a file; expected an index folder (new or existing)")
    collected = collect(args.docs, exclude=dest)
    if dest.exists():
        index = RagIndex.load(dest)
        if args.embedding_model is not None:  # refused before any model is loaded
            index.check_embedder(resolve_embedder(args.embedding_model)[1], index.manifest["dim"], dest)
        index.check_chunk_settings(args.chunk_tokens, args.overlap_tokens, dest)
        embedder = _index_embedder(index, dest) if index.pending(collected) else None
    else:
        if not collected.files:
            reasons = "; ".join(f"{s.path}: {s.reason}" for s in collected.skipped) or "no supported files found"
            raise DataError(f"nothing to index in {' '.join(args.docs)} ({reasons}); expected non-empty UTF-8 "
                            ".txt/.md/.rst/.jsonl files")
        embedder = load_embedder(args.embedding_model or DEFAULT_EMBEDDER)
        index = RagIndex.new(embedder.name, embedder.dim,
                             DEFAULT_CHUNK_TOKENS if args.chunk_tokens is None else args.chunk_tokens,
                             DEFAULT_OVERLAP_TOKENS if args.overlap_tokens is None else args.overlap_tokens)
    if args.quiet:
        report = index.add(collected, embedder)
    else:
        with progress_bar(err) as progress:
            report = index.add(collected, embedder, progress)
    if report.added or report.updated or not dest.exists():
        index.save(dest)
    for label, paths in (("added", report.added), ("re-indexed (changed)", report.updated),
                         ("unchanged, skipped", report.unchanged)):
        if paths:
            out.print(f"{label}: {len(paths)} file(s): {', '.join(paths)}", soft_wrap=True, markup=False)
    for s in report.skipped:
        out.print(f"skipped {s.path}: {s.reason}", style="yellow", soft_wrap=True, markup=False)
    out.print(f"{dest}: {len(index.chunks)} chunks from {len(index.manifest['files'])} file(s), "
              f"{report.chunks_added} new; embedding model {index.embedding_model} ({index.manifest['dim']}-d); "
              f"{time.perf_counter() - started:.1f} s", soft_wrap=True, markup=False, highlight=False)
    return 0


def _print_sources(hits, answer=None) -> None:
    """The retrieved chunks, numbered as in the prompt; with an answer, whether it cites each and how many of
    its words each holds."""
    from tunesmith.rag.ask import support

    out.print("[bold]sources[/bold]")
    for i, hit in enumerate(hits, 1):
        c = hit.chunk
        notes = [f"score {hit.score:.3f}"]
        if answer:
            notes += (["cited"] if i in answer.cited else []) + [f"{support(answer.text, c['text']):.0%} of the "
                                                                 "answer's words"]
        out.print(f"[{i}] {c['source']}, characters {c['start']}-{c['end']} ({', '.join(notes)})", soft_wrap=True,
                  markup=False, highlight=False)
        out.print("    " + " ".join(c["text"].split())[:160], soft_wrap=True, markup=False, highlight=False)


def _load_llm(args):
    """(model, tokenizer, prompt budget, the adapter's virtual tokens or None)."""
    from tunesmith.infer.adapters import adapter_context, load_with_adapter
    from tunesmith.infer.icl import prompt_budget

    model, tokenizer = load_with_adapter(args.model, args.adapter, args.dtype, device=args.device)
    return (model, tokenizer, prompt_budget(model, args.max_new_tokens, args.max_prompt_tokens),
            adapter_context(args.adapter).virtual(model))


def cmd_ask(args) -> int:
    from tunesmith.rag.ask import ask
    from tunesmith.rag.retrieve import expand_query, retrieve

    index, embedder = _open_index(args.index)
    if not args.question.strip():
        raise DataError("QUESTION: the question is empty")
    if args.retrieve_only:
        if args.expand in ("llm", "both"):
            raise ConfigError(f"--expand {args.expand}: LLM rewriting needs the model; leave out --retrieve-only")
        _print_sources(retrieve(index, embedder, expand_query(args.question, args.expand), args.top_k))
        return 0
    model, tokenizer, budget, virtual = _load_llm(args)
    answer = ask(model, tokenizer, index, embedder, args.question, args.top_k, args.expand, args.max_new_tokens,
                 budget, where="QUESTION (the question argument)", virtual=virtual)
    if len(answer.queries) > 1:
        out.print("queries: " + " | ".join(answer.queries), style="dim", soft_wrap=True, markup=False)
    out.print(answer.text, soft_wrap=True, markup=False, highlight=False)
    _print_sources(answer.prompt.sources, answer)
    if answer.prompt.dropped:
        out.print(f"{len(answer.prompt.dropped)} retrieved chunk(s) left out to fit the {budget}-token prompt "
                  "budget: " + ", ".join(h.chunk["source"] for h in answer.prompt.dropped), style="yellow",
                  soft_wrap=True, markup=False)
    return 0


def _retrieval_table(retrieval, questions, args) -> Table:
    """One row for all questions, and one per kind when the question set labels them."""
    from tunesmith.eval.metrics import mean

    table = Table(title=f"retrieval on {args.questions} (expansion: {args.expand})",
                  caption=f"{retrieval.seconds_per_question:.3f} s per question")
    for col in ["questions", "n"] + [f"recall@{k}" for k in retrieval.recall] + ["MRR"]:
        table.add_column(col, justify="right")
    table.add_row("all", str(len(questions)), *[f"{v:.3f}" for v in retrieval.recall.values()],
                  f"{retrieval.mrr:.3f}")
    kinds = sorted({q.kind for q in questions if q.kind})
    for kind in kinds if len(kinds) > 1 else []:
        ranks = [r for q, r in zip(questions, retrieval.ranks) if q.kind == kind]
        table.add_row(kind, str(len(ranks)), *[f"{mean(r is not None and r <= k for r in ranks):.3f}"
                                               for k in retrieval.recall],
                      f"{mean(1.0 / r if r else 0.0 for r in ranks):.3f}")
    return table


def cmd_eval(args) -> int:
    from tunesmith.cli.output import progress_bar, write_jsonl
    from tunesmith.rag.evaluate import check_gold_sources, load_questions, score_answers, score_retrieval, spread

    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit {args.limit}: expected at least 1")
    index, embedder = _open_index(args.index)
    questions = load_questions(args.questions)
    check_gold_sources(index, questions)
    needs_llm = not args.no_answers or args.expand in ("llm", "both")
    model, tokenizer, budget, virtual = _load_llm(args) if needs_llm else (None, None, None, None)
    with progress_bar(err) as progress:
        retrieval = score_retrieval(index, embedder, questions, args.ks, args.expand, model, tokenizer, progress,
                                    virtual)
    out.print(_retrieval_table(retrieval, questions, args))
    if args.no_answers:
        return 0
    subset = spread(questions, args.limit)
    with progress_bar(err) as progress:
        answers = score_answers(model, tokenizer, index, embedder, subset, args.top_k, budget, args.max_new_tokens,
                                args.expand, progress, virtual)
    table = Table(title=f"answers on {len(subset)} questions (max {args.max_new_tokens} new tokens)")
    for col in ("condition", "exact match", "token F1", "cites a source", "mean prompt tokens", "s / answer"):
        table.add_column(col, justify="right")
    for a in answers:
        table.add_row(a.condition, f"{a.exact_match:.3f}", f"{a.f1:.3f}", "-" if a.cited is None else f"{a.cited:.2f}",
                      f"{a.mean_prompt_tokens:.0f}", f"{a.seconds_per_answer:.2f}")
    out.print(table)
    if args.out:
        write_jsonl(args.out, [row for a in answers for row in a.rows])
    return 0
