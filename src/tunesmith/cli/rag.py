"""`tunesmith icl` (few-shot prompting, scored for several k) and `tunesmith rag index | ask | eval`.

Heavy libraries (torch, faiss, sentence-transformers) are imported inside the handlers, so `--help` stays fast.
"""

from __future__ import annotations

import argparse

from tunesmith.cli.device import add_device_arg, add_dtype_arg
from tunesmith.cli.paths import PathArg
from tunesmith.errors import ConfigError
from tunesmith.paths import Expect

DEFAULT_QUESTIONS = "data/pydoc_kb/questions.jsonl"


def _model_args(p: argparse.ArgumentParser, max_new_tokens: int) -> None:
    p.add_argument("--model", default=None, type=PathArg(Expect.MODEL),
                   help="builtin:NAME, a local HF folder or a hub id (default: the adapter's "
                   "base model, else builtin:smollm2-135m-instruct)")
    p.add_argument("--adapter", default=None, metavar="PATH", type=PathArg(Expect.FOLDER),
                   help="a fine-tuned adapter folder to answer with")
    add_dtype_arg(p)
    add_device_arg(p, "the model answers")
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help="the longest answer, in tokens")
    p.add_argument("--max-prompt-tokens", type=int, default=None,
                   help="prompt token budget (default: the model's context minus --max-new-tokens)")


def _int_list(value: str) -> list[int]:
    try:
        numbers = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r}: expected comma-separated whole numbers, e.g. 0,1,4,8") from None
    if not numbers or min(numbers) < 0:
        raise argparse.ArgumentTypeError(f"{value!r}: expected one or more numbers >= 0")
    return numbers


def register(sub) -> dict:
    icl = sub.add_parser("icl", help="few-shot prompting: score k = 0, 1, 4, ... examples in the prompt",
                         description="Put k training examples before each eval question (chat turns or plain text), "
                         "answer, and print exact match, token F1, prompt size and time per answer for each k.")
    icl.add_argument("--data", required=True, action="append", type=PathArg(Expect.DATA),
                     help="example pool (.jsonl/.parquet/.csv; alpaca, "
                     "sharegpt or messages format; repeatable)")
    icl.add_argument("--eval", required=True, type=PathArg(Expect.DATA),
                     help="questions with reference answers (same formats)")
    icl.add_argument("--k", type=_int_list, default=[0, 1, 4, 8], help="comma-separated shot counts (default 0,1,4,8)")
    icl.add_argument("--select", default="similar", choices=["fixed", "random", "similar"],
                     help="which examples: the first k, k at random (seeded), or the k nearest by embedding")
    icl.add_argument("--template", default="chat", choices=["chat", "text"],
                     help="chat: the tokenizer's chat template, one user/assistant turn pair per example; "
                     "text: plain 'Question: ... Answer: ...' blocks")
    icl.add_argument("--overflow", default="shorten", choices=["shorten", "drop"],
                     help="an example that does not fit the budget is shortened, or dropped")
    icl.add_argument("--format", default="auto", help="data format (auto, alpaca, sharegpt, messages)")
    icl.add_argument("--limit", type=int, default=None, help="use only the first N eval questions")
    icl.add_argument("--seed", type=int, default=0, help="seed of --select random's choice of examples")
    icl.add_argument("--out", default=None, type=PathArg(Expect.OUT_FILE),
                     help="write every prompt's answer and score to this JSONL file")
    _model_args(icl, 48)

    rag = sub.add_parser("rag", help="retrieval-augmented generation: index documents, ask, evaluate")
    rag_sub = rag.add_subparsers(dest="rag_command", required=True, metavar="SUBCOMMAND")
    index = rag_sub.add_parser("index", help="chunk, embed and store documents in a FAISS index (or add to one)",
                               description="Read .txt/.md/.rst/.jsonl files (folders are searched recursively), split "
                               "them into overlapping token windows, embed them and write INDEX atomically. Files "
                               "already indexed and unchanged are skipped; changed ones are re-indexed.")
    index.add_argument("docs", nargs="+", metavar="DOCS", type=PathArg(Expect.ENTRY), help="files or folders")
    index.add_argument("--out", required=True, metavar="INDEX", type=PathArg(Expect.OUT_FOLDER),
                       help="index folder (created, or added to)")
    index.add_argument("--chunk-tokens", type=int, default=None, help="tokens per chunk (default 200)")
    index.add_argument("--overlap-tokens", type=int, default=None,
                       help="tokens shared by neighbouring chunks (default 40)")
    index.add_argument("--embedding-model", default=None, type=PathArg(Expect.MODEL),
                       help="builtin:all-minilm-l6-v2 (default) or a sentence-transformers folder")
    index.add_argument("--quiet", action="store_true", help="no progress bar")

    ask = rag_sub.add_parser("ask", help="answer a question from the index, citing the sources")
    ask.add_argument("index", metavar="INDEX", type=PathArg(Expect.FOLDER),
                     help="index folder written by `tunesmith rag index`")
    ask.add_argument("question", metavar="QUESTION", help="the question to answer (quote it)")
    _retrieval_args(ask, top_k=3)
    ask.add_argument("--retrieve-only", action="store_true", help="print the sources without loading the LLM")
    _model_args(ask, 160)

    ev = rag_sub.add_parser("eval", help="recall@k and MRR of retrieval; answer F1 with and without retrieval")
    ev.add_argument("index", metavar="INDEX", type=PathArg(Expect.FOLDER),
                    help="index folder written by `tunesmith rag index`")
    ev.add_argument("--questions", default=DEFAULT_QUESTIONS, type=PathArg(Expect.DATA),
                    help=f"question set with gold sources (default {DEFAULT_QUESTIONS})")
    ev.add_argument("--ks", type=_int_list, default=[1, 3, 5, 10], help="recall cut-offs (default 1,3,5,10)")
    _retrieval_args(ev, top_k=3)
    ev.add_argument("--limit", type=int, default=None,
                    help="answer only N questions, evenly spread over the set (retrieval uses all)")
    ev.add_argument("--no-answers", action="store_true", help="score retrieval only (no LLM)")
    ev.add_argument("--out", default=None, type=PathArg(Expect.OUT_FILE),
                    help="write every answer and score to this JSONL file")
    _model_args(ev, 48)
    return {"icl": cmd_icl, "rag": cmd_rag}


