"""The memory planner's 7 B figures on the docs' concept page (docs/concepts/planner.md): a table between its
`<!-- generated: plan-7b -->` markers and a stacked bar chart (docs/images/plan-7b-per-method.svg), both from
`tunesmith.plan.memory.predict` on Llama-2-7B's shape (`llama:7b`). Written by bench/report_docs.py (make docs-gen).
"""

from __future__ import annotations

import re
from pathlib import Path

# Llama-2-7B's shape, one sequence of 512 tokens, bf16 autocast with activation checkpointing: the setting the
# seeds' 16 and 6 GB describe (tests/test_plan.py checks the same plans)
SETTING = ["train.batch_size=1", "data.max_length=512", "train.bf16=true", "train.activation_checkpointing=true"]
METHODS = {"full fine-tuning": ["method.name=full"],
           "LoRA r=16, bf16 base": ["method.name=lora", "model.dtype=bfloat16"],
           "QLoRA NF4, bf16 rest": ["method.name=qlora", "model.dtype=bfloat16"]}
RULE_OF_THUMB_GB = {"full fine-tuning": 84, "LoRA r=16, bf16 base": 16, "QLoRA NF4, bf16 rest": 6}
# the planner's parts, grouped into the chart's stacks
GROUPS = {"weights": ("weights", "weights (4-bit linears)", "weights (embeddings, norms)",
                      "frozen linear weights in bf16"),
          "trained parameters, their gradients and AdamW moments": ("added parameters", "gradients",
                                                                    "AdamW moments",
                                                                    "block gradients in freed activations"),
          "autocast's bf16 weight copies": ("autocast weight cache", "autocast copies of frozen weights"),
          "activations and workspace": ("activations", "one block recomputed", "backward workspace",
                                        "embeddings out, final norm"),
          "loss and LM head": ("chunked loss buffers", "head gradient (in the forward)", "held logit gradients",
                               "logits", "log-probs over the vocabulary")}
START, END = "<!-- generated: plan-7b (make docs-gen; bench/report_plan_7b.py) -->", "<!-- end generated: plan-7b -->"
CHART = "plan-7b-per-method.svg"


def plans(device: str = "cuda") -> dict[str, object]:
    from tunesmith.config import load_config
    from tunesmith.plan.memory import predict

    return {name: predict(load_config(None, ["model.path=llama:7b"] + extra + SETTING, base={"data": {"train": "x"}}),
                          device=device, runtime_bytes=0)
            for name, extra in METHODS.items()}


def grouped(memory) -> dict[str, int]:
    """The training parts of a plan summed into GROUPS (every part must fall in one)."""
    out = dict.fromkeys(GROUPS, 0)
    for part in memory.training:
        group = next((g for g, names in GROUPS.items() if part.name in names), None)
        if group is None:
            raise ValueError(f"the planner's part {part.name!r} is in no group of bench/report_plan_7b.py")
        out[group] += part.bytes
    return out


def table(memories: dict) -> list[str]:
    out = ["| method | " + " | ".join(GROUPS) + " | peak (GB) | rule of thumb |",
           "|---|" + "---:|" * (len(GROUPS) + 2)]
    for name, memory in memories.items():
        cells = [f"{b / 1e9:.2f}" for b in grouped(memory).values()]
        out.append(f"| {name} | " + " | ".join(cells) + f" | **{memory.peak / 1e9:.1f}** | "
                   f"{RULE_OF_THUMB_GB[name]} GB |")
    first = next(iter(memories.values()))
    out += ["", f"(GB = 10⁹ bytes; peak allocated on CUDA, no runtime term; {first.tokens} tokens, "
                f"{first.parameters.total:,} parameters.)"]
    return out


def block(memories: dict) -> str:
    return "\n".join([START, ""] + table(memories) + ["", f"![the 7 B plans per method, stacked by part]"
                                                          f"(../images/{CHART})", "", END])


def page(text: str, memories: dict) -> str:
    """The concept page with its generated block replaced (the page must have the markers)."""
    pattern = re.escape(START) + r".*?" + re.escape(END)
    if not re.search(pattern, text, flags=re.S):
        raise ValueError(f"docs/concepts/planner.md has no {START} … {END} block")
    return re.sub(pattern, lambda _: block(memories), text, flags=re.S)


def chart(memories: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"svg.hashsalt": "tunesmith", "svg.fonttype": "none", "font.size": 8})
    colours = ["#3949ab", "#ef6c00", "#8e24aa", "#7cb342", "#00897b"]
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    names = list(memories)
    bottoms = [0.0] * len(names)
    for colour, group in zip(colours, GROUPS):
        values = [max(grouped(memories[n])[group], 0) / 1e9 for n in names]
        ax.bar(names, values, bottom=bottoms, color=colour, label=group, width=0.55)
        bottoms = [b + v for b, v in zip(bottoms, values)]
    for i, name in enumerate(names):
        ax.plot([i - 0.33, i + 0.33], [RULE_OF_THUMB_GB[name]] * 2, linestyle="--", color="black", linewidth=0.8,
                label="rule of thumb" if i == 0 else None)
        ax.text(i, bottoms[i] + 1, f"{memories[name].peak / 1e9:.1f} GB (rule of thumb: {RULE_OF_THUMB_GB[name]})",
                ha="center", fontsize=7)
    ax.set_ylabel("peak allocated, GB (10⁹ B)")
    ax.set_title("Llama-2-7B, batch 1 × 512, bf16 autocast, activation checkpointing (tunesmith plan --device cuda)",
                 fontsize=7)
    ax.set_ylim(0, max(bottoms) * 1.12)
    ax.legend(fontsize=6, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, format="svg", metadata={"Date": None, "Creator": None})
    plt.close(fig)
