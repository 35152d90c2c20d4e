"""The loop's settings do what the config says: schedules, the held-out fraction, weight decay, clipping, threads and
the automatic device."""

import json
import math
from types import SimpleNamespace

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from tunesmith.config import load_config
from tunesmith.data.pipeline import split_items
from tunesmith.devices import pick_device
from tunesmith.errors import DataError
from tunesmith.train.loop import train
from tunesmith.train.run import make_optimizer, make_scheduler


def _lrs(schedule: str, warmup: int, total: int, lr: float = 1.0) -> list[float]:
    """The learning rate each of `total` optimizer steps applies."""
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=lr)
    scheduler = make_scheduler(optimizer, schedule, warmup, total)
    out = []
    for _ in range(total):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


@pytest.mark.parametrize("schedule, middle, end", [
    # warmup 2 of 10 steps: step 6 is halfway through the 8 decay steps, step 9 is 7/8 through
    ("cosine", 0.5, 0.5 * (1 + math.cos(math.pi * 7 / 8))),
    ("linear", 0.5, 1 / 8),
    ("constant", 1.0, 1.0),
])
def test_schedule_follows_its_formula_at_warmup_middle_and_end(schedule, middle, end):
    lrs = _lrs(schedule, warmup=2, total=10, lr=0.1)
    assert lrs[0] == pytest.approx(0.1 * 1 / 2)  # warmup: (step + 1) / warmup_steps
    assert lrs[1] == pytest.approx(0.1)
    assert lrs[2] == pytest.approx(0.1)  # decay starts at the full rate
    assert lrs[6] == pytest.approx(0.1 * middle)
    assert lrs[9] == pytest.approx(0.1 * end)


def test_schedule_without_warmup_starts_at_the_full_rate():
    assert _lrs("cosine", warmup=0, total=4) == pytest.approx([1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5,
                                                               0.5 * (1 + math.cos(3 * math.pi / 4))])


def _rows(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


class StepRecorder:
    """What every optimizer step sees: its learning rate, its gradients, the thread count."""

    def __init__(self):
        self.lrs, self.grads, self.threads = [], [], []

    def __call__(self, optimizer, args, kwargs):
        self.lrs.append(optimizer.param_groups[0]["lr"])
        self.grads.append([p.grad.detach().clone() for g in optimizer.param_groups for p in g["params"]])
        self.threads.append(torch.get_num_threads())

    def __enter__(self):
        self.handle = register_optimizer_step_pre_hook(self)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def test_logged_learning_rate_is_the_one_each_step_applied(tiny_config):
    tiny_config["train"].update(schedule="linear", warmup_steps=1, max_steps=6, lr=1e-2)
    with StepRecorder() as seen:
        result = train(load_config(None, [], base=tiny_config), quiet=True)
    logged = [r["lr"] for r in _rows(result.run_dir) if "loss" in r]
    # warmup 1: the full rate at step 1, then linear decay over the 5 remaining steps
    assert seen.lrs == pytest.approx([1e-2, 1e-2, 8e-3, 6e-3, 4e-3, 2e-3])
    assert logged == pytest.approx(seen.lrs)


def _norm(grads) -> float:
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))


def test_clipping_logs_the_norm_before_and_applies_the_clipped_gradient(tiny_config, tmp_path):
    tiny_config["train"].update(max_steps=1, warmup_steps=0)
    runs = {}
    for max_norm in (1e6, 1e-3, None):
        cfg = {**tiny_config, "train": {**tiny_config["train"], "max_grad_norm": max_norm},
               "output_dir": str(tmp_path / f"run-{max_norm}")}
        with StepRecorder() as seen:
            result = train(load_config(None, [], base=cfg), quiet=True)
        runs[max_norm] = (seen.grads[0], [r for r in _rows(result.run_dir) if "loss" in r][0])
    unclipped, row = runs[1e6]
    norm = _norm(unclipped)
    assert row["grad_norm"] == pytest.approx(norm, rel=1e-5) and norm > 1e-2
    clipped, row = runs[1e-3]
    assert row["grad_norm"] == pytest.approx(norm, rel=1e-5)  # the norm before clipping, not after
    assert _norm(clipped) == pytest.approx(1e-3, rel=1e-4)
    for c, u in zip(clipped, unclipped, strict=True):  # the same direction, scaled to max_grad_norm
        torch.testing.assert_close(c, u * (1e-3 / norm), atol=1e-9, rtol=1e-4)
    never, row = runs[None]
    assert "grad_norm" not in row
    for n, u in zip(never, unclipped, strict=True):
        torch.testing.assert_close(n, u, atol=0, rtol=0)


def test_weight_decay_shrinks_a_parameter_by_lr_times_wd_on_a_zero_gradient_step(tiny_config):
    tiny_config["train"].update(weight_decay=0.1, warmup_steps=0, lr=0.01)
    cfg = load_config(None, [], base=tiny_config)
    param = torch.nn.Parameter(torch.tensor([1.0, -2.0, 4.0]))
    run = SimpleNamespace(cfg=cfg, model=torch.nn.ParameterList([param]), device=torch.device("cpu"))
    _, optimizer, _ = make_optimizer(run, total_steps=10)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1]
    param.grad = torch.zeros_like(param)
    optimizer.step()
    torch.testing.assert_close(param.detach(), torch.tensor([1.0, -2.0, 4.0]) * (1 - 0.01 * 0.1), atol=1e-7, rtol=0)


def test_eval_fraction_holds_out_that_share_seeded(tiny_config):
    del tiny_config["data"]["eval"]
    tiny_config["data"]["eval_fraction"] = 0.25

    def split(seed):
        cfg = load_config(None, [f"train.seed={seed}"], base=tiny_config)
        _, train_items, eval_items = split_items(cfg)
        return [x.where for x in train_items], [x.where for x in eval_items]

    train_a, eval_a = split(7)
    assert (len(train_a), len(eval_a)) == (36, 12)  # 48 records
    assert not set(train_a) & set(eval_a) and len(set(train_a) | set(eval_a)) == 48
    assert split(7) == (train_a, eval_a)
    assert split(8)[1] != eval_a


def test_eval_fraction_that_leaves_nothing_to_train_on_is_refused(tiny_config, tmp_path):
    from conftest import qa_rows, write_jsonl

    tiny_config["data"] = {"train": str(write_jsonl(tmp_path / "two.jsonl", qa_rows(2))), "eval_fraction": 0.9,
                           "max_length": 128}
    with pytest.raises(DataError, match=r"data.eval_fraction: 0.9 of the 2 records in data.train holds out 2"):
        split_items(load_config(None, [], base=tiny_config))
    tiny_config["data"]["eval_fraction"] = 0.5
    _, train_items, eval_items = split_items(load_config(None, [], base=tiny_config))
    assert (len(train_items), len(eval_items)) == (1, 1)


def test_threads_are_set_for_the_run(tiny_config):
    before = torch.get_num_threads()
    want = 1 if before != 1 else 2
    tiny_config["train"].update(threads=want, max_steps=2)
    try:
        with StepRecorder() as seen:
            train(load_config(None, [], base=tiny_config), quiet=True)
    finally:
        torch.set_num_threads(before)
    assert seen.threads == [want, want]


@pytest.mark.parametrize("cuda, mps, expected", [(True, True, "cuda"), (False, True, "mps"), (False, False, "cpu")])
def test_auto_device_prefers_cuda_then_mps_then_cpu(monkeypatch, cuda, mps, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    assert pick_device("auto") == torch.device(expected)
    assert pick_device("cpu") == torch.device("cpu")
