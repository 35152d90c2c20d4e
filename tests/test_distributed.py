"""torchrun with DDP and FSDP2 on CPU (gloo): 2 ranks × batch b train as 1 process × batch 2b, a checkpoint written by
2 ranks resumes on 1, and a killed rank stops the whole job with its last checkpoint intact.

One torchrun launch runs every 2-rank case one after another (tests/distributed_runs.py) to pay the start-up once;
the 1-process references run in this process."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, qa_rows, write_jsonl
from safetensors.torch import load_file

from tunesmith.config import load_config
from tunesmith.faults import FAULT_AFTER_STEP, SimulatedCrash
from tunesmith.train.checkpoint import list_checkpoints
from tunesmith.train.loop import train

STEPS, PER_RANK, RANKS = 5, 2, 2
CASES = [(strategy, method, objective) for strategy in ("ddp", "fsdp") for method in ("lora", "full")
         for objective in ("sft", "dpo")]
CRASHED = [("ddp", "lora", "sft"), ("fsdp", "full", "sft")]  # checkpoint at step 3, stopped after step 4
# Measured |2 ranks − 1 process| (the order of the sums differs): per-step loss ≤ 1.8e-6; trained weights after 5
# AdamW steps ≤ 6.1e-5 (Adam divides by the root of the second moment, which lifts the rounding of small gradients).
# Resumed on 1 process after 3 steps on 2 ranks against 5 steps on 2 ranks: weights ≤ 1.2e-7 apart.
LOSS_TOLERANCE, WEIGHT_TOLERANCE, RESUME_TOLERANCE = 1e-4, 2e-4, 1e-5


def _env() -> dict:
    src = str(REPO / "src")
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
            "PYTHONPATH": os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p)}


def _torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={RANKS}", *args]


def _config(root: Path, model_dir, method: str, objective: str, name: str, strategy: str | None = None,
            batch: int = PER_RANK, **train_settings) -> dict:
    if objective == "dpo":
        rows = [{"prompt": f"Pick a colour for item {i}.", "chosen": "Blue, always blue.",
                 "rejected": f"Red number {i} maybe."} for i in range(16)]
        data = write_jsonl(root / "pairs.jsonl", rows)
    else:
        data = write_jsonl(root / "train.jsonl", qa_rows(48))
    cfg = {"model": {"path": str(model_dir)},
           "method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0} if method == "lora" else {"name": "full"},
           "objective": objective, "data": {"train": str(data), "max_length": 96},
           "train": {"max_steps": STEPS, "batch_size": batch, "lr": 1e-2 if method == "lora" else 2e-3,
                     "warmup_steps": 1, "seed": 7, **train_settings},
           "report": {"compare": False}, "output_dir": str(root / name)}
    if train_settings.get("bf16"):
        cfg["model"]["dtype"] = "bfloat16"  # a bf16 base (model.dtype: auto keeps fp32 on CPU)
    if strategy:
        cfg["distributed"] = {"strategy": strategy}
    return cfg


def _losses(run_dir) -> list[float]:
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def _artifact(run_dir) -> dict:
    """Every tensor of adapter/ or model/ (a reward model's head file too), keyed by file and name."""
    files = sorted(Path(run_dir).glob("*/*.safetensors"))
    assert files
    return {f"{f.name}:{k}": v for f in files for k, v in load_file(str(f)).items()}


def _largest_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys() and a
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.fixture(scope="module")
def launched(tmp_path_factory, tiny_model_dir):
    """Every 2-rank run of this module in one torchrun launch (the cases, then the runs that stop after step 4), and
    meanwhile the 1-process references in this process."""
    root = tmp_path_factory.mktemp("distributed")
    jobs = [{"config": _config(root, tiny_model_dir, m, o, f"{s}-{m}-{o}", s)} for s, m, o in CASES]
    jobs += [{"config": _config(root, tiny_model_dir, m, o, f"crashed-{s}-{m}-{o}", s, save_every=3),
              "fault_after_step": 4} for s, m, o in CRASHED]
    jobs += _rank_to_rank_jobs(root, tiny_model_dir)
    spec = root / "jobs.json"
    spec.write_text(json.dumps({"jobs": jobs}))
    job = subprocess.Popen(_torchrun(str(REPO / "tests" / "distributed_runs.py"), str(spec)), env=_env(),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _one_process_checkpoint(root, tiny_model_dir)  # the last job above waits for it
        references = {(m, o): _reference(root, tiny_model_dir, m, o) for m, o in dict.fromkeys(c[1:] for c in CASES)}
        references["bf16"] = _reference(root, tiny_model_dir, "lora", "sft", bf16=True)
        output, _ = job.communicate(timeout=300)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 0, output[-8000:]
    return root, references, tiny_model_dir


def _reference(root: Path, model_dir, method: str, objective: str, **train_settings) -> Path:
    """One process × batch 2b (shared by the DDP and FSDP cases)."""
    name = f"one-{method}-{objective}" + "".join(f"-{k}" for k in train_settings)
    cfg = load_config(None, [], base=_config(root, model_dir, method, objective, name, batch=PER_RANK * RANKS,
                                             **train_settings))
    return train(cfg, quiet=True).run_dir


def _rank_to_rank_jobs(root: Path, model_dir) -> list[dict]:
    """FSDP checkpoints resumed on 2 FSDP ranks (one written by 2 ranks: crashed-fsdp-full-sft, copied before the
    one-process test resumes it; one written by 1 process), and the LoRA case loaded whole on every rank as before
    train/fsdp_load.py."""
    def resumed(name: str, source: Path, **job) -> dict:
        return {"config": _config(root, model_dir, "full", "sft", name, "fsdp", save_every=3), "resume": True,
                "copy": [str(source), str(root / name)], **job}

    return [resumed("resumed-2-on-2", root / "crashed-fsdp-full-sft"),
            {"config": _config(root, model_dir, "lora", "sft", "fsdp-lora-sft-whole", "fsdp"), "whole_load": True},
            resumed("resumed-1-on-2", root / "crashed-one-full-sft", wait_for=str(root / "crashed-one.done")),
            {"config": _config(root, model_dir, "lora", "sft", "fsdp-lora-sft-bf16", "fsdp", bf16=True)}]


def _one_process_checkpoint(root: Path, model_dir) -> None:
    """One process × batch 2b, a checkpoint at step 3, stopped after step 4; then crashed-one.done."""
    cfg = load_config(None, [], base=_config(root, model_dir, "full", "sft", "crashed-one-full-sft",
                                             batch=PER_RANK * RANKS, save_every=3))
    os.environ[FAULT_AFTER_STEP] = "4"
    try:
        train(cfg, quiet=True)
    except SimulatedCrash:
        pass
    finally:
        os.environ.pop(FAULT_AFTER_STEP, None)
    (root / "crashed-one.done").write_text("")


@pytest.mark.parametrize("strategy,method,objective", CASES)
def test_two_ranks_train_as_one_process_with_twice_the_batch(launched, strategy, method, objective):
    root, references, _ = launched
    one = references[method, objective]
    two = root / f"{strategy}-{method}-{objective}"
    assert len(_losses(two)) == STEPS
    assert _losses(two) == pytest.approx(_losses(one), abs=LOSS_TOLERANCE, rel=0)
    assert _losses(one)[-1] < _losses(one)[0] - 0.05  # it trained
    # the consolidated artifact (FSDP's gathered on rank 0) is what one process writes, in the same format
    assert _largest_difference(_artifact(two), _artifact(one)) <= WEIGHT_TOLERANCE
    # the forgetting probe runs on the ranks too (FSDP: through the sharded model), with one process's values
    forgetting = [json.loads((run / "summary.json").read_text())["forgetting"] for run in (two, one)]
    assert forgetting[0]["perplexity_before"] == pytest.approx(forgetting[1]["perplexity_before"], rel=1e-6)
    assert forgetting[0]["perplexity_after"] == pytest.approx(forgetting[1]["perplexity_after"], rel=1e-4)
    assert {p.name for p in (two / "adapter" if method == "lora" else two / "model").iterdir()} == \
        {p.name for p in (one / "adapter" if method == "lora" else one / "model").iterdir()}


@pytest.mark.parametrize("strategy,method,objective", CRASHED)
def test_checkpoint_of_two_ranks_resumes_on_one_process(launched, strategy, method, objective):
    root, _, model_dir = launched
    crashed = root / f"crashed-{strategy}-{method}-{objective}"
    assert [p.name for p in list_checkpoints(crashed)] == ["step-0000003"]
    cfg = load_config(None, [], base=_config(root, model_dir, method, objective, crashed.name,
                                             batch=PER_RANK * RANKS, save_every=3))
    train(cfg, quiet=True, resume=True)  # 1 process, the same global batch, steps 4-5
    straight = root / f"{strategy}-{method}-{objective}"
    assert _largest_difference(_artifact(crashed), _artifact(straight)) <= RESUME_TOLERANCE
    assert _losses(crashed)[:3] == _losses(straight)[:3]  # the 2-rank steps kept as they were logged
    assert _losses(crashed)[3:] == pytest.approx(_losses(straight)[3:], abs=LOSS_TOLERANCE, rel=0)


def test_fsdp_checkpoints_resume_on_fsdp_ranks(launched):
    """Resumed on 2 FSDP ranks (set_model_state_dict and set_optimizer_state_dict load the full state into the
    shards): written by 2 ranks, it continues as the uninterrupted 2-rank run; written by 1 process, as the
    uninterrupted 1-process run (the ranks' sums in another order). AdamW's moments must come back too: without
    them steps 4-5 move the weights by about the learning rate, 2e-3. Measured: 2 → 2 ranks bit-identical; 1
    process → 2 ranks losses 4.6e-7 and weights 1.2e-7 apart (AMD EPYC fam 25)."""
    root, references, _ = launched
    straight, resumed = root / "fsdp-full-sft", root / "resumed-2-on-2"
    assert _losses(resumed)[:3] == _losses(straight)[:3]
    assert _losses(resumed)[3:] == pytest.approx(_losses(straight)[3:], abs=1e-6, rel=0)
    assert _largest_difference(_artifact(resumed), _artifact(straight)) <= 1e-6
    one, resumed = references["full", "sft"], root / "resumed-1-on-2"
    assert _losses(resumed)[:3] == _losses(one)[:3]
    assert _losses(resumed)[3:] == pytest.approx(_losses(one)[3:], abs=2e-6, rel=0)
    assert _largest_difference(_artifact(resumed), _artifact(one)) <= RESUME_TOLERANCE


def test_fsdp_reading_shards_trains_as_loading_the_whole_model(launched):
    """The skeleton's LoRA init (the RNG stream of one process), each rank's rows read from the files and the
    buffers built at construction give the run that loading the whole model on every rank gives (measured: the
    same losses and adapter, bit for bit)."""
    root, _, _ = launched
    sharded, whole = root / "fsdp-lora-sft", root / "fsdp-lora-sft-whole"
    assert len(_losses(sharded)) == STEPS
    assert _losses(sharded) == pytest.approx(_losses(whole), abs=1e-6, rel=0)
    assert _largest_difference(_artifact(sharded), _artifact(whole)) <= 1e-6


def test_fsdp_under_bf16_gathers_bf16_weights_and_trains_as_one_process(launched):
    """train.bf16 with LoRA over a bf16 base (model.dtype: bfloat16), so FSDP2 gathers in bf16 and reduces in fp32
    (MixedPrecisionPolicy): the losses are one process's as bf16 rounds them (measured ≤ 8.2e-5 on 10.8, AMD EPYC
    fam 25)."""
    root, references, _ = launched
    two, one = root / "fsdp-lora-sft-bf16", references["bf16"]
    assert "dtype: bfloat16" in (two / "config.yaml").read_text()  # the base was bf16: the policy applied
    assert _losses(two) == pytest.approx(_losses(one), abs=5e-4, rel=0)
    assert _losses(one)[-1] < _losses(one)[0] - 0.05


def _rank_pids(launcher: int) -> dict[int, int]:
    pids = [int(p) for p in Path(f"/proc/{launcher}/task/{launcher}/children").read_text().split()]
    ranks = {}
    for pid in pids:
        env = dict(kv.split("=", 1) for kv in Path(f"/proc/{pid}/environ").read_bytes().decode().split("\0")
                   if "=" in kv)
        ranks[int(env["RANK"])] = pid
    return ranks


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the ranks' processes through /proc")
def test_killing_one_rank_stops_the_job_and_keeps_the_last_checkpoint(tmp_path, tiny_model_dir):
    cfg = _config(tmp_path, tiny_model_dir, "lora", "sft", "run", "ddp", max_steps=5000, save_every=1)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    job = subprocess.Popen(_torchrun("-m", "tunesmith", "train", str(tmp_path / "run.yaml"), "--quiet"), env=_env(),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not list_checkpoints(tmp_path / "run") and job.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert job.poll() is None, job.communicate()[0][-4000:]
        os.kill(_rank_pids(job.pid)[1], signal.SIGKILL)
        killed = time.monotonic()
        output, _ = job.communicate(timeout=60)
    finally:
        if job.poll() is None:
            job.kill()
    stopped_after = time.monotonic() - killed
    assert job.returncode != 0
    assert stopped_after < 30, stopped_after  # measured ~1 s: gloo sees the closed connection at the next collective
    assert "Signal 9 (SIGKILL) received by PID" in output and "rank      : 1" in output, output[-4000:]

    last = list_checkpoints(tmp_path / "run")[-1]
    meta = json.loads((last / "meta.json").read_text())
    assert last.name == f"step-{meta['step']:07d}" and meta["data_position"] == meta["step"] * PER_RANK * RANKS
    resumed = load_config(None, [], base=_config(tmp_path, tiny_model_dir, "lora", "sft", "run",
                                                 batch=PER_RANK * RANKS, max_steps=meta["step"] + 1))
    train(resumed, quiet=True, resume=True)  # the checkpoint loads whole and training continues from it
    assert [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
            ][-1] == meta["step"] + 1


def test_plain_train_with_a_distributed_section_is_one_process(tiny_config, capsys):
    tiny_config["distributed"] = {"strategy": "fsdp"}
    tiny_config["train"]["max_steps"] = 1
    tiny_config["data"]["eval"] = None
    result = train(load_config(None, [], base=tiny_config))
    assert "not started by torchrun: training as one process" in " ".join(capsys.readouterr().err.split())
    assert result.steps == 1 and len(_losses(result.run_dir)) == 1 and (result.run_dir / "adapter").is_dir()


@pytest.mark.parametrize("change,message", [
    ({"objective": "ppo", "ppo": {"reward_function": "m:f"}}, "PPO's step"),
    ({"objective": "grpo", "grpo": {"reward_functions": ["exact_match"]}}, "GRPO's step"),
    ({"method": {"name": "qlora"}, "distributed": {"strategy": "fsdp"}}, "cannot be gathered back or dequantised"),
])
def test_refused_combinations_say_why(tiny_config, change, message):
    from tunesmith.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        load_config(None, [], base={**tiny_config, "distributed": {"strategy": "ddp"}, **change})


def test_torchrun_without_a_distributed_section_is_refused(tiny_config, monkeypatch):
    from rich.console import Console

    from tunesmith.errors import ConfigError
    from tunesmith.train.distributed import TORCHRUN_ENV, ranks_for

    for name, value in zip(TORCHRUN_ENV, ("1", "2", "1", "127.0.0.1", "29500")):
        monkeypatch.setenv(name, value)
    cfg = load_config(None, [], base=tiny_config)
    with pytest.raises(ConfigError, match=r"rank 1 of 2 started by torchrun, but the config has no distributed: "):
        ranks_for(cfg, torch.device("cpu"), Console(quiet=True))


POLICY_SETTINGS = {"ppo": {"reward_function": "m:f"}, "grpo": {"reward_functions": ["exact_match"]}}


@pytest.mark.parametrize("objective", ["ppo", "grpo"])
def test_under_torchrun_ppo_and_grpo_are_refused_before_anything_loads(tiny_config, monkeypatch, objective):
    """Their steps sample on one process: under torchrun (no distributed: section needed to get here) train refuses
    them, naming the field, before the run folder, the process group, the tokenizer or the model."""
    from tunesmith import models
    from tunesmith.errors import ConfigError
    from tunesmith.train.distributed import TORCHRUN_ENV

    def nothing_loads(*args, **kwargs):
        raise AssertionError("loaded before the refusal")

    for name, value in zip(TORCHRUN_ENV, ("1", "2", "1", "127.0.0.1", "29500")):
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(models, "load_tokenizer", nothing_loads)
    monkeypatch.setattr(models, "load_model", nothing_loads)
    cfg = load_config(None, [], base={**tiny_config, "objective": objective, objective: POLICY_SETTINGS[objective]})
    with pytest.raises(ConfigError, match=rf"^objective: {objective.upper()}'s step \(train/{objective}_step.py\) "
                                          r"samples .* not sharded over ranks.*\(this process is rank 1 of 2 started "
                                          r"by torchrun\)$"):
        train(cfg, quiet=True)
    assert not Path(cfg.output_dir).exists()


def test_fsdp_refuses_an_int4_base_and_says_why():
    from conftest import tiny_llama

    from tunesmith.config.distributed import DistributedSettings
    from tunesmith.errors import ConfigError
    from tunesmith.quant.linear import Int4Linear
    from tunesmith.train.distributed import FullySharded

    model = tiny_llama(vocab_size=300)
    model.model.layers[0].mlp.down_proj = Int4Linear(128, 64, group_size=32)
    ranks = FullySharded.__new__(FullySharded)  # the check comes before any collective
    ranks.settings = DistributedSettings(strategy="fsdp")
    with pytest.raises(ConfigError, match="int4 weights are packed buffers, which FSDP does not shard"):
        ranks.wrap(model, objective=None)
