"""objective: distill (objectives/distill.py, divergences.py, teacher_context.py): each loss against its equation in
float64 and against TRL's GKDTrainer.generalized_jsd_loss, answer positions only, gradients to the student only, the
vocabulary check, context distillation's two sequences, and a short run for each kind of teacher."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import qa_rows, tiny_llama, write_jsonl

from tunesmith.config import load_config
from tunesmith.config.objectives import DistillSettings
from tunesmith.context import RunContext
from tunesmith.data.chat import IGNORE
from tunesmith.errors import ConfigError
from tunesmith.objectives.distill import DistillObjective
from tunesmith.objectives.divergences import divergence_sum, generalized_jsd
from tunesmith.objectives.teacher_context import add_context, build_selector, collate_with_teacher, teacher_batch
from tunesmith.train.loop import train

pytestmark = pytest.mark.usefixtures("one_thread")


def reference_divergence(student: torch.Tensor, teacher: torch.Tensor, beta: float, t: float) -> torch.Tensor:
    """The equations in float64: p = softmax(z / T); KL(a || b) = Σ a log(a / b); M = (1 - β)·p_S + β·p_T."""
    p_s = torch.softmax(student.double() / t, -1)
    p_t = torch.softmax(teacher.double() / t, -1)

    def kl(a, b):
        return (a * (a / b).log()).sum(-1)

    if beta == 0:
        return kl(p_t, p_s)
    if beta == 1:
        return kl(p_s, p_t)
    m = (1 - beta) * p_s + beta * p_t
    return beta * kl(p_t, m) + (1 - beta) * kl(p_s, m)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_each_loss_equals_its_equation_and_trl(beta):
    from trl.experimental.gkd import GKDTrainer

    torch.manual_seed(0)
    student, teacher = torch.randn(2, 5, 13) * 3, torch.randn(2, 5, 13) * 3
    labels = torch.randint(0, 13, (2, 5))
    labels[0, :2] = IGNORE  # prompt positions: TRL's mask and ours drop them
    where = labels != IGNORE
    ours = generalized_jsd(student[where], teacher[where], beta, temperature=2.0)
    expected = reference_divergence(student[where], teacher[where], beta, 2.0)
    assert torch.allclose(ours.double(), expected, rtol=1e-5, atol=1e-7)
    trl = GKDTrainer.generalized_jsd_loss(student, teacher, labels, beta=beta, temperature=2.0)
    assert float(ours.sum() / where.sum()) == pytest.approx(float(trl), rel=1e-5)
    assert DistillSettings(loss={0.0: "forward_kl", 1.0: "reverse_kl"}.get(beta, "jsd")).jsd_beta == beta


def test_chunks_give_the_same_loss_and_gradient_and_the_teacher_none():
    torch.manual_seed(1)
    head_s, head_t = torch.nn.Linear(8, 17, bias=False), torch.nn.Linear(6, 17, bias=False)
    hidden = torch.randn(10, 8, requires_grad=True)
    teacher_hidden = torch.randn(10, 6, requires_grad=True)
    grads, values = [], []
    for chunk in (None, 3):
        hidden.grad = None
        loss = divergence_sum(hidden, teacher_hidden, head_s, head_t, 0.3, 1.5, chunk)
        loss.backward()
        values.append(loss.detach())
        grads.append(hidden.grad.clone())
    assert torch.allclose(values[0], values[1], rtol=1e-6)
    assert torch.allclose(grads[0], grads[1], atol=1e-7)
    assert teacher_hidden.grad is None and head_t.weight.grad is None and head_s.weight.grad is not None


def _context_examples(tokenizer, few_shot=2, system="Answer briefly."):
    from tunesmith.data.formats import normalize_all
    from tunesmith.data.sources import Record
    from tunesmith.data.templates import tokenize_all

    rows = qa_rows(6)
    _, items = normalize_all([Record(r, f"train.jsonl:{i + 1}") for i, r in enumerate(rows)], "auto")
    students = tokenize_all(tokenizer, items)
    settings = SimpleNamespace(few_shot=few_shot, select="fixed")
    selector = build_selector(items, settings, 0)
    return items, add_context(students, {x.where: x for x in items}, selector, few_shot, system, tokenizer)


def test_context_is_the_teachers_only_and_the_answers_line_up(tokenizer):
    items, examples = _context_examples(tokenizer)
    first = examples[0]
    teacher_text, student_text = tokenizer.decode(first.teacher_ids), tokenizer.decode(first.input_ids)
    assert "Answer briefly." in teacher_text and "Answer briefly." not in student_text
    shots = [x.messages[-1]["content"] for x in items[1:3]]  # fixed: the first two that are not the example
    assert all(s in teacher_text for s in shots) and not any(s in student_text for s in shots)
    assert items[0].messages[-1]["content"] not in teacher_text.split(items[0].messages[-2]["content"])[0]
    for e in examples:  # the same answer tokens, the last labelled ones of the teacher's sequence
        assert [t for t in e.teacher_labels if t != IGNORE] == [t for t in e.labels if t != IGNORE]
        assert len(e.teacher_ids) > len(e.input_ids)
    cfg = SimpleNamespace(data=SimpleNamespace(packing=True, max_length=96, share_prefixes=False))
    batch = collate_with_teacher(examples, cfg, pad_id=2)
    taught = teacher_batch(batch)
    student_targets = batch["targets"][batch["targets"] != IGNORE][batch["label_order"]]
    teacher_targets = taught["targets"][taught["targets"] != IGNORE][taught["label_order"]]
    assert torch.equal(student_targets, teacher_targets)
    assert not torch.equal(batch["targets"][batch["targets"] != IGNORE], student_targets)  # packing reordered them


def test_objective_equals_the_equation_on_a_tiny_model_packed_or_padded(tokenizer):
    """A separate teacher: the loss is the float64 equation over the answer positions only (forward passes of the
    whole sequences); the teacher's parameters get no gradient; packed and padded batches agree."""
    _, examples = _context_examples(tokenizer, few_shot=1)
    student, teacher = tiny_llama(len(tokenizer), seed=0), tiny_llama(len(tokenizer), seed=1)
    student.train()
    objective = DistillObjective(DistillSettings(loss="jsd", beta=0.3, temperature=0.7, sft_weight=0.5))
    objective.teacher, objective.teacher_ctx = teacher.requires_grad_(True), RunContext()
    expected_kd, expected_ce = 0.0, 0.0
    for e in examples:
        s_logits = student(torch.tensor([e.input_ids])).logits[0, :-1]
        t_logits = teacher(torch.tensor([e.teacher_ids])).logits[0, :-1]
        s_rows = s_logits[torch.tensor(e.labels[1:]) != IGNORE]
        t_rows = t_logits[torch.tensor(e.teacher_labels[1:]) != IGNORE]
        expected_kd += float(reference_divergence(s_rows.detach(), t_rows.detach(), 0.3, 0.7).sum())
        targets = torch.tensor([t for t in e.labels[1:] if t != IGNORE])
        expected_ce += float(torch.nn.functional.cross_entropy(s_rows.double(), targets, reduction="sum"))
    units = sum(e.n_labels for e in examples)
    for packing in (True, False):
        cfg = SimpleNamespace(data=SimpleNamespace(packing=packing, max_length=96, share_prefixes=False))
        loss, n, metrics = objective.loss_sum(student, collate_with_teacher(examples, cfg, 2), RunContext())
        assert n == units
        assert metrics["distill"] == pytest.approx(expected_kd, rel=1e-4)
        assert metrics["ce"] == pytest.approx(expected_ce, rel=1e-4)
        assert float(loss) == pytest.approx(expected_kd + 0.5 * expected_ce, rel=1e-4)
    student.zero_grad()
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert student.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0


