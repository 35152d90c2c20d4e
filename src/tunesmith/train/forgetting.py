"""General-text forgetting: the model's perplexity on a fixed general corpus (not the training data) before and
after training, so that every run shows what its specialisation cost in general ability."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

from tunesmith.data.chat import Tokenized
from tunesmith.data.formats import normalize_all
from tunesmith.data.sources import read_many
from tunesmith.errors import DataError


def default_corpus() -> str:
    return str(resources.files("tunesmith.eval") / "general_text.jsonl")


@dataclass
class ForgettingProbe:
    corpus: str
    examples: list[Tokenized]
    seconds: float = 0.0  # spent scoring the corpus in this process (before and after training)

    @property
    def tokens(self) -> int:
        return sum(len(ex) for ex in self.examples)


def probe_for(cfg, tokenizer) -> ForgettingProbe | None:
    """The corpus's first `max_tokens` tokens, split evenly between its records and cut into windows of at most
    data.max_length tokens; None when `report.forgetting` is off or the objective has no LM loss to score."""
    settings = cfg.report.forgetting
    if settings is None or not cfg.objective_declaration.lm_loss:
        return None
    corpus = settings.corpus or default_corpus()
    fmt, docs = normalize_all(read_many(corpus), "auto")
    if fmt != "text" or not docs:
        raise DataError(f"report.forgetting.corpus: {corpus} must hold {{\"text\": ...}} records (found "
                        f"{'none' if not docs else fmt + ' records'})")
    share = settings.max_tokens // len(docs)
    window = cfg.data.max_length
    examples = []
    for doc in docs:
        ids = list(tokenizer(doc.text)["input_ids"])[:share]
        for start in range(0, len(ids), window):
            piece = ids[start:start + window]
            if len(piece) > 1:
                examples.append(Tokenized(piece, list(piece), f"{doc.where}@{start}"))
    if not examples:
        raise DataError(f"report.forgetting.max_tokens: {settings.max_tokens} tokens over {len(docs)} records of "
                        f"{corpus} leave no record two tokens to score; raise it")
    return ForgettingProbe(corpus, examples)


def forgetting_facts(probe: ForgettingProbe, before: float | None, after: float) -> dict:
    change = f" ({(after - before) / before * 100:+.1f} %)" if before else ""
    before_s = f"{before:.3f} before, " if before else ""
    return {"forgetting": f"general-text perplexity {before_s}{after:.3f} after{change} on {probe.tokens} tokens of "
                          f"{probe.corpus} (measuring it took {probe.seconds:.1f} s)"}
