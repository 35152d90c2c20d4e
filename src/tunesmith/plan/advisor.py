"""`tunesmith advise` without running anything: which method and objective fit the user's data, goal and budgets,
with the reasons, the planner's memory line, and the runners-up with why not.

The rules, in order (each a sentence of the seeds' advice made concrete):
- preference pairs (prompt, chosen, rejected) → LoRA + DPO: the pairs say how to respond, DPO learns from them
  directly (no reward model, no rollouts);
- goal knowledge with documents → RAG: knowledge that changes belongs in an index, not in the weights;
- question/answer pairs, fewer than FEW_SHOT_MAX → few-shot prompting: too few to train on without memorising them;
- raw text (documents as {text} records) → LoRA + continued pretraining (objective text);
- pairs → LoRA + SFT; full fine-tuning only with FULL_MIN examples or more and when it fits the memory budget.
Then the budgets: a training pick over --budget-memory steps down LoRA → QLoRA → prompt tuning (each planned by
plan/memory.py); over --budget-time (one epoch at an assumed CPU rate) it trains for the steps that fit, and falls
back to few-shot when not even MIN_STEPS fit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from tunesmith.config import RunConfig
from tunesmith.data.formats import detect_format
from tunesmith.data.sources import read_many
from tunesmith.errors import ConfigError, DataError

GOALS = ("knowledge", "behaviour", "format", "style")
FEW_SHOT_MAX = 32  # fewer pairs than this: prompt with them rather than train on them
FULL_MIN = 20_000  # full fine-tuning only with this many examples (below it LoRA matches it and forgets less)
MIN_STEPS = 20
CHARS_PER_TOKEN = 4  # a rough English/code average, for sizing without loading a tokenizer
# LoRA training throughput assumed without a probe (tokens/s), measured with SmolLM2-135M on a 2-core Intel Xeon
# Sapphire Rapids (docs/how-to/choose-a-method.md); --bake-off measures the real rate instead. Larger models: scaled
# by parameters.
ASSUMED_TOKENS_PER_S = 700.0
ASSUMED_AT_PARAMETERS = 134_515_008  # SmolLM2-135M
DOC_SUFFIXES = (".md", ".rst", ".txt", ".html", ".htm", ".jsonl")
KINDS = {"alpaca": "pairs", "sharegpt": "pairs", "messages": "pairs", "preference": "preferences", "text": "raw text"}


@dataclass
class DataProfile:
    kind: str  # pairs | preferences | raw text | none
    format: str
    records: int
    approx_tokens: int
    documents: int = 0  # files under --docs
    document_chars: int = 0

    def describe(self) -> str:
        parts = [f"{self.records:,} {self.kind} records ({self.format}, ~{self.approx_tokens:,} tokens)"
                 if self.records else "no training data"]
        if self.documents:
            parts.append(f"{self.documents} documents ({self.document_chars:,} characters)")
        return "; ".join(parts)


@dataclass
class Choice:
    method: str  # zero-shot | few-shot | rag | a training method name
    objective: str | None
    why: str


@dataclass
class Recommendation:
    pick: Choice
    reasons: list[str]
    memory_line: str
    runners_up: list[Choice] = field(default_factory=list)
    profile: DataProfile | None = None
    settings: dict = field(default_factory=dict)  # config overrides the pick implies (train.max_steps, ...)

    def as_dict(self) -> dict:
        return {"method": self.pick.method, "objective": self.pick.objective, "reasons": self.reasons,
                "memory": self.memory_line, "settings": self.settings, "data": self.profile.describe(),
                "runners_up": [{"method": c.method, "objective": c.objective, "why_not": c.why}
                               for c in self.runners_up]}


def profile_data(data: str | None, docs: str | None) -> DataProfile:
    """What the data is (pairs, preferences, raw text) and how much of it, and how many documents --docs holds."""
    if data is None:
        profile = DataProfile("none", "-", 0, 0)
    else:
        records = read_many(data)
        if not records:
            raise DataError(f"{data}: no records")
        fmt = detect_format(records[0])
        chars = sum(len(str(v)) for r in records for v in r.fields.values())
        profile = DataProfile(KINDS[fmt], fmt, len(records), chars // CHARS_PER_TOKEN)
    if docs is not None:
        root = Path(docs)
        if not root.exists():
            raise ConfigError(f"--docs {docs}: no such file or folder")
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.suffix.lower() in DOC_SUFFIXES)
        profile.documents = len(files)
        profile.document_chars = sum(p.stat().st_size for p in files)
    return profile


def parse_duration(text: str) -> float:
    """'30m', '2h', '90s', '45' (seconds) → seconds."""
    import re

    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(s|m|min|h)?\s*", text or "")
    if not match:
        raise ConfigError(f"--budget-time {text!r}: expected a duration such as 30m, 2h or 90s")
    return float(match.group(1)) * {None: 1, "s": 1, "m": 60, "min": 60, "h": 3600}[match.group(2)]


def _planned(cfg: RunConfig, method: str, objective: str) -> tuple[int, str]:
    """The planner's peak and its one line for `cfg` switched to `method` and `objective`."""
    from tunesmith.plan.memory import predict
    from tunesmith.plan.report import plan_line

    tree = cfg.model_dump()
    tree["method"] = {"name": method}
    tree["objective"] = objective
    for section in ("dpo", "reward", "ppo"):
        tree.pop(section, None)
    memory = predict(RunConfig.model_validate(tree))
    return memory.peak, plan_line(memory)


