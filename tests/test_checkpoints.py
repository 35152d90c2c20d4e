"""The checkpoint folders text and DreamBooth runs share (checkpoints.py): written whole or not at all, listed in
step order, pruned to `keep`; an optimizer's state through safetensors-ready tensors + JSON and back unchanged."""

import json

import pytest
import torch

from tunesmith.checkpoints import (checkpoint_path, list_checkpoints, new_checkpoint, optimizer_from_flat,
                                   optimizer_to_flat)


def _write(run_dir, step, keep, text="x"):
    with new_checkpoint(run_dir, step, keep) as tmp:
        (tmp / "meta.json").write_text(json.dumps({"step": step, "text": text}))


def test_written_whole_listed_in_order_pruned_to_keep_and_a_step_replaced(tmp_path):
    for step in (3, 1, 2):
        _write(tmp_path, step, keep=5)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-0000001", "step-0000002", "step-0000003"]
    _write(tmp_path, 4, keep=2)
    assert list_checkpoints(tmp_path) == [checkpoint_path(tmp_path, 3), checkpoint_path(tmp_path, 4)]
    _write(tmp_path, 4, keep=2, text="again")
    assert json.loads((checkpoint_path(tmp_path, 4) / "meta.json").read_text())["text"] == "again"
    with pytest.raises(RuntimeError):
        with new_checkpoint(tmp_path, 5, keep=1) as tmp:
            (tmp / "meta.json").write_text("{}")
            raise RuntimeError("crash while writing")
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-0000003", "step-0000004"]  # nothing pruned
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-0000003", "step-0000004"]
    assert list_checkpoints(tmp_path / "none") == []


def test_optimizer_state_round_trips(tmp_path):
    weight = torch.nn.Parameter(torch.randn(3, 2))
    bias = torch.nn.Parameter(torch.randn(2))
    optimizer = torch.optim.AdamW([weight, bias], lr=0.1)
    (weight.sum() + bias.square().sum()).backward()
    optimizer.step()
    sd = optimizer.state_dict()
    tensors, meta = optimizer_to_flat(sd, "optim.")
    assert sorted(tensors) == ["optim.0.exp_avg", "optim.0.exp_avg_sq", "optim.0.step", "optim.1.exp_avg",
                               "optim.1.exp_avg_sq", "optim.1.step"]
    back = optimizer_from_flat({**tensors, "rng.torch": torch.zeros(1)}, json.loads(json.dumps(meta)), "optim.")
    assert back["param_groups"] == json.loads(json.dumps(sd["param_groups"]))  # as JSON keeps them (tuples: lists)
    for idx, state in sd["state"].items():
        assert back["state"][idx].keys() == state.keys()
        for key, value in state.items():
            assert torch.equal(back["state"][idx][key], value)
