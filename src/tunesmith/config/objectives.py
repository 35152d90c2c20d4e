"""Each objective's declaration (config/declarations.py) and options (pydantic, no torch): the `reward:`, `dpo:`,
`orpo:`, `simpo:`, `kto:`, `ppo:`, `grpo:`, `classify:` and `distill:` config sections."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tunesmith.config.declarations import ObjectiveDeclaration
from tunesmith.paths import Expect


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RewardSettings(Strict):
    margin: float = Field(0.0, description="Bradley-Terry with margin: -log σ(r_chosen - r_rejected - margin); "
                                           "a record's own 'margin' field takes precedence")


class DpoSettings(Strict):
    beta: float = Field(0.1, gt=0, description="strength of the pull towards the reference model")
    loss_type: Literal["sigmoid", "ipo"] = Field(
        "sigmoid", description="sigmoid: DPO's -log σ(β·(chosen log-ratio - rejected log-ratio)); ipo: IPO's squared "
        "distance of the per-token log-ratio margin from 1/(2β)")
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5,
                                   description="conservative DPO: the probability that a pair's label is flipped")

    @model_validator(mode="after")
    def _smoothing_is_for_sigmoid(self) -> "DpoSettings":
        if self.loss_type == "ipo" and self.label_smoothing:
            raise ValueError("label_smoothing applies to loss_type 'sigmoid' only; IPO has no label noise term")
        return self


class PpoSettings(Strict):
    reward_model: Annotated[str | None, Expect.FOLDER] = Field(
        None, description="folder saved by an `objective: reward` run (its adapter/ or model/)")
    reward_function: str | None = Field(None, description="'package.module:function' or 'path/to/file.py:function'; "
                                        "called as fn(prompts, completions, **info) -> list of floats")
    max_new_tokens: int = Field(32, gt=0, description="longest sampled completion")
    temperature: float = Field(1.0, gt=0, description="sampling temperature of the rollouts")
    top_k: int = Field(0, ge=0, description="0: sample from the whole vocabulary")
    epochs: int = Field(2, gt=0, description="optimisation passes over each rollout")
    minibatch_size: int = Field(8, gt=0, description="completions per optimizer step")
    kl_coef: float = Field(0.05, ge=0, description="per-token KL penalty to the reference, subtracted from the reward")
    clip_range: float = Field(0.2, gt=0, description="policy ratio clip ε")
    value_clip_range: float = Field(0.2, gt=0, description="value prediction clip around the rollout's values")
    value_coef: float = Field(0.1, ge=0, description="weight of the value loss")
    gamma: float = Field(1.0, gt=0, le=1, description="discount per token of later rewards in the advantages (GAE); "
                         "1: none")
    lam: float = Field(0.95, ge=0, le=1, description="GAE λ")
    whiten_advantages: bool = Field(True, description="shift and scale each rollout's advantages to mean 0 and "
                                    "variance 1 before the policy loss")
    missing_eos_penalty: float | None = Field(None, description="subtracted from the reward of a completion that "
                                                                "hit max_new_tokens without ending")

    @model_validator(mode="after")
    def _one_reward_source(self) -> "PpoSettings":
        if self.reward_model and self.reward_function:
            raise ValueError("set ppo.reward_model or ppo.reward_function, not both")
        if not (self.reward_model or self.reward_function):
            raise ValueError("ppo.reward_model / ppo.reward_function: PPO needs a reward source; set "
                             "ppo.reward_model to a folder saved by an `objective: reward` run, or "
                             "ppo.reward_function to 'module:function'")
        return self


class OrpoSettings(Strict):
    beta: float = Field(0.1, gt=0, description="λ: weight of the odds-ratio term -log σ(log odds(chosen) - log "
                                               "odds(rejected)) beside the NLL of the chosen answer")


class SimpoSettings(Strict):
    beta: float = Field(2.0, gt=0, description="scale of the length-normalised log-prob margin")
    gamma: float = Field(1.0, ge=0, description="target reward margin γ: -log σ(β·(avg log π(chosen) - avg log "
                                               "π(rejected)) - γ)")
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5, description="the probability that a pair's label is flipped")
    nll_weight: float = Field(0.0, ge=0, description="weight of an NLL term on the chosen answer (TRL's cpo_alpha)")


class KtoSettings(Strict):
    beta: float = Field(0.1, gt=0, description="strength of the pull towards the reference model")
    desirable_weight: float = Field(1.0, gt=0, description="weight of the losses of desirable (label true) examples")
    undesirable_weight: float = Field(1.0, gt=0, description="weight of the losses of undesirable (label false) "
                                                             "examples")


class ClassifySettings(Strict):
    labels: list[str] | None = Field(
        None, description="the label names, in the order of the head's outputs (id2label of the saved classifier); "
        "default: the training data's labels, sorted. Every record's label must be one of them")

    @field_validator("labels", mode="before")
    @classmethod
    def _numbers_are_names(cls, value):
        """`labels: [0, 1]` names the labels "0" and "1", as integer labels in the data are read; spaces around a
        name are dropped, as they are from the data's labels."""
        if isinstance(value, list):
            return [str(v) if isinstance(v, int) and not isinstance(v, bool) else v.strip() if isinstance(v, str)
                    else v for v in value]
        return value

    @model_validator(mode="after")
    def _labels_are_distinct(self) -> "ClassifySettings":
        if self.labels is None:
            return self
        names = self.labels
        if len(names) < 2:
            raise ValueError(f"a classifier needs at least two labels, got {self.labels}")
        if "" in names:
            raise ValueError("a label is empty")
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"labels named twice: {', '.join(repeated)}")
        return self


