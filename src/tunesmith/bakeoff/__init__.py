"""The bake-off: each candidate (zero-shot, few-shot, RAG, each training method) tried on a held-out slice within a
time budget, the table and the pick written as bakeoff.md/.json/.png. It orchestrates training, retrieval and
evaluation, so it sits above train and rag and below the CLI; `tunesmith advise --bake-off` parses its arguments and
calls `bake_off`."""

from __future__ import annotations

from pathlib import Path

CANDIDATES = ("zero-shot", "few-shot", "rag", "lora", "qlora", "prompt", "full")
MORE_CANDIDATES = ("loha", "lokr", "vera")  # LoRA's relatives: tried when --candidates names them, not by default


def bake_off(cfg, names, docs, k, steps, n_questions, max_new_tokens, memory_budget, budget_s, out_dir: Path,
             quiet: bool = True):
    """Run the named candidates (some of CANDIDATES) over `cfg`'s data; returns (result, paths written)."""
    from tunesmith.bakeoff.candidates import Shared, all_candidates, questions_and_pool
    from tunesmith.plan.bakeoff import run_bakeoff, write_bakeoff

    questions, pool = questions_and_pool(cfg, n_questions)
    shared = Shared(cfg, out_dir, questions, pool, max_new_tokens, quiet)
    candidates = all_candidates(shared, names, docs, k, steps, memory_budget)
    result = run_bakeoff(candidates, budget_s, progress=not quiet)
    return result, write_bakeoff(result, out_dir)
