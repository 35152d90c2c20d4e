"""Does llama.cpp run tunesmith's GGUF exports the same as transformers runs the model? Per family and quant type:

- llama.cpp's tokenizer gives the HF tokenizer's ids on sample texts (digits, code, non-English, chat markup);
- llama.cpp's logits over the HF ids match transformers' within a stated fraction of their scale (TOLERANCE), and
  its top-1 token is transformers' wherever transformers' top two differ by more than MARGIN of the scale (greedy
  text can flip at near-ties, so logits are compared, not only generated text).

    .venv/bin/python bench/llamacpp_check.py [--venv /work/llamacpp-venv] [--families llama2,gpt2] [--quants f16]
                                             [--no-real] [--build-only] [--results PATH]

llama.cpp is `llama-cpp-python==0.3.36` built from PyPI (a CPU build, ~10 min on 2 cores) into its own venv on the
first run (--venv), and run there by bench/llamacpp_worker.py, one process per file. The models are the tiny random
family models of tests/families.py (random weights are fine for agreement) and the real SmolLM2-135M-Instruct
(builtin:smollm2-135m-instruct) for f16 and q8_0. Prints a table; raw rows go to
bench/results/<date>-llamacpp-<cpu>.jsonl (bench/results_log.py).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "bench"), str(REPO / "tests"), str(REPO / "src")]
LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"
# a CPU build of llama.cpp for this machine, without the parts the bench does not load
CMAKE_ARGS = "-DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF"
# max |Δlogit| / max |logit| allowed per quant type (llama.cpp's KV cache in f32: the file's precision is what differs)
TOLERANCE = {"f32": 1e-3, "f16": 1e-2, "q8_0": 5e-2, "q4_0": 3e-1}
MARGIN = {"f32": 0.01, "f16": 0.02, "q8_0": 0.1, "q4_0": 0.5}  # of the scale: a clear top-1 over top-2
TEXTS = ["The year 2024 had 366 days; 1,234,567.89 is a number.",
         "def add(a, b):\n    return a + b  # sum\n\tprint(add(1, 2))",
         "Grüße aus Köln! ¿Qué tal? Привет, мир. 你好，世界。 こんにちは",
         "  leading spaces,\n\nblank lines and trailing  "]
REAL_MODEL = "builtin:smollm2-135m-instruct"


def llamacpp_python(venv: Path) -> Path:
    """The venv's python with llama_cpp importable, building llama-cpp-python into it first if needed."""
    python = venv / "bin" / "python"
    if python.exists() and subprocess.run([python, "-c", "import llama_cpp"], capture_output=True).returncode == 0:
        return python
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    env = {**os.environ, "CMAKE_ARGS": CMAKE_ARGS, "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 2)}
    started = time.time()
    subprocess.run([python, "-m", "pip", "install", "--no-binary", "llama-cpp-python", LLAMA_CPP_PYTHON],
                   check=True, env=env)
    print(f"built {LLAMA_CPP_PYTHON} in {time.time() - started:.0f} s into {venv}", flush=True)
    return python


def hf_side(model, tokenizer, texts):
    """The HF tokenizer's ids per text and transformers' logits over them (float32 numpy)."""
    import torch

    ids = [tokenizer(t).input_ids for t in texts]
    with torch.no_grad():
        logits = [model(torch.tensor([i])).logits[0].float().numpy() for i in ids]
    return ids, logits


def llamacpp_side(python: Path, gguf: Path, texts, ids, work: Path):
    job = work / "job.json"
    job.write_text(json.dumps({"model": str(gguf), "texts": texts, "ids": ids}))
    run = subprocess.run([python, REPO / "bench" / "llamacpp_worker.py", job, work], capture_output=True, text=True)
    if run.returncode:
        return None, None, run.stderr.strip().splitlines()[-1] if run.stderr.strip() else f"rc {run.returncode}"
    import numpy as np

    tokens = json.loads((work / "tokens.json").read_text())
    return tokens, [np.load(work / f"logits-{i}.npy") for i in range(len(ids))], None


def dequantised_logits(model, gguf: Path, ids):
    """transformers' logits with the file's own (dequantised) weights, where its GGUF reader takes the architecture:
    what llama.cpp should compute from the file, quantisation noise left out. None where transformers cannot."""
    import torch
    from transformers import AutoModelForCausalLM

    # mistral is written as llama (transformers takes the file's own config); smollm3 transformers does not read
    extra = {} if model.config.model_type == "mistral" else {"config": model.config}
    try:
        back = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32,
                                                    **extra).eval()
    except (ValueError, NotImplementedError):  # e.g. a file named "mistral": transformers then wants gguf's mistral
        return None
    with torch.no_grad():
        return [back(torch.tensor([i])).logits[0].float().numpy() for i in ids]


def compare(quant: str, hf_logits, cpp_logits, positions: int | None = None) -> dict:
    """max |Δ| / scale over every position (or the first `positions`), and top-1 agreement at clear margins."""
    import numpy as np

    worst, clear, agree = 0.0, 0, 0
    for ours, theirs in zip(hf_logits, cpp_logits):
        ours, theirs = ours[:positions], theirs[:positions]
        scale = float(np.abs(ours).max())
        worst = max(worst, float(np.abs(ours - theirs).max()) / scale)
        top2 = np.sort(ours, axis=-1)[:, -2:]
        sure = (top2[:, 1] - top2[:, 0]) > MARGIN[quant] * scale
        clear += int(sure.sum())
        agree += int((ours.argmax(-1) == theirs.argmax(-1))[sure].sum())
    return {"max_diff_over_scale": worst, "tolerance": TOLERANCE[quant], "clear_positions": clear,
            "top1_agree": agree, "agrees": worst <= TOLERANCE[quant] and agree == clear}