REWARD_BUILTINS = ("exact_match", "format", "length")


class GrpoSettings(Strict):
    num_generations: int = Field(4, ge=2, description="G: completions sampled per prompt (the group)")
    max_new_tokens: int = Field(32, gt=0, description="longest sampled completion")
    temperature: float = Field(1.0, gt=0, description="sampling temperature")
    top_k: int = Field(0, ge=0, description="0: sample from the whole vocabulary")
    reward_functions: list[str] = Field(
        default_factory=list, description="built-ins 'exact_match' (the record's answer), 'format' (format_pattern "
        "matches the whole completion), 'length' (-tokens/max_new_tokens), or 'path/to/file.py:function' / "
        "'module:function' called as fn(prompts, completions, **info) -> floats")
    reward_model: Annotated[str | None, Expect.FOLDER] = Field(
        None, description="folder saved by an `objective: reward` run, scored after the functions")
    reward_weights: list[float] | None = Field(None, description="one weight per reward (functions, then the model); "
                                                                 "default all 1")
    format_pattern: str = Field(r"\S.*", description="regular expression the 'format' reward matches against the "
                                                      "whole completion text (its end-of-turn token removed)")
    answer_pattern: str | None = Field(None, description="'exact_match' compares the last match of this regular "
                                       "expression in the completion (its first group, if it has one) instead of "
                                       "the whole text, e.g. '-?\\d+' for the last number")
    loss_type: Literal["grpo", "bnpo", "dr_grpo"] = Field(
        "grpo", description="grpo: each completion's token mean, then the mean over completions; bnpo: the mean over "
        "all completion tokens; dr_grpo: the token sum over completions × max_new_tokens")
    scale_rewards: Literal["group", "batch", "none"] = Field(
        "group", description="advantage = reward - group mean, divided by the group's (or the batch's) std; none: "
                             "not divided (Dr. GRPO)")
    beta: float = Field(0.0, ge=0, description="weight of the per-token KL (k3 estimator) to the reference model "
                                               "(adapters off); 0: no reference forward at all")
    epsilon: float = Field(0.2, gt=0, description="policy ratio clip: [1 - epsilon, 1 + epsilon_high]")
    epsilon_high: float | None = Field(None, gt=0, description="upper clip; default: epsilon")
    num_iterations: int = Field(1, gt=0, description="μ: optimisation passes (optimizer steps) per generation batch")
    minibatch_size: int = Field(16, gt=0, description="completions per forward/backward (gradients accumulate over a "
                                                      "pass, so this only bounds memory)")

    @model_validator(mode="after")
    def _rewards_are_given_and_weighted(self) -> "GrpoSettings":
        n = len(self.reward_functions) + (1 if self.reward_model else 0)
        if n == 0:
            raise ValueError("grpo needs at least one reward: set grpo.reward_functions (built-ins: "
                             f"{', '.join(REWARD_BUILTINS)}; or 'path/to/file.py:function') and/or grpo.reward_model")
        if self.reward_weights is not None and len(self.reward_weights) != n:
            raise ValueError(f"grpo.reward_weights has {len(self.reward_weights)} weights for {n} rewards (the "
                             "functions in order, then the reward model); give one weight per reward")
        for spec in self.reward_functions:
            if spec not in REWARD_BUILTINS and ":" not in spec:
                raise ValueError(f"grpo.reward_functions: {spec!r} is neither a built-in ({', '.join(REWARD_BUILTINS)}) "
                                 "nor 'path/to/file.py:function'")
        import re

        for field, pattern in (("format_pattern", self.format_pattern), ("answer_pattern", self.answer_pattern)):
            try:
                re.compile(pattern or "")
            except re.error as e:
                raise ValueError(f"grpo.{field}: {pattern!r} is not a regular expression ({e})") from None
        return self

    @property
    def weights(self) -> list[float]:
        n = len(self.reward_functions) + (1 if self.reward_model else 0)
        return list(self.reward_weights) if self.reward_weights is not None else [1.0] * n


