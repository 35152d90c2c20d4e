"""A grounded prompt (numbered sources, then the question) within the model's context, and a cited answer."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from tunesmith.errors import DataError
from tunesmith.infer.icl import count_tokens
from tunesmith.rag.retrieve import Hit, expand_query, retrieve

GROUNDED_SYSTEM = ("Answer the question using only the numbered sources. Cite the source of each fact with its "
                   "number in square brackets, like [1]. If the sources do not answer the question, say so.")


@dataclass
class GroundedPrompt:
    messages: list[dict]
    n_tokens: int
    sources: list[Hit]  # in prompt order: source [i] is sources[i - 1]
    dropped: list[Hit] = field(default_factory=list)  # retrieved, but over the token budget


@dataclass
class Answer:
    text: str
    prompt: GroundedPrompt
    queries: list[str]

    @property
    def cited(self) -> list[int]:
        """Source numbers the answer cites that exist in the prompt, in order of first citation."""
        numbers = [int(n) for n in re.findall(r"\[(\d+)\]", self.text)]
        valid = [n for n in numbers if 1 <= n <= len(self.prompt.sources)]
        return list(dict.fromkeys(valid))


def support(answer: str, source_text: str) -> float:
    """Share of the answer's distinct words (normalised as for token F1) that occur in the source: which
    source an answer drew on, whether or not the model cited it."""
    from tunesmith.eval.metrics import normalize_answer

    words = set(normalize_answer(answer).split())
    return len(words & set(normalize_answer(source_text).split())) / len(words) if words else 0.0


def source_label(chunk: dict) -> str:
    return f"{chunk['source']}, characters {chunk['start']}-{chunk['end']}"


def grounded_messages(question: str, sources: list[Hit], system: str | None = None) -> list[dict]:
    blocks = [f"[{i}] ({source_label(hit.chunk)})\n{hit.chunk['text'].strip()}" for i, hit in enumerate(sources, 1)]
    body = ("Sources:\n\n" + "\n\n".join(blocks) + "\n\n") if blocks else ""
    return [{"role": "system", "content": system or GROUNDED_SYSTEM},
            {"role": "user", "content": f"{body}Question: {question}"}]


def prompt_length(tokenizer, messages: list[dict]) -> int:
    from tunesmith.data.chat import ensure_chat_template, render

    ensure_chat_template(tokenizer)
    return count_tokens(tokenizer, render(tokenizer, messages, add_generation_prompt=True))


def build_grounded_prompt(tokenizer, question: str, hits: list[Hit], budget: int,
                          where: str = "the question") -> GroundedPrompt:
    """Sources in rank order while the prompt fits in `budget` tokens; one that does not fit is dropped (a
    later, shorter one may still fit). The question is never cut."""
    alone = prompt_length(tokenizer, grounded_messages(question, []))
    if alone > budget:
        raise DataError(f"{where}: the question makes a {alone}-token prompt even without sources, over the budget "
                        f"of {budget} tokens (the model's context minus --max-new-tokens, or --max-prompt-tokens); "
                        "shorten the question or raise the budget")
    kept, dropped, n = [], [], alone
    for hit in hits:
        trial = prompt_length(tokenizer, grounded_messages(question, kept + [hit]))
        if trial <= budget:
            kept.append(hit)
            n = trial
        else:
            dropped.append(hit)
    return GroundedPrompt(grounded_messages(question, kept), n, kept, dropped)


def ask(model, tokenizer, index, embedder, question: str, top_k: int = 4, expansion: str = "none",
        max_new_tokens: int = 128, budget: int = 2048, where: str = "the question", virtual=None) -> Answer:
    from tunesmith.infer.generate import generate_chat

    if not question.strip():
        raise DataError(f"{where}: the question is empty")
    queries = expand_query(question, expansion, model, tokenizer, virtual)
    hits = retrieve(index, embedder, queries, top_k)
    prompt = build_grounded_prompt(tokenizer, question, hits, budget, where)
    text = generate_chat(model, tokenizer, prompt.messages, max_new_tokens, virtual=virtual)
    return Answer(text, prompt, queries)


def answer_without_retrieval(model, tokenizer, question: str, max_new_tokens: int = 128, virtual=None) -> str:
    """The baseline: the bare question as the user's turn."""
    from tunesmith.infer.generate import generate_chat

    return generate_chat(model, tokenizer, [{"role": "user", "content": question}], max_new_tokens, virtual=virtual)