def _first_pick(p: DataProfile, goal: str) -> tuple[Choice, list[str], list[Choice]]:
    """The rule-based pick with its reasons and the runners-up, before the budgets."""
    if p.kind == "preferences":
        return (Choice("lora", "dpo", "preference pairs"),
                [f"the data is {p.records:,} preference pairs (prompt, chosen, rejected): they say how the model "
                 "should respond, and DPO learns that from the pairs directly", "LoRA: a few MB of trainable "
                 "parameters, the base stays intact (little forgetting)"],
                [Choice("lora", "reward", "a reward model + PPO would reach the same from these pairs with a second "
                        "model and sampled rollouts: slower and less stable on CPU"),
                 Choice("lora", "sft", "SFT on the chosen answers ignores what the rejected answers teach")])
    if goal == "knowledge" and p.documents:
        runners = [Choice("few-shot", None, "examples show the answer's form, not the facts in the documents")]
        if p.kind == "pairs":
            runners.insert(0, Choice("lora", "sft", "bakes the facts into the weights: stale when the documents "
                                     "change, costs training, and forgets general text"))
        runners.append(Choice("lora", "text", "continued pretraining on the documents absorbs facts slowly and "
                              "has to be redone when they change"))
        return (Choice("rag", None, "knowledge with documents"),
                [f"goal knowledge with {p.documents} documents: knowledge that changes belongs in a retrieval index "
                 "(RAG), answers cite their sources and stay current when the documents change",
                 "no training: nothing is forgotten"], runners)
    if p.kind == "pairs" and p.records < FEW_SHOT_MAX:
        return (Choice("few-shot", None, "few pairs"),
                [f"only {p.records} pairs: too few to train on without memorising them; as few-shot examples in "
                 "the prompt they show the model the task at once"],
                [Choice("lora", "sft", f"{p.records} examples < {FEW_SHOT_MAX}: training would overfit them"),
                 Choice("zero-shot", None, "ignores the examples you have")])
    if p.kind == "raw text":
        return (Choice("lora", "text", "raw text"),
                [f"the data is {p.records:,} raw documents (~{p.approx_tokens:,} tokens): continued pretraining "
                 "(objective text) teaches their vocabulary, facts and style", "LoRA keeps the base intact"],
                [Choice("full", "text", "updates every weight: the most forgetting of general text, and the most "
                        "memory"), Choice("rag", None, "give the documents as --docs with goal knowledge to retrieve "
                                          "from them instead of training")])
    if p.kind == "pairs":
        reasons = [f"{p.records:,} question/answer pairs teach the {goal} of the answers (objective sft, loss on "
                   "the answers only)"]
        runners = [Choice("qlora", "sft", "the same adapter over a 4-bit base: less memory, slower steps on CPU, "
                          "needed only when LoRA does not fit"),
                   Choice("prompt", "sft", "trains only virtual tokens: the least memory, but weaker than LoRA "
                          "at changing behaviour"),
                   Choice("few-shot", None, f"with {p.records:,} pairs, training uses all of them; a prompt holds "
                          "a few")]
        if p.records >= FULL_MIN:
            reasons.append(f"{p.records:,} examples ≥ {FULL_MIN:,}: enough to consider full fine-tuning")
            return Choice("full", "sft", "many pairs"), reasons, [Choice("lora", "sft", "fewer trainable "
                                                                         "parameters, but at this data size full "
                                                                         "fine-tuning can use them")] + runners
        reasons.append(f"LoRA: below {FULL_MIN:,} examples it matches full fine-tuning and forgets less")
        return Choice("lora", "sft", "pairs"), reasons, [Choice("full", "sft", f"{p.records:,} examples < "
                                                                f"{FULL_MIN:,}: all weights for little gain, the most "
                                                                "forgetting")] + runners
    if p.documents:
        return (Choice("rag", None, "documents only"), [f"no training data, {p.documents} documents: retrieve from "
                                                        "them (RAG)"], [Choice("zero-shot", None, "ignores them")])
    return (Choice("zero-shot", None, "nothing to learn from"), ["no data and no documents: the model as it is"], [])


