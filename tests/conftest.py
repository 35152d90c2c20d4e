import json
import os
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
BUILTIN = "builtin:smollm2-135m-instruct"


@pytest.fixture(scope="session")
def tokenizer():
    from tunesmith.models import load_tokenizer

    return load_tokenizer(BUILTIN)


def tiny_llama(vocab_size: int = 49152, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    model = LlamaForCausalLM(config).eval()
    model.config.use_cache = False
    return model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer):
    """A tiny random Llama saved as an HF folder with SmolLM2's tokenizer (real chat template)."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama(len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def docs_tiny(tmp_path_factory):
    """The doc-test harness's stand-ins for the models a page names (tests/docs_tiny.py), built once a session."""
    from docs_tiny import Tiny, build_model

    return Tiny(build_model(tmp_path_factory.mktemp("docs-tiny-llama")), tmp_path_factory.mktemp("docs-tiny"))


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def qa_rows(n: int, seed: int = 0) -> list[dict]:
    import random

    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "omega", "kappa", "sigma", "theta"]
    rows = []
    for i in range(n):
        a, b = rng.sample(words, 2)
        rows.append({"instruction": f"Combine {a} and {b}.", "input": "", "output": f"{a}-{b} number {i % 7}."})
    return rows


@pytest.fixture
def tiny_config(tmp_path, tiny_model_dir):
    """A small valid run config (dict) on the tiny model; tests change what they need."""
    train = write_jsonl(tmp_path / "train.jsonl", qa_rows(48))
    evals = write_jsonl(tmp_path / "eval.jsonl", qa_rows(8, seed=1))
    return {
        "model": {"path": str(tiny_model_dir)},
        "method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.1},
        "objective": "sft",
        "data": {"train": str(train), "eval": str(evals), "max_length": 128},
        "train": {"max_steps": 6, "batch_size": 4, "lr": 1e-2, "warmup_steps": 1, "seed": 7},
        "report": {"compare": False},
        "output_dir": str(tmp_path / "run"),
    }


@pytest.fixture(scope="module")
def one_thread():
    """For a module of tiny models: one thread is as fast, and steady on a shared box, where two threads' spin-waits
    made tests/test_families.py 4x slower (restored afterwards). Use: pytestmark = pytest.mark.usefixtures(...)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def fake_gpus(monkeypatch):
    """`fake_gpus(n)`: torch.cuda reports n GPUs (0: none) for the rest of the test; this box has none, so what
    depends on the count (device selection, RNG restore) is tested without CUDA itself."""
    def report(n: int) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)

    return report


@pytest.fixture
def crash_after(monkeypatch):
    """`with crash_after(n): train(...)`: the run stops abruptly after step n (its checkpoint written, if that step
    saves one), as a killed process would, through TUNESMITH_FAULT_AFTER_STEP (tunesmith/faults.py)."""
    from tunesmith.faults import FAULT_AFTER_STEP, SimulatedCrash

    @contextmanager
    def stopping(step: int):
        monkeypatch.setenv(FAULT_AFTER_STEP, str(step))
        try:
            with pytest.raises(SimulatedCrash):
                yield
        finally:
            monkeypatch.delenv(FAULT_AFTER_STEP)

    return stopping


@pytest.fixture
def run_resumed(crash_after):
    """`run_resumed(base, tmp_path, crash_step, check=None)`: the run of config `base` straight through (in
    tmp_path/a) and stopped after step `crash_step` then resumed (tmp_path/b), `check(output_dir)` called between the
    crash and the resume; returns both results (straight, resumed)."""
    from tunesmith.config import load_config
    from tunesmith.train.loop import train

    def run(base: dict, tmp_path: Path, crash_step: int, check=None):
        straight = train(load_config(None, [f"output_dir={tmp_path / 'a'}"], base=base), quiet=True)
        cfg = load_config(None, [f"output_dir={tmp_path / 'b'}"], base=base)
        with crash_after(crash_step):
            train(cfg, quiet=True)
        if check is not None:
            check(Path(cfg.output_dir))
        return straight, train(cfg, quiet=True, resume=True)

    return run


@pytest.fixture
def head_run_resumed(run_resumed):
    """`head_run_resumed(base, tmp_path, head_attr)`: the run of config `base` straight through (in tmp_path/a) and
    stopped after step 3 then resumed (tmp_path/b), once its last checkpoint is shown to hold the head
    `model.<head_attr>`; returns both results (straight, resumed)."""
    from safetensors import safe_open

    from tunesmith.train.checkpoint import list_checkpoints

    def run(base: dict, tmp_path: Path, head_attr: str):
        def holds_head(output_dir: Path) -> None:
            with safe_open(str(list_checkpoints(output_dir)[-1] / "state.safetensors"), "pt") as fh:
                assert f"model.{head_attr}.weight" in fh.keys()

        return run_resumed(base, tmp_path, 3, holds_head)

    return run


@pytest.fixture
def fsynced_inodes(monkeypatch) -> set:
    """The inodes of every file and folder os.fsync is called on while the test runs."""
    seen = set()
    real_fsync = os.fsync

    def spy(fd):
        seen.add(os.fstat(fd).st_ino)
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    return seen
