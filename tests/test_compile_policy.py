"""train.compile: auto's rule, its records, and a compiled run's loss curve and report (kernels/compile_policy.py,
train/compile_schedule.py)."""

import json

import pytest

from tunesmith.config import load_config
from tunesmith.kernels.compile_policy import CompileRecords, decide, why_not
from tunesmith.runlog import read_metrics
from tunesmith.train.loop import train


def test_auto_compiles_when_the_tokens_left_repay_the_compile_by_the_margin():
    # 1e6 tokens at 1,000 tokens/s eager: 1,000 s; at the default 1.25x a step, 200 s saved against 1.5 x 60 s
    assert decide(1000.0, 1e6, None).compile
    # 300,000 tokens: 60 s saved, under the 90 s the default compile must be repaid by
    assert not decide(1000.0, 3e5, None).compile
    # the same run, once this machine measured a warm compile of 10 s at 1.3x: 300 s x 0.23 = 69 s >= 15 s
    on = decide(1000.0, 3e5, {"compile_s": 10.0, "speedup": 1.3})
    assert on.compile and "measured here before" in on.reason and "1.30x" in on.reason
    # a compile measured slower than eager never pays
    assert not decide(1000.0, 1e9, {"compile_s": 1.0, "speedup": 0.9}).compile


def test_auto_stays_eager_where_compiling_was_measured_slower_or_is_untested():
    assert "0.65x" in why_not("cpu", bf16=False, world=1, own_loop=None)
    assert "cuda" in why_not("cuda", bf16=True, world=1, own_loop=None)
    assert "torchrun" in why_not("cpu", bf16=True, world=2, own_loop=None)
    assert "grpo" in why_not("cpu", bf16=True, world=1, own_loop="grpo")
    assert why_not("cpu", bf16=True, world=1, own_loop=None) is None


def test_compile_records_keep_the_last_measurement_per_signature(tmp_path):
    records = CompileRecords(tmp_path / "records.json")
    assert records.get("a") is None
    records.put("a", 12.345, 1.23456)
    records.put("b", 40.0, 1.1)
    records.put("a", 9.0, 1.3)
    assert records.get("a") == {"compile_s": 9.0, "speedup": 1.3} and records.get("b")["compile_s"] == 40.0
    (tmp_path / "records.json").write_text("{not json")
    assert records.get("a") is None  # a damaged file costs the estimate, not the run


def _losses(run_dir) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir) if "loss" in r]


@pytest.mark.slow  # one compile of a tiny layer, ~20-30 s on two cores
def test_auto_compiles_after_the_probe_with_the_same_losses_and_reports_and_records_the_cost(
        tiny_config, tmp_path, monkeypatch):
    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path / "cache"))
    # inductor's cache for this test; a record is trusted only while the cache it was measured with exists
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    (tmp_path / "inductor").mkdir()
    tiny_config["method"]["dropout"] = 0.0
    tiny_config["train"].update(max_steps=7, bf16=True, warmup_steps=0)
    # the first run: too short to repay the default compile, so eager; it names its layers' signature
    eager = train(load_config(None, [], base={**tiny_config, "output_dir": str(tmp_path / "eager")}), quiet=True)
    first = json.loads((eager.run_dir / "summary.json").read_text())["compile"]
    assert not first["compiled"] and "off" in first["reason"]
    # a record for that signature that makes any run worth compiling: the decision after step 3 compiles step 4
    records = CompileRecords(tmp_path / "cache" / "compile-records.json")
    records.put(first["signature"], 0.001, 100.0)
    auto = train(load_config(None, [], base={**tiny_config, "output_dir": str(tmp_path / "auto")}), quiet=True)
    summary = json.loads((auto.run_dir / "summary.json").read_text())["compile"]
    assert summary["setting"] == "auto" and summary["compiled"] and summary["reason"].startswith("auto: ")
    assert summary["compile_seconds"] > 0.5  # step 4 paid the compile: far above a tiny step
    assert summary["eager_tokens_per_s"] > 0 and summary["compiled_tokens_per_s"] > 0
    measured = records.get(first["signature"])
    assert measured["compile_s"] == summary["compile_seconds"] and measured["speedup"] != 100.0
    assert "s of compiling" in (auto.run_dir / "report.md").read_text()
    for a, b in zip(_losses(eager.run_dir), _losses(auto.run_dir), strict=True):
        assert abs(a - b) <= 1e-3  # bf16 products: only the order of operations differs
