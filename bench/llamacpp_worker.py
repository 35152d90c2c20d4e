"""Run inside llama-cpp-python's own venv by bench/llamacpp_check.py: load one GGUF file in llama.cpp, tokenize the
job's texts (special tokens in the text parsed, as the HF tokenizer parses its added tokens) and compute the logits
of the job's token ids (the HF tokenizer's, so both sides see the same input).

    <llamacpp-venv>/bin/python bench/llamacpp_worker.py JOB.json OUT_DIR

JOB: {"model": path, "texts": [...], "ids": [[...], ...]}. Writes OUT_DIR/tokens.json (llama.cpp's ids per text)
and OUT_DIR/logits-<i>.npy (float32, tokens × vocabulary). Only numpy and llama_cpp here.
"""

import json
import sys
from pathlib import Path

import llama_cpp
import numpy as np

GGML_TYPE_F32 = 0  # the KV cache in f32, so that what differs is the file, not llama.cpp's f16 cache


def main(job_path: str, out_dir: str) -> int:
    job = json.loads(Path(job_path).read_text())
    out = Path(out_dir)
    n_ctx = max(len(ids) for ids in job["ids"]) + 8
    llm = llama_cpp.Llama(job["model"], n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, verbose=False, n_threads=2,
                          type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32, seed=0)
    tokens = [llm.tokenize(text.encode("utf-8"), add_bos=True, special=True) for text in job["texts"]]
    (out / "tokens.json").write_text(json.dumps(tokens))
    for i, ids in enumerate(job["ids"]):
        llm.reset()
        llm.eval(ids)
        np.save(out / f"logits-{i}.npy", np.array(llm.scores[:len(ids)], dtype=np.float32))
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