class TeacherContext(Strict):
    system: str | None = Field(None, description="a system prompt the teacher sees before each question and the "
                               "student does not (joined before the record's own system prompt, if it has one)")
    few_shot: int = Field(0, ge=0, description="N: question/answer examples from the training data the teacher sees "
                          "before each question (an example is never its own shot), as `tunesmith icl` puts them")
    select: Literal["fixed", "random", "similar"] = Field(
        "fixed", description="how the shots are chosen, as `tunesmith icl --select`: fixed (the first N, the same "
        "prompt every time), random (seeded per example by train.seed) or similar (nearest by embedding)")

    @model_validator(mode="after")
    def _some_context(self) -> "TeacherContext":
        if not self.system and not self.few_shot:
            raise ValueError("distill.teacher_context: give a system prompt, few_shot examples or both; an empty "
                             "context would make the teacher see what the student sees")
        return self


class DistillSettings(Strict):
    teacher: Annotated[str | None, Expect.MODEL] = Field(
        None, description="the teacher: another model folder or hub id with the same vocabulary as the student's "
        "tokenizer; default: the student's own base with the trained adapters switched off")
    teacher_adapter: Annotated[str | None, Expect.FOLDER] = Field(
        None, description="folder of an adapter trained on this run's base: the teacher is the base with that "
        "adapter")
    teacher_context: TeacherContext | None = Field(
        None, description="context distillation: what the teacher sees before each question and the student does "
        "not; both score the same answer tokens")
    loss: Literal["forward_kl", "reverse_kl", "jsd"] = Field(
        "forward_kl", description="forward_kl: KL(teacher || student) per answer token; reverse_kl: KL(student || "
        "teacher); jsd: GKD's generalized Jensen-Shannon divergence with beta")
    beta: float = Field(0.5, ge=0, le=1, description="jsd's mixture weight: M = (1 - beta)·student + "
                        "beta·teacher, loss beta·KL(teacher || M) + (1 - beta)·KL(student || M); 0 is forward_kl, "
                        "1 reverse_kl (TRL's generalized_jsd_loss)")
    temperature: float = Field(1.0, gt=0, description="both distributions are softmax(logits / temperature)")
    sft_weight: float = Field(0.0, ge=0, description="weight of the cross-entropy on the data's own answers added "
                              "to the distillation loss; 0: none")

    @model_validator(mode="after")
    def _one_teacher(self) -> "DistillSettings":
        if self.teacher and self.teacher_adapter:
            raise ValueError("set distill.teacher (another model) or distill.teacher_adapter (an adapter on this "
                             "run's base), not both")
        if "beta" in self.model_fields_set and self.loss != "jsd":
            raise ValueError(f"distill.beta applies to loss 'jsd' only; loss '{self.loss}' is beta "
                             f"{0 if self.loss == 'forward_kl' else 1} by definition")
        return self

    def run_refusal(self, cfg) -> str | None:
        """Why this section cannot train with the run's method, or None (RunConfig asks every section that has
        this)."""
        if self.teacher or self.teacher_adapter or not cfg.method.declaration.trains_base:
            return None
        return (f"distill.teacher: method {cfg.method.name} trains the base weights in place, so the base cannot be "
                "the teacher without a second copy; give distill.teacher (a model folder or hub id) or train an "
                "adapter method (lora, ...)")

    @property
    def jsd_beta(self) -> float:
        """The generalized JSD's beta that the chosen loss is."""
        return {"forward_kl": 0.0, "reverse_kl": 1.0}.get(self.loss, self.beta)


def _cut_apart(name: str) -> str:
    return f"would cut {name} examples apart; use 'drop' or 'truncate'"


PAIRS = ("preference",)
PAIRS_DESCRIBED = " (prompt, chosen, rejected)"
PROMPTS = ("preference", "alpaca", "sharegpt", "messages", "unpaired")
PROMPTS_DESCRIBED = " (prompts: 'prompt' records or conversations)"
SAMPLED = "trains on the answers the policy samples; the prompt is given, not generated, so it is never trained"


