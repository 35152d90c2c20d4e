"""`tunesmith score`: reward-model scores of answers (a reward model is the adapter/ or model/ folder of an
`objective: reward` run; its head is reward_head.safetensors in that folder)."""

from __future__ import annotations

import argparse

from tunesmith.cli.device import add_dtype_arg
from tunesmith.cli.paths import PathArg
from tunesmith.errors import ConfigError, DataError
from tunesmith.paths import Expect

SCORE_HELP = """Score answers with a reward model.

  tunesmith score --adapter runs/rm/adapter "What does \\"kluge\\" mean?" "A clever but clumsy fix."
  tunesmith score --adapter runs/rm/adapter --file pairs.jsonl

A file holds records with 'prompt' and 'answer' (one score each) or 'prompt', 'chosen' and 'rejected' (both scored,
plus the pairwise accuracy); prompts are text or chat messages."""


def register(sub) -> dict:
    p = sub.add_parser("score", help="reward-model scores of answers", description=SCORE_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, type=PathArg(Expect.MODEL),
                   help="a full reward model folder, or the base for --adapter "
                   "(default: the adapter's base model)")
    p.add_argument("--adapter", default=None, type=PathArg(Expect.FOLDER), help="the reward model's adapter folder")
    p.add_argument("--file", default=None, type=PathArg(Expect.DATA),
                   help="records to score (.jsonl, .csv, .parquet, datasets folder)")
    p.add_argument("--batch-size", type=int, default=8, help="answers scored per forward pass")
    add_dtype_arg(p)
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model folder's own Python code")
    p.add_argument("texts", nargs="*", metavar="PROMPT ANSWER", help="one prompt and its answer")
    return {"score": cmd_score}


def _records(path: str) -> tuple[list[list[dict]], list[str], int]:
    """(prompts, answers, pairs): with pairs > 0 the answers are chosen₁..chosenₙ, rejected₁..rejectedₙ."""
    from tunesmith.data.preference import normalize_pair
    from tunesmith.data.sources import Record, read_records

    records = read_records(path)
    if all("answer" in r.fields for r in records):
        items = [(normalize_pair(Record({"prompt": r.fields.get("prompt")}, r.where)).prompt, r.fields["answer"],
                  r.where) for r in records]
        for _, answer, where in items:
            if not isinstance(answer, str) or not answer.strip():
                raise DataError(f"{where}: 'answer' must be non-empty text")
        return [p for p, _, _ in items], [a for _, a, _ in items], 0
    pairs = [normalize_pair(r) for r in records]
    for item in pairs:
        if item.chosen is None:
            raise DataError(f"{item.where}: record needs 'answer', or 'chosen' and 'rejected'")
    prompts = [p.prompt for p in pairs]
    return prompts + prompts, [p.chosen for p in pairs] + [p.rejected for p in pairs], len(pairs)


def cmd_score(args) -> int:
    from tunesmith.objectives.reward import load_reward_model, score

    if bool(args.file) == bool(args.texts):
        raise ConfigError("score: give either PROMPT ANSWER or --file PATH")
    if args.texts and len(args.texts) != 2:
        raise ConfigError(f"score: expected PROMPT ANSWER (2 texts), got {len(args.texts)}")
    if not (args.adapter or args.model):
        raise ConfigError("score: --adapter (a reward model's adapter folder) or --model (a full reward model "
                          "folder) is required")
    if args.texts:
        prompts, answers, pairs = [[{"role": "user", "content": args.texts[0]}]], [args.texts[1]], 0
    else:
        prompts, answers, pairs = _records(args.file)
    folder = args.adapter or args.model
    model, tokenizer, ctx = load_reward_model(folder, args.model if args.adapter else None, args.dtype,
                                         args.trust_remote_code)
    scores = score(model, tokenizer, prompts, answers, ctx, args.batch_size)
    if not pairs:
        for s in scores:
            print(f"{s:.4f}")
        return 0
    print("chosen\trejected\tmargin")
    wins = 0
    for c, r in zip(scores[:pairs], scores[pairs:]):
        wins += c > r
        print(f"{c:.4f}\t{r:.4f}\t{c - r:+.4f}")
    print(f"pairwise accuracy: {wins}/{pairs} = {wins / pairs:.1%}")
    return 0
