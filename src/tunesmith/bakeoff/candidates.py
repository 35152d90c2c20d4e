"""The bake-off's candidates as (probe, run) pairs over the real machinery: the base model answering as it is
(zero-shot), with k examples (few-shot, eval/fewshot.py), with retrieved sources (RAG, rag/), and trained by each
method through the training loop. Every number a candidate returns is one its own run computed: the held-out loss and
forgetting from its training run's summary.json, exact match / token F1 from its answers."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from tunesmith.config import RunConfig
from tunesmith.plan.bakeoff import Candidate

TRAIN_METHODS = {"lora": {"name": "lora", "r": 8, "alpha": 16}, "qlora": {"name": "qlora", "r": 8, "alpha": 16},
                 "prompt": {"name": "prompt", "num_virtual_tokens": 8}, "full": {"name": "full"},
                 "loha": {"name": "loha", "r": 4, "alpha": 8}, "lokr": {"name": "lokr", "r": 8, "alpha": 16},
                 "vera": {"name": "vera"}}
# a short run: rates that move it
TRAIN_LR = {"lora": 1e-3, "qlora": 1e-3, "prompt": 3e-2, "full": 2e-5, "loha": 1e-2, "lokr": 1e-2, "vera": 3e-2}


@dataclass
class Shared:
    """What the candidates share: the base config, the held-out questions, the base model (loaded once), timings."""
    cfg: RunConfig
    out_dir: Path
    questions: list
    pool: list
    max_new_tokens: int
    quiet: bool
    base: tuple | None = None
    seconds_per_answer: float | None = None
    base_perplexity: float | None = None
    cache: dict = field(default_factory=dict)

    def model(self):
        """The base model and its tokenizer, on the run config's train.device as the trained candidates are."""
        if self.base is None:
            self.base = load_answering(self.cfg, self.cfg.model.path)
        return self.base


def load_answering(cfg: RunConfig, model_path: str, adapter: str | None = None) -> tuple:
    """(model, tokenizer) that answers the held-out questions: on train.device, where the candidates train."""
    from tunesmith.infer.adapters import load_with_adapter

    return load_with_adapter(model_path, adapter, device=cfg.train.device)


def _scores(answers: list[str], questions: list) -> tuple[float, float]:
    from tunesmith.eval.metrics import exact_match, mean, token_f1

    return (mean(exact_match(a, q.answer) for a, q in zip(answers, questions)),
            mean(token_f1(a, q.answer) for a, q in zip(answers, questions)))


def _answer_all(shared: Shared, answer_one, questions) -> list[str]:
    started = time.perf_counter()
    answers = [answer_one(q) for q in questions]
    shared.seconds_per_answer = (time.perf_counter() - started) / max(1, len(questions))
    return answers


def _inference_peak(shared: Shared) -> int:
    from tunesmith.plan.architectures import resolve
    from tunesmith.plan.memory import sum_base
    from tunesmith.plan.runtime import runtime_overhead

    return sum_base(resolve(shared.cfg.model.path)) * 4 + runtime_overhead()


def _probe_answers(shared: Shared, answer_one) -> float:
    """Answer one question, timed; the plan: that time for each question."""
    started = time.perf_counter()
    answer_one(shared.questions[0])
    shared.seconds_per_answer = time.perf_counter() - started
    return shared.seconds_per_answer * len(shared.questions)


def _inference_candidate(name: str, shared: Shared, make_answer) -> Candidate:
    def run() -> dict:
        answer_one = make_answer()
        em, f1 = _scores(_answer_all(shared, answer_one, shared.questions), shared.questions)
        out = {"exact_match": em, "f1": f1, "forgetting_pct": 0.0, "peak_bytes": _inference_peak(shared),
               "trainable": 0}
        if name == "zero-shot":
            out["eval_loss"] = _base_loss(shared)
        return out

    return Candidate(name, lambda: _probe_answers(shared, make_answer()), run)


