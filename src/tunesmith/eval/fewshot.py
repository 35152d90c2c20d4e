"""Score few-shot prompting for several k on an eval set: exact match, token F1, prompt size, time per answer."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from tunesmith.eval.metrics import exact_match, mean, token_f1
from tunesmith.infer.icl import Example, ExampleSelector, build_prompt, generate_text


@dataclass
class FewShotResult:
    k: int
    exact_match: float
    f1: float
    mean_prompt_tokens: float
    seconds_per_answer: float
    shortened: int  # examples shortened to fit the budget, over all questions
    dropped: int
    predictions: list[dict] = field(default_factory=list)


def answer_one(model, tokenizer, question: Example, shots: list[Example], budget: int, template: str,
               overflow: str, max_new_tokens: int, system: str | None = None, virtual=None):
    from tunesmith.infer.generate import generate_chat

    prompt = build_prompt(tokenizer, question, shots, budget, template, overflow, system)
    if template == "text":
        answer = generate_text(model, tokenizer, prompt.text, max_new_tokens)
    else:
        answer = generate_chat(model, tokenizer, prompt.messages, max_new_tokens, virtual=virtual)
    return prompt, answer


def sweep(model, tokenizer, selector: ExampleSelector, questions: list[Example], ks: list[int], budget: int,
          template: str = "chat", overflow: str = "shorten", max_new_tokens: int = 48, system: str | None = None,
          progress=None, virtual=None) -> list[FewShotResult]:
    """One row per k, every k on the same questions."""
    results = []
    for k in ks:
        task = progress.add_task(f"k={k}", total=len(questions)) if progress else None
        scores, f1s, tokens, shortened, dropped, predictions = [], [], [], 0, 0, []
        started = time.perf_counter()
        for number, question in enumerate(questions):
            shots = selector.select(question, k, number)
            prompt, answer = answer_one(model, tokenizer, question, shots, budget, template, overflow,
                                        max_new_tokens, system, virtual)
            scores.append(exact_match(answer, question.answer))
            f1s.append(token_f1(answer, question.answer))
            tokens.append(prompt.n_tokens)
            shortened += len(prompt.shortened)
            dropped += len(prompt.dropped)
            predictions.append({"k": k, "where": question.where, "question": question.query_text,
                                "reference": question.answer, "answer": answer, "prompt_tokens": prompt.n_tokens,
                                "examples": prompt.used, "shortened": prompt.shortened, "dropped": prompt.dropped})
            if progress:
                progress.advance(task)
        elapsed = time.perf_counter() - started
        results.append(FewShotResult(k, mean(scores), mean(f1s), mean(tokens), elapsed / max(1, len(questions)),
                                     shortened, dropped, predictions))
    return results