def _retrieval_args(p: argparse.ArgumentParser, top_k: int) -> None:
    p.add_argument("--top-k", type=int, default=top_k, help=f"chunks put in the prompt (default {top_k})")
    p.add_argument("--expand", default="none", choices=["none", "keywords", "llm", "both"],
                   help="query expansion: add a keywords-only query, LLM rewrites, or both; results are fused")


def cmd_rag(args) -> int:
    from tunesmith.cli import rag_commands as commands

    return {"index": commands.cmd_index, "ask": commands.cmd_ask, "eval": commands.cmd_eval}[args.rag_command](args)


def cmd_icl(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from tunesmith.cli.output import progress_bar, write_jsonl
    from tunesmith.data.formats import normalize_all
    from tunesmith.data.sources import read_many, read_records
    from tunesmith.eval.fewshot import sweep
    from tunesmith.infer.adapters import adapter_context, load_with_adapter
    from tunesmith.infer.icl import ExampleSelector, examples_from_chats, prompt_budget

    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit {args.limit}: expected at least 1")
    pool = examples_from_chats(normalize_all(read_many(args.data), args.format)[1])
    questions = examples_from_chats(normalize_all(read_records(args.eval), args.format)[1])[:args.limit]
    console = Console(stderr=True)
    model, tokenizer = load_with_adapter(args.model, args.adapter, args.dtype, device=args.device)
    budget = prompt_budget(model, args.max_new_tokens, args.max_prompt_tokens)
    selector = ExampleSelector(pool, args.select, args.seed)
    with progress_bar(console) as progress:
        results = sweep(model, tokenizer, selector, questions, args.k, budget, args.template, args.overflow,
                        args.max_new_tokens, progress=progress, virtual=adapter_context(args.adapter).virtual(model))
    table = Table(title=f"few-shot ({args.select} examples, {args.template} template) on {len(questions)} questions "
                  f"of {args.eval}")
    for col in ("k", "exact match", "token F1", "mean prompt tokens", "s / answer", "shortened", "dropped"):
        table.add_column(col, justify="right")
    for r in results:
        table.add_row(str(r.k), f"{r.exact_match:.3f}", f"{r.f1:.3f}", f"{r.mean_prompt_tokens:.0f}",
                      f"{r.seconds_per_answer:.2f}", str(r.shortened), str(r.dropped))
    Console().print(table)
    for r in results:
        for label, key in (("shortened", "shortened"), ("dropped (over the token budget)", "dropped")):
            places = sorted({w for p in r.predictions for w in p[key]})
            if places:
                more = f" and {len(places) - 5} more" if len(places) > 5 else ""
                console.print(f"k={r.k}: examples {label}: {', '.join(places[:5])}{more}", markup=False,
                              soft_wrap=True)
    if args.out:
        write_jsonl(args.out, [p for r in results for p in r.predictions])
    return 0
