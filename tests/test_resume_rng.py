"""Resuming where torch sees another number of GPUs than the run that wrote the checkpoint: each saved CUDA RNG state
goes to the GPU of its number where there is one, the rest are dropped, GPUs without one start fresh, and one line
says so. This box has no GPU: the saved states are faked and torch.cuda is monkeypatched (CUDA itself untested)."""

import pytest
import torch


def _checkpoint_rng(gpus: int) -> tuple[dict, dict]:
    from tunesmith.train.checkpoint import rng_state

    tensors, meta = rng_state()
    tensors.update({f"rng.cuda.{i}": torch.full((16,), i, dtype=torch.uint8) for i in range(gpus)})
    return tensors, meta


@pytest.mark.parametrize("gpus_here, restored, note", [
    (0, [], "the checkpoint holds the CUDA RNG states of 4 GPU(s), this machine has 0: dropped the states of cuda:0, "
     "cuda:1, cuda:2, cuda:3"),
    (1, [0], "the checkpoint holds the CUDA RNG states of 4 GPU(s), this machine has 1: dropped the states of cuda:1, "
     "cuda:2, cuda:3"),
    (4, [0, 1, 2, 3], None),
    (6, [0, 1, 2, 3], "the checkpoint holds the CUDA RNG states of 4 GPU(s), this machine has 6: cuda:4, cuda:5 start "
     "from fresh states"),
])
def test_rng_of_four_gpus_restores_on_the_gpus_there_are(gpus_here, restored, note, fake_gpus, monkeypatch):
    """A checkpoint written with 4 GPUs (rng.cuda.0..3, faked) resumed where torch sees another number."""
    import random

    from tunesmith.train.checkpoint import restore_rng

    tensors, meta = _checkpoint_rng(4)
    expected = random.random()
    fake_gpus(gpus_here)
    set_on = []
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: set_on.append((device, int(state[0]))))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: pytest.fail("restores every saved GPU"))
    random.random()
    assert restore_rng(tensors, meta) == note
    assert set_on == [(i, i) for i in restored]  # each GPU gets its own saved state
    assert random.random() == expected  # the other generators restored as before
