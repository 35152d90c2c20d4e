"""A validated config is never changed: a run derives its effective settings and writes them, with the reasons, as
effective.yaml beside config.yaml; config loading returns its notes instead of printing them."""

import yaml

from tunesmith.config import load_config
from tunesmith.config.effective import Change, effective_yaml, with_change


def test_a_run_with_dropout_leaves_its_config_as_it_was_and_writes_the_change(tiny_config, monkeypatch):
    from tunesmith.train import run as run_module
    from tunesmith.train.loop import train

    monkeypatch.setattr(run_module, "init_process", lambda *args: None)  # the session's malloc stays as it is
    tiny_config["train"]["max_steps"] = 1
    cfg = load_config(None, [], base=tiny_config)  # LoRA dropout 0.1; packing and share_prefixes on by default
    assert cfg.method.dropout > 0 and cfg.data.packing and cfg.data.share_prefixes
    before = cfg.model_copy(deep=True)
    result = train(cfg, quiet=True)
    assert cfg == before
    run_dir = result.run_dir
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["data"]["share_prefixes"] is True
    dtype, change = yaml.safe_load((run_dir / "effective.yaml").read_text())["changes"]
    assert (dtype["key"], dtype["config"], dtype["effective"]) == ("model.dtype", "auto", "float32")  # fp32 training
    assert change["key"] == "data.share_prefixes" and (change["config"], change["effective"]) == (True, False)
    assert change["reason"].startswith("dropout is on (") and "one dropout mask" in change["reason"]
    assert "effective.yaml" in (run_dir / "report.md").read_text()


def test_without_a_change_effective_yaml_lists_none_and_the_copy_is_separate():
    cfg = load_config(None, [], base={"data": {"train": "x.jsonl"}})
    changes = []
    changed = with_change(cfg, "report.heldout_samples", 0, "because", changes)
    assert cfg.report.heldout_samples != 0 and changed.report.heldout_samples == 0
    assert changes == [Change("report.heldout_samples", cfg.report.heldout_samples, 0, "because")]
    assert yaml.safe_load(effective_yaml([])) == {"changes": []}


def test_config_loading_returns_its_notes_and_prints_nothing(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("data: {train: x.jsonl}\nmethod: {name: lora, r: 4, target_modules: [q_proj]}\n")
    notes = []
    cfg = load_config(path, ["method.name=ia3"], notes=notes)
    assert cfg.method.name == "ia3"
    assert notes == ["method switched to 'ia3'; ignoring the config's method options it does not have: r"]
    assert capsys.readouterr() == ("", "")
