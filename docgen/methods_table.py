"""docs/reference/methods.md from the registries: one row per method (tunesmith.methods.METHODS and the declaration on
its settings class) and one per objective (tunesmith.objectives.OBJECTIVES and its declaration)."""

from __future__ import annotations

from docgen.markdown import GENERATED, cell, table
from tunesmith.config.declarations import MethodDeclaration, ObjectiveDeclaration
from tunesmith.config.methods import settings_class
from tunesmith.config.objectives import objective_declaration
from tunesmith.config.reference import anchor
from tunesmith.methods import METHODS, declaration
from tunesmith.objectives import OBJECTIVES

# MethodDeclaration.parameters -> what trains, in words
TRAINS = {
    "whole": "every weight of the model",
    "chosen": "the base's own parameters chosen by `last_layers` or `patterns`; the rest stays frozen",
    "biases": "the biases of the target linear layers",
    "low_rank": "a low-rank pair B·A beside each target linear layer",
    "scales": "a learned scaling vector per target (on its output, or its input for `feedforward_modules`)",
    "hadamard": "two low-rank pairs per target linear layer, their products multiplied element by element (LoHa)",
    "kronecker": "two Kronecker factors per target linear layer, each in full or as a low-rank pair (LoKr)",
    "projection_scales": "two learned scaling vectors per target, around one pair of frozen random projections that "
                         "all targets share",
    "bottleneck": "small bottleneck layers (down, activation, up) after attention and/or the MLP",
    "virtual": "virtual tokens",
}
VIRTUAL = {"embeddings": "learned input embeddings placed before the text",
           "key_values": "learned keys and values every attention layer attends to"}
REFERENCE = {"": "none",
             "cached": "the model before training: its log-probs computed once before training where the base's own "
                       "weights train, else the base with the method switched off",
             "forward": "the model before training, run beside the policy at each step"}

INTRO = """\
What each method trains and what its run leaves behind, and what each objective reads, generated from the registries
(`src/tunesmith/methods/__init__.py`, `src/tunesmith/objectives/__init__.py`) and what each declares about itself
(`src/tunesmith/config/methods.py`, `src/tunesmith/config/objectives.py`). A method is chosen with `method.name`, an
objective with `objective:`; any method trains with any objective. Their options are in the
[config reference](config.md#method).
"""


def _trains(d: MethodDeclaration) -> str:
    text = TRAINS[d.parameters]
    if d.memory.virtual:
        text += ": " + VIRTUAL[d.memory.virtual]
    if d.memory.weight_norms:
        text += ", and a magnitude vector per target (the weight split into magnitude and direction)"
    if d.memory.quantized_base:
        text += ", over a base whose linear weights are frozen in 4 bits"
    return text


def _options(name: str) -> str:
    fields = [f for f in settings_class(name).model_fields if f != "name"]
    links = [f"[`{f}`](config.md#{anchor('', ('method', name, f))})" for f in fields]
    return ", ".join(links) or "none"


def _merges(d: MethodDeclaration) -> str:
    if d.artifact == "model":
        return "is a model folder already: use it as `--model`; `export` ships it (HF, GGUF)"
    if d.not_mergeable:
        return "no: `export --format hf --separate-adapter` ships the base with the adapter beside it"
    return "yes: `merge`; `export` merges it (HF, GGUF)"


def _peft(d: MethodDeclaration) -> str:
    if d.peft_type:
        return f"yes (`{d.peft_type}`)"
    return "no (a model folder)" if d.artifact == "model" else "no (tunesmith's own format)"


def method_rows() -> list[list[str]]:
    rows = []
    for name in METHODS:
        d = declaration(name)
        rows.append([f'<span id="{name}"></span>[`{name}`](config.md#{anchor("", ("method", name))})',
                     cell(_trains(d)), _options(name), f"`{d.artifact}/`", _merges(d), _peft(d),
                     "yes" if d.named_adapters else "no", "no" if d.fsdp_refusal else "yes"])
    return rows


def _why_not() -> list[str]:
    lines = []
    for name in METHODS:
        d = declaration(name)
        for what, why in (("merge", d.not_mergeable if d.artifact != "model" else None),
                          ("run under FSDP", d.fsdp_refusal)):
            if why:
                lines.append(f"- **{name}** cannot {what}: {cell(why)}.")
    return lines


def _objective_options(d: ObjectiveDeclaration) -> str:
    if d.section is None:
        return "none"
    return ", ".join(f"[`{f}`](config.md#{anchor('', (d.name, f))})" for f in d.section.model_fields)


def objective_rows() -> list[list[str]]:
    rows = []
    for name in OBJECTIVES:
        d = objective_declaration(name)
        reads = f"`{d.fixed_format}` records" if d.fixed_format else ", ".join(f"`{f}`" for f in d.formats)
        reference = REFERENCE[d.reference]
        if d.reference_weight:
            reference += f" (none at `{name}.{d.reference_weight}: 0`)"
        rows.append([f'<span id="objective-{name}"></span>`{name}`', reads, _objective_options(d),
                     reference, "yes" if d.mixes_tasks else "no",
                     "no" if d.not_distributed else "yes",
                     "the LM head's next-token distribution" if d.lm_loss else cell(d.own_head or "")])
    return rows


def render() -> str:
    out = [GENERATED, "# Methods table", "", INTRO, "## Methods {#methods}", ""]
    out += table(["Method", "What trains", "Options", "Saved in", "Merge and export", "PEFT loads it",
                  "Several in one model", "FSDP"], method_rows()) + [""]
    out += ["Why some cannot:", ""] + _why_not() + [""]
    out += ["## Objectives {#objectives}", "",
            "The data formats are described in [Data formats](data-formats.md); the losses in "
            "[Objectives](../concepts/objectives.md).", ""]
    out += table(["Objective", "Reads", "Options", "Reference model", "Multi-task (`data.tasks`)", "Under torchrun",
                  "What it scores"], objective_rows()) + [""]
    return "\n".join(out).rstrip() + "\n"