def _fit_memory(cfg: RunConfig, pick: Choice, reasons: list, runners: list, budget: int | None) -> str:
    """Step a training pick down (full → lora → qlora → prompt) until the planner says it fits the budget."""
    from tunesmith.plan.memory import gib

    if pick.objective is None:
        return "no training: the model's weights only (the planner's inference peak is its loading line)"
    ladder = ["full", "lora", "qlora", "prompt"]
    tried = ladder[ladder.index(pick.method):] if pick.method in ladder else [pick.method]
    for method in tried:
        peak, line = _planned(cfg, method, pick.objective)
        if budget is None or peak <= budget:
            if method != pick.method:
                runners.insert(0, Choice(pick.method, pick.objective, f"does not fit --budget-memory "
                                         f"{gib(budget)} (planned peak {gib(_planned(cfg, pick.method, pick.objective)[0])})"))
                reasons.append(f"{method}: the first of {' → '.join(tried)} that fits --budget-memory {gib(budget)} "
                               f"(planned peak {gib(peak)})")
                pick.method = method
            elif budget is not None:
                reasons.append(f"fits --budget-memory {gib(budget)}: planned peak {gib(peak)}")
            return line
    runners.insert(0, Choice(pick.method, pick.objective, f"no training method fits --budget-memory {gib(budget)}"))
    reasons.append(f"no training method fits --budget-memory {gib(budget)}: prompting instead")
    pick.method, pick.objective = "few-shot", None
    return "no training"


def _fit_time(profile: DataProfile, pick: Choice, reasons: list, runners: list, budget_s: float | None,
              parameters: float, settings: dict) -> None:
    if budget_s is None or pick.objective is None:
        return
    rate = ASSUMED_TOKENS_PER_S * ASSUMED_AT_PARAMETERS / parameters
    epoch_s = profile.approx_tokens / rate
    if epoch_s <= budget_s:
        reasons.append(f"one epoch (~{profile.approx_tokens:,} tokens at ~{rate:,.0f} tokens/s) takes ~"
                       f"{epoch_s / 60:.1f} min, inside --budget-time {budget_s / 60:.0f} min")
        return
    tokens_per_step = max(1, profile.approx_tokens // max(1, profile.records)) * 8  # batch 8
    steps = int(budget_s * rate / tokens_per_step)
    if steps < MIN_STEPS:
        runners.insert(0, Choice(pick.method, pick.objective, f"~{steps} steps fit --budget-time "
                                 f"{budget_s / 60:.0f} min at ~{rate:,.0f} tokens/s: too few to learn from"))
        reasons.append("the time budget leaves too few training steps: prompting with examples instead")
        pick.method, pick.objective = "few-shot", None
        return
    settings["train.max_steps"] = steps
    reasons.append(f"one epoch needs ~{epoch_s / 60:.0f} min at ~{rate:,.0f} tokens/s; --budget-time "
                   f"{budget_s / 60:.0f} min allows ~{steps} steps of batch 8 (train.max_steps={steps})")


def recommend(profile: DataProfile, goal: str, model: str = "builtin:smollm2-135m-instruct",
              budget_memory: int | None = None, budget_time_s: float | None = None, data: str | None = None,
              max_length: int = 512) -> Recommendation:
    """The pick for `profile` and `goal` within the budgets; `data` (the file profiled) lets the planner size the
    batches from the real examples."""
    if goal not in GOALS:
        raise ConfigError(f"--goal {goal}: expected one of {', '.join(GOALS)}")
    pick, reasons, runners = _first_pick(profile, goal)
    reasons = [f"data: {profile.describe()}"] + reasons
    cfg = RunConfig.model_validate({"model": {"path": model},
                                    "data": {"train": data or "(not read by the advisor)", "max_length": max_length}})
    memory_line = _fit_memory(cfg, pick, reasons, runners, budget_memory)
    settings: dict = {}
    from tunesmith.plan.architectures import resolve
    from tunesmith.plan.memory import sum_base

    _fit_time(profile, pick, reasons, runners, budget_time_s, float(sum_base(resolve(model))), settings)
    runners = [c for c in runners if (c.method, c.objective) != (pick.method, pick.objective)]
    return Recommendation(pick, reasons, memory_line, runners, profile, settings)