def _base_loss(shared: Shared) -> float:
    """The untouched model's held-out loss, scored as the training runs score theirs (train/run.py evaluate)."""
    from tunesmith.data.pipeline import build_datasets
    from tunesmith.objectives import lm
    from tunesmith.context import RunContext
    from tunesmith.train.run import evaluate

    model, tokenizer = shared.model()
    data = build_datasets(shared.cfg, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return evaluate(model, lm, data.eval, shared.cfg, model.device, pad, RunContext())["loss"]


def zero_shot(shared: Shared) -> Candidate:
    from tunesmith.infer.generate import generate_chat

    def make():
        model, tokenizer = shared.model()
        return lambda q: generate_chat(model, tokenizer, q.messages, shared.max_new_tokens)

    return _inference_candidate("zero-shot", shared, make)


def few_shot(shared: Shared, k: int) -> Candidate:
    from tunesmith.eval.fewshot import answer_one
    from tunesmith.infer.icl import ExampleSelector, prompt_budget

    def make():
        model, tokenizer = shared.model()
        selector = ExampleSelector(shared.pool, "fixed")
        budget = prompt_budget(model, shared.max_new_tokens, 1024)
        return lambda q: answer_one(model, tokenizer, q, selector.select(q, k), budget, "chat", "shorten",
                                    shared.max_new_tokens, q.system)[1]

    return _inference_candidate(f"few-shot (k={k})", shared, make)


def rag(shared: Shared, docs: str, top_k: int = 3) -> Candidate:
    def make():
        if "rag" not in shared.cache:
            from tunesmith.infer.embedding import load_embedder
            from tunesmith.rag.chunking import DEFAULT_CHUNK_TOKENS, DEFAULT_OVERLAP_TOKENS
            from tunesmith.rag.documents import collect
            from tunesmith.rag.index import RagIndex

            embedder = load_embedder()
            index = RagIndex.new(embedder.name, embedder.dim, DEFAULT_CHUNK_TOKENS, DEFAULT_OVERLAP_TOKENS)
            index.add(collect([docs]), embedder)
            shared.cache["rag"] = (index, embedder)
        from tunesmith.rag.ask import ask

        index, embedder = shared.cache["rag"]
        model, tokenizer = shared.model()
        return lambda q: ask(model, tokenizer, index, embedder, q.query_text, top_k, "none", shared.max_new_tokens,
                             1024, q.where).text

    return _inference_candidate(f"RAG (top {top_k})", shared, make)


def _variant(shared: Shared, method: str, steps: int, folder: Path, probe: bool) -> RunConfig:
    tree = shared.cfg.model_dump()
    tree["method"] = TRAIN_METHODS[method]
    tree["train"].update(max_steps=steps, lr=TRAIN_LR[method], warmup_steps=0 if probe else min(2, steps - 1))
    tree["report"] = {"compare": not probe, "heldout_samples": 0, "trained_samples": 0,
                      "forgetting": None if probe else tree["report"]["forgetting"]}
    tree["output_dir"] = str(folder)
    return RunConfig.model_validate(tree)


def trained(shared: Shared, method: str, steps: int, memory_budget: int | None = None) -> Candidate:
    """A training run of `method` for `steps` steps, then answers from the trained model."""
    from tunesmith.plan.memory import gib, predict

    folder = shared.out_dir / method
    planned_peak = predict(_variant(shared, method, steps, folder, False)).peak
    skip = None
    if memory_budget is not None and planned_peak > memory_budget:
        skip = f"planned peak {gib(planned_peak)} does not fit --budget-memory {gib(memory_budget)}"

    def probe() -> float:
        from tunesmith.train.loop import train

        started = time.perf_counter()
        result = train(_variant(shared, method, 1, shared.out_dir / f".probe-{method}", True), overwrite=True,
                       quiet=True)
        setup = time.perf_counter() - started - result.seconds
        per_answer = shared.seconds_per_answer or 2.0
        # setup + the steps + two held-out evaluations and two forgetting passes (about a step each) + answers
        return setup * 2 + result.seconds * (steps + 4) + per_answer * len(shared.questions)

    def run() -> dict:
        from tunesmith.context import RunContext
        from tunesmith.infer.adapters import adapter_context
        from tunesmith.infer.generate import generate_chat
        from tunesmith.train.loop import train

        result = train(_variant(shared, method, steps, folder, False), overwrite=True, quiet=True)
        summary = json.loads((result.run_dir / "summary.json").read_text())
        if (result.run_dir / "model").is_dir():
            model, tokenizer = load_answering(shared.cfg, str(result.run_dir / "model"))
            ctx = RunContext()
        else:
            model, tokenizer = load_answering(shared.cfg, None, str(result.run_dir / "adapter"))
            ctx = adapter_context(str(result.run_dir / "adapter"))
        virtual = ctx.virtual(model)
        answers = _answer_all(shared, lambda q: generate_chat(model, tokenizer, q.messages, shared.max_new_tokens,
                                                              virtual=virtual), shared.questions)
        em, f1 = _scores(answers, shared.questions)
        forgetting = summary.get("forgetting") or {}
        before, after = forgetting.get("perplexity_before"), forgetting.get("perplexity_after")
        return {"eval_loss": summary["eval_after"], "exact_match": em, "f1": f1,
                "forgetting_pct": (after - before) / before * 100 if before and after else None,
                "peak_bytes": planned_peak, "trainable": summary["trainable"],
                "source": str(result.run_dir / "summary.json")}

    return Candidate(method if method != "full" else "full fine-tuning", probe, run, skip)


def questions_and_pool(cfg: RunConfig, n_questions: int) -> tuple[list, list]:
    """The held-out questions (the config's eval slice, the first n) and the few-shot pool (the train items)."""
    from tunesmith.data.pipeline import split_items
    from tunesmith.errors import DataError
    from tunesmith.infer.icl import examples_from_chats

    _, train_items, eval_items = split_items(cfg)
    if not eval_items:
        raise DataError("--bake-off needs held-out pairs: give --eval FILE or a data set with more than a few records")
    return examples_from_chats(eval_items[:n_questions]), examples_from_chats(train_items)


def all_candidates(shared: Shared, names: list[str], docs: str | None, k: int, steps: int,
                   memory_budget: int | None) -> list[Candidate]:
    out = []
    for name in names:
        if name == "zero-shot":
            out.append(zero_shot(shared))
        elif name == "few-shot":
            out.append(few_shot(shared, k))
        elif name == "rag":
            if docs is None:
                out.append(Candidate("RAG", lambda: math.inf, dict, "no --docs given: nothing to retrieve from"))
            else:
                out.append(rag(shared, docs))
        else:
            out.append(trained(shared, name, steps, memory_budget))
    return out