@pytest.fixture(scope="module")
def distill_setup(tmp_path_factory, docs_tiny):
    """Data, the 2,048-token tiny student, a sharper teacher model of the same vocabulary (its final norm × 30) and
    an adapter trained on the student's base by a short SFT run."""
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("distill")
    train_file = write_jsonl(folder / "train.jsonl", qa_rows(32))
    eval_file = write_jsonl(folder / "eval.jsonl", qa_rows(8, seed=1))
    for name, seed, scale in (("student", 2, 8.0), ("teacher", 3, 30.0)):
        model = AutoModelForCausalLM.from_pretrained(docs_tiny.model)
        with torch.no_grad():  # sharper distributions that depend more on the context than random init's
            model.model.norm.weight.mul_(scale)
            torch.manual_seed(seed)
            for layer in model.model.layers:
                layer.mlp.down_proj.weight.normal_(0, 0.2)
        model.save_pretrained(folder / name)
        for file in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            shutil.copy(docs_tiny.model / file, folder / name / file)
    sft = _config(folder / "student", train_file, eval_file, folder / "sft", "sft")
    sft["train"].update(max_steps=4, lr=5e-2)
    adapter = train(load_config(None, [], base=sft), quiet=True).run_dir / "adapter"
    return SimpleNamespace(student=folder / "student", train=train_file, eval=eval_file, folder=folder,
                           teacher=folder / "teacher", adapter=adapter)


def _config(model, train_file, eval_file, out, objective="distill", distill=None):
    cfg = {"model": {"path": str(model)}, "method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
           "objective": objective, "data": {"train": str(train_file), "eval": str(eval_file), "max_length": 256},
           "train": {"max_steps": 6, "batch_size": 4, "lr": 2e-2, "warmup_steps": 1, "seed": 7},
           "report": {"compare": True, "heldout_samples": 0, "trained_samples": 0}, "output_dir": str(out)}
    if distill is not None:
        cfg["distill"] = distill
    return cfg