# One declaration per objective: the names config accepts for `objective:`, in this order.
OBJECTIVES = (
    ObjectiveDeclaration(
        "sft", ("alpaca", "sharegpt", "messages"), " (conversations)", mixes_tasks=True,
        task_formats=("text",),  # a raw-text task beside chat tasks: replay of general text, every token trained
        split_refusal="cuts chat examples mid-turn; use 'drop' or 'truncate' for sft"),
    ObjectiveDeclaration("text", ("text",), " (raw documents with a 'text' field)", mixes_tasks=True,
                         default_overlong="split"),
    ObjectiveDeclaration(
        "reward", PAIRS, PAIRS_DESCRIBED, RewardSettings, pairs=True, lm_loss=False,
        own_head="scores each sequence with a scalar head on its last hidden state", head=("reward head", 0),
        split_refusal=_cut_apart("reward"),
        prompt_never_trained="scores each answer with a scalar head on its last hidden state; there is no per-token "
        "loss that could include the prompt"),
    ObjectiveDeclaration(
        "dpo", PAIRS, PAIRS_DESCRIBED, DpoSettings, reference="cached", pairs=True, scores_logps=True,
        split_refusal=_cut_apart("dpo"),
        prompt_never_trained="compares the chosen and the rejected answer to the same prompt: the prompt's "
        "log-probabilities would cancel in their difference, so DPO scores answer tokens only"),
    # orpo takes data.train_on_prompt: true to put the prompt's tokens in its NLL term, as TRL's ORPOTrainer does;
    # the odds ratio is always over the answers' tokens only
    ObjectiveDeclaration("orpo", PAIRS, PAIRS_DESCRIBED, OrpoSettings, pairs=True, scores_logps=True,
                         split_refusal=_cut_apart("orpo")),
    ObjectiveDeclaration(
        "simpo", PAIRS, PAIRS_DESCRIBED, SimpoSettings, pairs=True, scores_logps=True,
        split_refusal=_cut_apart("simpo"),
        prompt_never_trained="compares the length-normalised log-probabilities of the two answers to the same "
        "prompt; the prompt is never scored"),
    ObjectiveDeclaration(
        "kto", ("unpaired", "preference"), " (prompt, completion, label; or prompt, chosen, rejected: each pair "
        "becomes two examples)", KtoSettings, reference="forward", pairs=True, scores_logps=True,
        split_refusal=_cut_apart("kto"),
        prompt_never_trained="scores each completion's log-ratio to the reference; the prompt is never scored"),
    ObjectiveDeclaration(
        "ppo", PROMPTS, PROMPTS_DESCRIBED, PpoSettings, reference="forward", samples=True, scores_logps=True,
        head=("value head", 1), rollout_buffers=6, split_refusal=_cut_apart("ppo"), prompt_never_trained=SAMPLED,
        accumulates_itself="PPO splits each rollout into ppo.minibatch_size pieces itself; leave grad_accum at 1",
        not_distributed="PPO's step (train/ppo_step.py) samples its rollouts and scores them on one process; it is not "
        "sharded over ranks. Train PPO without torchrun (remove the distributed: section)"),
    ObjectiveDeclaration(
        "grpo", PROMPTS, PROMPTS_DESCRIBED, GrpoSettings, reference="forward", reference_weight="beta",
        samples=True, scores_logps=True, split_refusal=_cut_apart("grpo"), prompt_never_trained=SAMPLED,
        accumulates_itself="GRPO accumulates each pass over its generation batch in grpo.minibatch_size pieces "
        "itself; leave grad_accum at 1",
        not_distributed="GRPO's step (train/grpo_step.py) samples each group's completions and scores them on one "
        "process; it is not sharded over ranks. Train GRPO without torchrun (remove the distributed: section)"),
    ObjectiveDeclaration(
        "classify", (), "", ClassifySettings, lm_loss=False, fixed_format='{"text", "label"}',
        own_head="reads a label head on each text's last hidden state", default_overlong="truncate",
        split_refusal=_cut_apart("classify"),
        prompt_never_trained="reads a label head at each text's last token; a text has no prompt"),
    ObjectiveDeclaration(
        "distill", ("alpaca", "sharegpt", "messages"), " (conversations: the teacher scores their answers)",
        DistillSettings, teacher=True, split_refusal=_cut_apart("distill"),
        prompt_never_trained="matches the teacher's distribution on the answer tokens only; with a teacher_context "
        "the teacher's prompt is not the student's, so prompts cannot be compared token by token"),
)
OBJECTIVE_NAMES = tuple(d.name for d in OBJECTIVES)
OBJECTIVE_SECTIONS = {d.name: d.section for d in OBJECTIVES if d.section is not None}


def objective_declaration(name: str) -> ObjectiveDeclaration:
    return next(d for d in OBJECTIVES if d.name == name)
