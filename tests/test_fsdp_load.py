"""FSDP's shard-by-shard load without torchrun (train/fsdp_load.py): the skeleton against a loaded model, the rows
each rank reads, and what still loads whole. The 2-rank runs are in tests/test_distributed.py."""

import torch
from safetensors.torch import save_file

from tunesmith.config import load_config
from tunesmith.methods import get_method
from tunesmith.models import load_model
from tunesmith.train import fsdp_load


def test_the_skeleton_draws_the_adapters_and_builds_the_buffers_as_a_loaded_model(tiny_config, tiny_model_dir):
    cfg = load_config(None, [], base=tiny_config)
    models = []
    for build in (lambda: load_model(str(tiny_model_dir)), lambda: fsdp_load.skeleton(str(tiny_model_dir),
                                                                                      torch.float32)):
        torch.manual_seed(3)
        model = build()
        get_method("lora").apply(model, cfg.method)
        models.append((model, torch.get_rng_state()))
    (loaded, rng_loaded), (skeleton, rng_skeleton) = models
    assert torch.equal(rng_loaded, rng_skeleton)  # the same draws, so the run after them draws the same too
    adapters = {n: p for n, p in loaded.named_parameters() if "lora_" in n}
    drawn = dict(skeleton.named_parameters())
    assert adapters and all(torch.equal(p, drawn[n]) for n, p in adapters.items())
    assert float(adapters["model.layers.0.self_attn.q_proj.lora_A.default.weight"].detach().abs().max()) > 0
    for name, buffer in loaded.named_buffers():
        assert torch.equal(dict(skeleton.named_buffers())[name], buffer), name  # rotary inv_freq among them
    assert skeleton.lm_head.weight is skeleton.model.embed_tokens.weight and not skeleton.training
    base = skeleton.model.layers[0].mlp.down_proj.base_layer.weight
    assert base.stride() == (0, 0) and not base.requires_grad  # a view of one zero: nothing allocated


class _Shard:
    """What FSDP2 makes of a parameter: the whole shape, and this rank's rows as its local tensor."""

    def __init__(self, shape, rows):
        self.shape, self.local = torch.Size(shape), torch.full((rows, *shape[1:]), -1.0)

    def dim(self):
        return len(self.shape)

    def to_local(self):
        return self.local


class _Ranks:
    def __init__(self, world, rank):
        self.world, self.rank = world, rank


def test_each_rank_reads_the_rows_torch_chunk_gives_it(tmp_path):
    """⌈n/W⌉ rows per rank, the last ranks fewer or none (FSDP2 pads them itself)."""
    from safetensors import safe_open

    weight = torch.arange(20.0).reshape(5, 4)
    save_file({"w": weight}, str(tmp_path / "model.safetensors"))
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as handle:
        for world in (2, 3, 4, 6):
            expected = torch.chunk(weight, world)
            for rank in range(world):
                rows = expected[rank].shape[0] if rank < len(expected) else 0
                shard = _Shard(weight.shape, rows)
                fsdp_load._read_rows(handle, "w", shard, _Ranks(world, rank))
                assert torch.equal(shard.local, expected[rank] if rows else weight[:0]), (world, rank)


def test_what_still_loads_whole_says_why(tiny_config, tiny_model_dir):
    def reason(**change):
        return fsdp_load.whole_load_reason(load_config(None, [], base={**tiny_config, **change}),
                                           str(tiny_model_dir))

    assert reason() is None
    assert reason(method={"name": "full"}) is None
    assert "computes its initial values from the base weights" in reason(method={"name": "dora"})
    assert "adds its head" in reason(objective="reward", data={**tiny_config["data"], "format": "preference"})
    assert "reference of a base that trains" in reason(objective="dpo", method={"name": "full"},
                                                       data={**tiny_config["data"], "format": "preference"})