LR = {"teacher": 2e-2, "teacher_adapter": 2e-2, "teacher_context": 5e-3}


@pytest.mark.parametrize("kind", ["teacher", "teacher_adapter", "teacher_context"])
def test_each_kind_of_teacher_lowers_the_distillation_loss(distill_setup, kind):
    s = distill_setup
    section = {"teacher": {"teacher": str(s.teacher)},
               "teacher_adapter": {"teacher_adapter": str(s.adapter), "loss": "reverse_kl"},
               "teacher_context": {"teacher_context": {"system": "Reply as alpha-beta number n.", "few_shot": 2},
                                   "loss": "jsd", "beta": 0.5, "temperature": 2.0}}[kind]
    cfg = _config(s.student, s.train, s.eval, s.folder / f"run-{kind}", distill=section)
    cfg["train"].update(max_steps=8, lr=LR[kind])
    result = train(load_config(None, [], base=cfg), quiet=True)
    before, after = result.eval_metrics_before["distill"], result.eval_metrics_after["distill"]
    assert before > 0 and after < 0.9 * before, (before, after)
    assert (Path(result.run_dir) / "adapter" / "adapter_model.safetensors").is_file()
    assert "held-out distillation loss" in (Path(result.run_dir) / "report.md").read_text()


def test_a_teacher_with_another_vocabulary_is_refused_naming_both_sizes(distill_setup, tiny_model_dir):
    s = distill_setup
    cfg = _config(s.student, s.train, s.eval, s.folder / "other-vocab", distill={"teacher": str(tiny_model_dir)})
    with pytest.raises(ConfigError, match=r"49,152 tokens, the student's 2,048"):
        train(load_config(None, [], base=cfg), quiet=True)


def test_refusals(distill_setup):
    s = distill_setup
    full = _config(s.student, s.train, s.eval, s.folder / "full", distill={"loss": "forward_kl"})
    full["method"] = {"name": "full"}
    with pytest.raises(ConfigError, match="trains the base weights in place"):  # refused by the config itself
        load_config(None, [], base=full)
    full["distill"] = {"teacher": str(s.teacher)}
    assert load_config(None, [], base=full).distill.teacher == str(s.teacher)
    for section, match in (({"loss": "forward_kl", "beta": 0.3}, "beta applies to loss 'jsd' only"),
                           ({"teacher": "x", "teacher_adapter": str(s.adapter)}, "not both"),
                           ({"teacher_context": {"few_shot": 0}}, "an empty context")):
        with pytest.raises(ConfigError, match=match):
            load_config(None, [], base=_config(s.student, s.train, s.eval, s.folder / "x", distill=section))
    split = _config(s.student, s.train, s.eval, s.folder / "x", distill={})
    split["data"]["train_on_prompt"] = True
    with pytest.raises(ConfigError, match="train_on_prompt"):
        load_config(None, [], base=split)


def test_same_base_teacher_shares_the_model(distill_setup):
    """Adapters off, no context: the teacher is the student's own base (no second model), so the first evaluation,
    before any step, is exactly 0."""
    s = distill_setup
    cfg = _config(s.student, s.train, s.eval, s.folder / "self", distill={})
    cfg["train"]["max_steps"] = 1
    result = train(load_config(None, [], base=cfg), quiet=True)
    assert result.eval_metrics_before["distill"] == pytest.approx(0.0, abs=1e-6)
    log = (Path(result.run_dir) / "report.md").read_text() + json.dumps(result.summary)
    assert "held-out distillation loss" in log


def test_plan_counts_the_teacher(distill_setup):
    """A teacher model: its parameters × 4 B beside the student's; the same base (adapters off): no weights; a
    context: a longer teacher forward; the divergence's buffers: 6 × chunk × vocabulary × 4 B."""
    from transformers import AutoModelForCausalLM

    from tunesmith.plan.batches import BatchTokens
    from tunesmith.plan.memory import predict

    s = distill_setup
    batch = BatchTokens(4, 400, 400, 300, "given")

    def parts(section):
        cfg = load_config(None, [], base=_config(s.student, s.train, s.eval, s.folder / "plan", distill=section))
        return {p.name: p.bytes for p in predict(cfg, runtime_bytes=0, batch=batch).training}

    separate, own, context = parts({"teacher": str(s.teacher)}), parts({}), parts({"teacher_context": {"few_shot": 3}})
    teacher_params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(s.teacher).parameters())
    assert separate["teacher weights"] == teacher_params * 4
    assert "teacher weights" not in own and "teacher weights" not in context
    assert context["teacher forward (no grad)"] == 4 * own["teacher forward (no grad)"]
    assert own["distillation logits"] == 6 * 256 * 2048 * 4 + 300 * 64 * 4
    assert "logits" not in own and "chunked loss buffers" in parts({"sft_weight": 0.5})
