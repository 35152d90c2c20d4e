"""Few-shot in-context learning: pick k examples (fixed, seeded random, or nearest by embedding) and put them
before the question, as alternating chat turns (the tokenizer's template) or as a plain Question/Answer text,
within a token budget. Examples are shortened or dropped to fit, and the prompt says which; the question is
never cut: if it alone does not fit, that is an error."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from tunesmith.data.chat import ensure_chat_template, render
from tunesmith.errors import ConfigError, DataError

SELECTIONS = ("fixed", "random", "similar")
TEMPLATES = ("chat", "text")
OVERFLOW = ("shorten", "drop")
MIN_SHORTENED_TOKENS = 8  # a turn is never cut shorter than this: it would say too little
ELLIPSIS = " …"


@dataclass
class Example:
    messages: list[dict]  # the turns before the answer (user first; no system turn)
    answer: str
    where: str
    system: str | None = None

    @property
    def query_text(self) -> str:
        return "\n".join(m["content"] for m in self.messages if m["role"] == "user")


@dataclass
class FewShotPrompt:
    messages: list[dict] | None  # chat template: what generate_chat takes
    text: str  # the exact text given to the model
    n_tokens: int
    used: list[str] = field(default_factory=list)  # where each example came from, in prompt order
    shortened: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)

    def note(self) -> str:
        parts = [f"{len(self.used)} example(s), {self.n_tokens} prompt tokens"]
        if self.shortened:
            parts.append("shortened to fit: " + ", ".join(self.shortened))
        if self.dropped:
            parts.append("dropped (over the token budget): " + ", ".join(self.dropped))
        return "; ".join(parts)


def examples_from_chats(chats: list) -> list[Example]:
    """Each chat (from tunesmith.data.formats) → the turns before its last assistant turn, and that answer."""
    out = []
    for chat in chats:
        if not hasattr(chat, "messages"):
            raise DataError(f"{chat.where}: few-shot examples need question/answer records (alpaca, sharegpt or "
                            "messages format), not plain text")
        msgs = chat.messages
        system = msgs[0]["content"] if msgs[0]["role"] == "system" else None
        last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        turns = [m for m in msgs[:last] if m["role"] != "system"]
        if not turns:
            raise DataError(f"{chat.where}: the answer has no question before it")
        out.append(Example(turns, msgs[last]["content"], chat.where, system))
    return out


def _text_block(example: Example, with_answer: bool) -> str:
    block = f"Question: {example.query_text}\nAnswer:"
    return f"{block} {example.answer}\n\n" if with_answer else block


def render_prompt(tokenizer, question: Example, shots: list[Example], template: str = "chat",
                  system: str | None = None) -> tuple[list[dict] | None, str]:
    """Shots in the order given, then the question: (messages or None, rendered text)."""
    if template == "text":
        return None, "".join(_text_block(s, True) for s in shots) + _text_block(question, False)
    ensure_chat_template(tokenizer)
    system = system if system is not None else question.system
    messages = [{"role": "system", "content": system}] if system else []
    for shot in shots:
        messages += [dict(m) for m in shot.messages] + [{"role": "assistant", "content": shot.answer}]
    messages += [dict(m) for m in question.messages]
    return messages, render(tokenizer, messages, add_generation_prompt=True)


def count_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def _cut(tokenizer, text: str, n_tokens: int) -> str:
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return text if len(ids) <= n_tokens else tokenizer.decode(ids[:n_tokens]).rstrip() + ELLIPSIS


def _shortened(tokenizer, example: Example, fraction: float) -> Example:
    """Every turn and the answer cut to `fraction` of its tokens, but never below MIN_SHORTENED_TOKENS (turns
    shorter than that stay whole)."""
    def cut(text: str) -> str:
        total = count_tokens(tokenizer, text)
        keep = max(MIN_SHORTENED_TOKENS, int(total * fraction))
        return text if keep >= total else _cut(tokenizer, text, keep)

    return Example([dict(m, content=cut(m["content"])) for m in example.messages], cut(example.answer),
                   example.where, example.system)


def build_prompt(tokenizer, question: Example, shots: list[Example], budget: int, template: str = "chat",
                 overflow: str = "shorten", system: str | None = None) -> FewShotPrompt:
    """`shots` in priority order (most wanted first). Each is kept whole if the full prompt still fits in
    `budget` tokens, else shortened (largest fraction that fits, found by bisection) or dropped. The most
    wanted example is placed last, right before the question."""
    if template not in TEMPLATES:
        raise ConfigError(f"--template {template}: expected one of {', '.join(TEMPLATES)}")
    if overflow not in OVERFLOW:
        raise ConfigError(f"--overflow {overflow}: expected one of {', '.join(OVERFLOW)}")

    def measure(chosen: list[Example]) -> tuple[list[dict] | None, str, int]:
        messages, text = render_prompt(tokenizer, question, list(reversed(chosen)), template, system)
        return messages, text, count_tokens(tokenizer, text)

    messages, text, n = measure([])
    if n > budget:
        raise DataError(f"{question.where}: the question alone makes a {n}-token prompt, over the budget of {budget} "
                        "tokens (the model's context minus --max-new-tokens, or --max-prompt-tokens); the question is "
                        "never cut: shorten it or raise the budget")
    chosen, shortened, dropped = [], [], []
    for shot in shots:
        trial = measure(chosen + [shot])
        if trial[2] <= budget:
            chosen.append(shot)
            messages, text, n = trial
            continue
        fitted = _fit_shortened(tokenizer, shot, chosen, measure, budget) if overflow == "shorten" else None
        if fitted is None:
            dropped.append(shot.where)
            continue
        chosen.append(fitted[0])
        shortened.append(shot.where)
        messages, text, n = fitted[1]
    return FewShotPrompt(messages, text, n, [s.where for s in reversed(chosen)], shortened, dropped)


def _fit_shortened(tokenizer, shot: Example, chosen: list[Example], measure, budget: int):
    """(shortened example, its measured prompt) for the largest fraction that fits, or None."""
    best, low, high = None, 0.0, 1.0
    for _ in range(10):
        middle = (low + high) / 2
        candidate = _shortened(tokenizer, shot, middle)
        trial = measure(chosen + [candidate])
        if trial[2] <= budget:
            best, low = (candidate, trial), middle
        else:
            high = middle
    if best is None:  # even the shortest cut may fit
        candidate = _shortened(tokenizer, shot, 0.0)
        trial = measure(chosen + [candidate])
        best = (candidate, trial) if trial[2] <= budget else None
    return best


class ExampleSelector:
    """Chooses the shots for a query from a pool: 'fixed' (the first k), 'random' (seeded per query) or
    'similar' (nearest by embedding cosine similarity, via FAISS)."""

    def __init__(self, pool: list[Example], how: str = "fixed", seed: int = 0, embedder=None):
        if how not in SELECTIONS:
            raise ConfigError(f"--select {how}: expected one of {', '.join(SELECTIONS)}")
        if not pool:
            raise DataError("the example pool is empty; --data must hold at least one question/answer record")
        self.pool, self.how, self.seed = pool, how, seed
        self.index = self.embedder = None
        if how == "similar":
            import faiss

            from tunesmith.infer.embedding import load_embedder

            self.embedder = embedder or load_embedder()
            vectors = self.embedder.encode([e.query_text for e in pool])
            self.index = faiss.IndexFlatIP(vectors.shape[1])
            self.index.add(vectors)

    def select(self, query: Example, k: int, query_number: int = 0) -> list[Example]:
        """Up to k examples in priority order (for 'similar': the nearest first)."""
        k = min(k, len(self.pool))
        if k <= 0:
            return []
        if self.how == "fixed":
            return self.pool[:k]
        if self.how == "random":
            return random.Random(f"{self.seed}:{query_number}").sample(self.pool, k)
        _, ids = self.index.search(self.embedder.encode([query.query_text]), k)
        return [self.pool[i] for i in ids[0] if i >= 0]


def prompt_budget(model, max_new_tokens: int, max_prompt_tokens: int | None = None) -> int:
    """The prompt's token budget: the model's context minus the answer's room, capped by max_prompt_tokens."""
    context = getattr(model.config, "max_position_embeddings", None) or 2048
    budget = context - max_new_tokens
    if max_prompt_tokens is not None:
        budget = min(budget, max_prompt_tokens)
    if budget < 1:
        raise ConfigError(f"--max-new-tokens {max_new_tokens}: leaves no room for a prompt in the model's "
                          f"{context}-token context")
    return budget


def generate_text(model, tokenizer, text: str, max_new_tokens: int = 64, stop: str = "\nQuestion:") -> str:
    """Greedy continuation of a plain-text prompt, stopped at the next "Question:" block."""
    import torch

    enc = tokenizer(text, add_special_tokens=False, return_tensors="pt")
    device = next(model.parameters()).device
    model.eval()
    with torch.no_grad():
        out = model.generate(input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device),
                             max_new_tokens=max_new_tokens, do_sample=False, temperature=None, top_p=None,
                             top_k=None, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                             stop_strings=[stop], tokenizer=tokenizer)
    answer = tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return answer.split(stop.strip())[0].strip()