def bench_models(families, real: bool):
    """(name, model, tokenizer, quant types, compared positions or None, note) to check."""
    import families as fam

    for name in families:
        model, tokenizer, note = fam.tiny_family_model(name), fam.family_tokenizer(name), ""
        if name == "smollm3":  # llama.cpp's smollm3 drops rope on every 4th layer only: the real models' layout
            model, note = smollm3_every_fourth(), "4 layers, no rope on the 4th (llama.cpp's fixed layout)"
        window = getattr(model.config, "sliding_window", None) if model.config.model_type in ("mistral", "phi3") \
            else None
        if window:
            note = (f"compared on the first {window} positions (sliding_window): llama.cpp's architecture for "
                    f"{name} has no sliding window, it attends every position")
        yield name, model, tokenizer, ("f32", "f16", "q8_0", "q4_0"), window, note
    if real:
        from tunesmith.models import load_model_and_tokenizer

        model, tokenizer = load_model_and_tokenizer(REAL_MODEL)
        yield "smollm2-135m (real)", model.float().eval(), tokenizer, ("f16", "q8_0"), None, ""


def smollm3_every_fourth():
    import torch
    import transformers

    import families as fam

    config = fam.tiny_family_model("smollm3").config
    config.num_hidden_layers, config.no_rope_layers = 4, [1, 1, 1, 0]
    config.layer_types = ["full_attention"] * 4
    torch.manual_seed(0)
    return transformers.SmolLM3ForCausalLM(config).eval()


def chat_text(tokenizer) -> list[str]:
    if not tokenizer.chat_template:
        return []
    return [tokenizer.apply_chat_template([{"role": "user", "content": "Hi 42, ça va?"}], tokenize=False,
                                          add_generation_prompt=True)]


def main(argv=None) -> int:
    from results_log import RESULTS, ResultsLog, cpu_summary, cpu_slug

    from families import FAMILIES
    from tunesmith.export.gguf import write_gguf

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--venv", type=Path, default=Path("/work/llamacpp-venv"))
    p.add_argument("--families", default=",".join(FAMILIES))
    p.add_argument("--quants", default="f32,f16,q8_0,q4_0")
    p.add_argument("--no-real", action="store_true", help="leave out the real SmolLM2-135M")
    p.add_argument("--build-only", action="store_true")
    p.add_argument("--results", type=Path, default=None)
    args = p.parse_args(argv)
    python = llamacpp_python(args.venv)
    if args.build_only:
        return 0
    cpu = cpu_summary()
    import datetime

    log = ResultsLog(args.results or RESULTS / f"{datetime.date.today().isoformat()}-llamacpp-{cpu_slug(cpu)}.jsonl")
    log.header(sys.argv, {"llama_cpp_python": LLAMA_CPP_PYTHON, "cmake_args": CMAKE_ARGS, "tolerance": TOLERANCE,
                          "margin": MARGIN, "texts": TEXTS, "kv_cache": "f32"}, cpu)
    quants, failed = args.quants.split(","), 0
    print(f"{'family':22} {'quant':5} {'tokens equal':12} {'max|Δ|/scale':>12} {'tol':>6} {'vs deq.':>9} {'top-1':>9}  "
          "verdict")
    for name, model, tokenizer, kinds, positions, note in bench_models([f for f in args.families.split(",") if f], not args.no_real):
        texts = TEXTS + chat_text(tokenizer)
        ids, hf_logits = hf_side(model, tokenizer, texts)
        for quant in [q for q in kinds if q in quants]:
            with tempfile.TemporaryDirectory() as tmp:
                gguf = write_gguf(model, tokenizer, Path(tmp) / "model.gguf", quant, name=name)
                tokens, cpp_logits, error = llamacpp_side(python, gguf, texts, ids, Path(tmp))
                same_weights = dequantised_logits(model, gguf, ids) if quant in ("q8_0", "q4_0") and not error \
                    else None
            if error:
                row = {"family": name, "quant": quant, "error": error, "agrees": False}
            else:
                row = {"family": name, "quant": quant, "tokens_equal": tokens == ids,
                       "token_mismatches": [{"text": t, "hf": a, "llama_cpp": b}
                                            for t, a, b in zip(texts, ids, tokens) if a != b],
                       **compare(quant, hf_logits, cpp_logits, positions), "note": note}
                if same_weights is not None:  # the export is judged on the weights it wrote; noise vs source reported
                    row["vs_dequantised"] = compare("f16", same_weights, cpp_logits, positions)
                    row["agrees"] = row["vs_dequantised"]["agrees"] and row["top1_agree"] == row["clear_positions"]
                row["agrees"] = row["agrees"] and row["tokens_equal"]
                if positions:
                    row["full_length_max_diff_over_scale"] = compare(quant, hf_logits, cpp_logits)[
                        "max_diff_over_scale"]
            log.row("llamacpp", **row)
            failed += not row["agrees"]
            print(format_row(row), flush=True)
    return 1 if failed else 0


def format_row(row: dict) -> str:
    if "error" in row:
        return f"{row['family']:22} {row['quant']:5} llama.cpp failed: {row['error']}"
    top1 = f"{row['top1_agree']}/{row['clear_positions']}"
    same = row.get("vs_dequantised", {}).get("max_diff_over_scale")
    same = f"{same:9.2e}" if same is not None else f"{'-':>9}"
    return (f"{row['family']:22} {row['quant']:5} {str(row['tokens_equal']):12} {row['max_diff_over_scale']:12.2e} "
            f"{row['tolerance']:6.0e} {same} {top1:>9}  {'agrees' if row['agrees'] else 'DIFFERS'} {row['note']}")


if __name__ == "__main__":
    sys.exit(main())
