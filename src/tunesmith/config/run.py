"""The run configuration: YAML validated by pydantic. Unknown keys and wrong types name the field."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tunesmith.config.declarations import ObjectiveDeclaration
from tunesmith.config.distributed import DistributedSettings, refusal
from tunesmith.config.loading import load_yaml_model
from tunesmith.config.methods import METHOD_NAMES, LoraSettings, MethodSettings, settings_class
from tunesmith.config.optimizer import OPTIMIZERS, GaloreSettings, galore_refusal
from tunesmith.config.objectives import (OBJECTIVE_NAMES, OBJECTIVE_SECTIONS, OBJECTIVES, ClassifySettings,
                                         DistillSettings, DpoSettings, GrpoSettings, KtoSettings, OrpoSettings,
                                         PpoSettings, RewardSettings, SimpoSettings, objective_declaration)
from tunesmith.paths import Expect

DEFAULT_MODEL = "builtin:smollm2-135m-instruct"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSettings(Strict):
    path: Annotated[str, Expect.MODEL] = Field(DEFAULT_MODEL,
                                               description="builtin:NAME, a local HF folder, or a hub id")
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="the dtype the model's weights load and are stored in (the trained parameters of "
        "lora, dora, qlora, ia3, vera, adapter, prompt, prefix, the objectives' heads are fp32 whatever it is); "
        "bfloat16 only for methods that keep the base frozen (not full, freeze, bitfit: use train.bf16 for those); "
        "auto: bfloat16 where the run trains in bf16 (train.bf16, with train.bf16_frozen_weights) and the method "
        "keeps the base frozen, so no fp32 copy of the base is ever held; float32 otherwise (effective.yaml says "
        "which)")
    trust_remote_code: bool = Field(
        False, description="run the Python code a model ships for its architecture (transformers' "
        "trust_remote_code); off: a model that needs it is refused")
    allow_download: bool = Field(
        False, description="fetch a hub id that is not in the local Hugging Face cache from the Hub (also: "
        "TUNESMITH_ALLOW_DOWNLOAD=1); off: nothing is downloaded at run time")
    add_tokens: list[Annotated[str, Field(min_length=1)]] = Field(
        default_factory=list, description="plain tokens added to the vocabulary (domain terms): the embedding, and an "
        "untied output head, grow by one row each; a token the vocabulary already holds is reported and not added")
    add_special_tokens: list[Annotated[str, Field(min_length=1)]] = Field(
        default_factory=list, description="special tokens added to the vocabulary (a chat template's markers): never "
        "split, skipped when decoding with skip_special_tokens; otherwise as add_tokens")
    new_token_init_text: dict[str, str] = Field(
        default_factory=dict, description="token -> text: that added token's row starts as the mean of the text's "
        "token embeddings (tokenized before anything was added); an added token not listed starts as the mean of "
        "all the existing rows")
    trainable_tokens: list[str | int] | None = Field(
        None, description="tokens (strings, each one token, or ids) whose embedding rows train beside the added "
        "tokens' (which always train) and beside what the method trains, with any method but full (which trains the "
        "whole embedding anyway); the rest of the embedding stays as it is; saved in PEFT's trainable_token_indices "
        "layout")

    @model_validator(mode="after")
    def _new_tokens_consistent(self) -> "ModelSettings":
        added = self.add_tokens + self.add_special_tokens
        twice = sorted({t for t in added if added.count(t) > 1})
        if twice:
            raise ValueError(f"model.add_tokens / model.add_special_tokens: {twice} listed more than once")
        for token, text in self.new_token_init_text.items():
            if token not in added:
                raise ValueError(f"model.new_token_init_text.{token}: {token!r} is not in model.add_tokens or "
                                 "model.add_special_tokens")
            if not text.strip():
                raise ValueError(f"model.new_token_init_text.{token}: empty text; give words whose embeddings the "
                                 "new row starts from")
        return self

    @property
    def added_tokens(self) -> list[str]:
        return self.add_tokens + self.add_special_tokens


FORMATS = Literal["auto", "alpaca", "sharegpt", "messages", "text", "preference", "unpaired"]


class TaskSettings(Strict):
    name: str = Field(min_length=1, description="the task's name, which data.mixture.weights and the report's "
                      "per-task rows use")
    train: Annotated[str | list[str], Expect.DATA] = Field(
        description="this task's training data: one file or `datasets` folder, or a list of them read together")
    eval: Annotated[str | list[str] | None, Expect.DATA] = Field(
        None, description="this task's held-out data; default: none, or data.eval_fraction of its training records")
    format: FORMATS = Field("auto", description="this task's record format; auto: recognised from the records' keys")
    system_prompt: str | None = Field(None, description="the system message put before this task's conversations "
                                      "that have none; default: data.system_prompt")
    instruction_prefix: str | None = Field(None, description="put before each user turn (each document) of this task")
    weight: float | None = Field(None, ge=0, description="this task's share under mixture kind explicit")


class MixtureSettings(Strict):
    kind: Literal["proportional", "temperature", "explicit"] = Field(
        "proportional", description="proportional: each task's share is its share of the train examples; "
        "temperature: proportional to size^(1/T); explicit: the tasks' `weight`s (or `weights` by task name)")
    temperature: float = Field(2.0, gt=0, description="T of kind temperature: each task's share is proportional to "
                               "its size^(1/T), so 1 is proportional and a larger T moves the mix toward equal shares")
    weights: dict[str, Annotated[float, Field(ge=0)]] | None = Field(
        None, description="kind explicit: each task's weight by its name, instead of the tasks' own `weight` "
        "(normalised to sum to 1)")


class DataSettings(Strict):
    train: Annotated[str | list[str] | None, Expect.DATA] = Field(
        None, description="the training data: a .jsonl, .json, .csv or .parquet file or a `datasets` folder, or a list "
        "of them read together; give it or data.tasks")
    tasks: list[TaskSettings] | None = Field(
        None, description="multi-task fine-tuning: several named data sets mixed by data.mixture (instead of "
        "data.train)")
    mixture: MixtureSettings = Field(default_factory=MixtureSettings,
                                     description="how often each of data.tasks supplies the next training example")
    eval: Annotated[str | list[str] | None, Expect.DATA] = Field(
        None, description="held-out data scored before and after training; default: none, or data.eval_fraction of "
        "data.train")
    eval_fraction: float = Field(0.0, ge=0.0, lt=1.0, description="the share of data.train's records held out for "
                                 "scoring (picked with train.seed) where there is no data.eval; 0: none")
    format: FORMATS = Field("auto", description="the records' format (see Data formats); auto: recognised from the "
                            "records' keys")
    max_length: int = Field(1024, gt=8, description="the longest example in tokens, and the length of a packed row; "
                            "longer examples follow data.overlong")
    overlong: Literal["drop", "truncate", "split"] | None = Field(
        None, description="what to do with examples over max_length; default: drop for sft, split for text"
    )
    train_on_prompt: bool = Field(False, description="also train on the prompt's tokens (system and user turns); "
                                  "false: the loss covers the answers only")
    packing: bool = Field(True, description="put several examples in each row of up to data.max_length tokens, each "
                          "attending to itself only; false: one example per row, padded to the batch's longest")
    share_prefixes: bool = Field(
        True, description="in packed batches, compute the leading tokens that examples share (a system prompt, a "
        "DPO pair's prompt) once: the same values, less work; applies where segment attention runs (SDPA "
        "attention without sliding windows)")
    system_prompt: str | None = Field(None, description="the system message put before every conversation that has "
                                      "none; default: none")
    max_examples: int | None = Field(None, gt=0, description="per task, in a multi-task run")
    max_eval_examples: int | None = Field(None, gt=0, description="per task, in a multi-task run")

    @model_validator(mode="after")
    def _train_or_tasks(self) -> "DataSettings":
        if (self.train is None) == (self.tasks is None):
            raise ValueError("data.train / data.tasks: give exactly one: data.train (one data set) or data.tasks (a "
                             "list of named data sets to mix)")
        if self.tasks is None:
            if self.mixture.weights is not None or self.mixture.kind != "proportional":
                raise ValueError("data.mixture: mixes the data.tasks; with data.train alone there is nothing to mix")
            return self
        names = [t.name for t in self.tasks]
        if not self.tasks:
            raise ValueError("data.tasks: empty; list at least one task")
        if len(set(names)) != len(names):
            raise ValueError(f"data.tasks: task names must be unique (got {names})")
        for name in self.mixture.weights or {}:
            if name not in names:
                raise ValueError(f"data.mixture.weights.{name}: no task is named {name!r}; the tasks are "
                                 f"{', '.join(names)}")
        if self.mixture.kind != "explicit":
            given = [f"data.tasks.{i}.weight" for i, t in enumerate(self.tasks) if t.weight is not None]
            if self.mixture.weights is not None:
                given.insert(0, "data.mixture.weights")
            if given:
                raise ValueError(f"{given[0]}: weights apply to data.mixture.kind explicit, but the kind is "
                                 f"{self.mixture.kind!r}; set kind: explicit or remove them")
            return self
        for i, (name, weight) in enumerate(zip(names, self.task_weights())):
            if weight is None:
                raise ValueError(f"data.tasks.{i}.weight: mixture kind explicit needs a weight for task {name!r} "
                                 "(here or in data.mixture.weights)")
        if sum(self.task_weights()) <= 0:
            raise ValueError("data.mixture.weights: the task weights sum to zero; give at least one task a "
                             "positive weight")
        return self

    def task_weights(self) -> list[float | None]:
        """Each task's explicit weight: data.mixture.weights by name first, else the task's own `weight`."""
        by_name = self.mixture.weights or {}
        return [by_name.get(t.name, t.weight) for t in self.tasks or []]


class TrainSettings(Strict):
    epochs: float = Field(1.0, gt=0, description="passes over the training examples (fractions allowed) where "
                          "train.max_steps is unset: ceil(epochs × examples / (batch_size × grad_accum × ranks)) steps")
    max_steps: int | None = Field(None, gt=0, description="optimizer steps to train, instead of train.epochs; default: "
                                  "from train.epochs")
    batch_size: int = Field(8, gt=0, description="examples per micro-batch (per rank under torchrun)")
    grad_accum: int = Field(1, gt=0, description="micro-batches whose gradients add up before each optimizer step "
                            "(the effective batch is batch_size × grad_accum × ranks)")
    lr: float = Field(2e-4, gt=0, description="AdamW's peak learning rate, reached after train.warmup_steps")
    weight_decay: float = Field(0.0, ge=0, description="AdamW's decoupled weight decay; 0: none")
    optimizer: Literal[OPTIMIZERS] = Field(
        "adamw", description="adamw (fused AdamW), or galore: AdamW whose moments live in a low-rank projection of "
        "each targeted weight matrix's gradient (train.galore; methods full and freeze)")
    galore: GaloreSettings = Field(default_factory=GaloreSettings, description="GaLore's rank, projection refresh "
                                   "interval, scale and target layers, with train.optimizer: galore")
    warmup_steps: int = Field(0, ge=0, description="steps over which the learning rate rises linearly to train.lr; "
                              "0: none")
    schedule: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="the learning rate after warm-up: cosine or linear decay to 0 at the last step, or "
        "constant")
    max_grad_norm: float | None = Field(1.0, gt=0, description="clip the gradients' global L2 norm to this before "
                                        "each step; null: no clipping")
    eval_every: int | None = Field(None, gt=0, description="also score the held-out data every N steps; null: only "
                                   "before and after training")
    save_every: int | None = Field(None, gt=0, description="write a checkpoint every N steps, which --resume "
                                   "continues from; null: none (the trained artifact is still saved at the end)")
    keep_checkpoints: int = Field(2, gt=0, description="how many of the newest checkpoints the run keeps; older "
                                  "ones are deleted")
    log_every: int = Field(1, gt=0, description="log the step's training metrics (loss, learning rate, ...) to "
                           "metrics.jsonl every N steps, and at the last step")
    seed: int = Field(42, description="seed of the initial weights, the order of the training examples and the "
                      "data.eval_fraction split")
    bf16: bool = Field(False, description="bf16 autocast with fp32 master weights")
    bf16_frozen_weights: bool = Field(
        True, description="with train.bf16, store the frozen linear weights of the base in bf16 once instead of "
        "autocast casting them at every step (the same products; 2 bytes a frozen weight instead of 4 + a per-step "
        "copy of 2; not for full, freeze, bitfit, whose artifact is the base); false: keep them in fp32")
    loss_chunk: int | None = Field(
        256, gt=0, description="compute the LM head and cross-entropy (DPO's and PPO's per-token log-probs) over "
        "label positions this many at a time, with the gradient formed chunk by chunk, so the (tokens × vocabulary) "
        "logits never exist whole (faster and smaller: measured 1.24x, -0.3 GB on bench/peers.py workload 1; 256 "
        "rather than 1024 since the head runs through oneDNN on CPU, 18 % faster there); null: all label positions at "
        "once (reward, which has no LM head: null only)")
    onednn_linear: bool = Field(
        True, description="on CPU, run the products of fp32 linear layers (forward, input and weight "
        "gradients), LoRA's and the LM head's through oneDNN instead of MKL (same values up to summation order; "
        "12-15 % faster steps on an earlier AMD EPYC, oneDNN's products 1.8-2.2x MKL's on AMD Zen 5); false: "
        "PyTorch's own products")
    segment_attention: bool = Field(
        True, description="run a packed batch as one padding-free row, each example attending to itself only "
        "(kernels/segment_attention.py; where the model's attention is SDPA or eager, sliding windows and soft-capping "
        "included); false: the block-diagonal mask over padded rows")
    fused_norm: bool = Field(True, description="RMSNorm (Llama's weight or Gemma's 1 + weight) of fp32 activations "
                             "as one autograd node with a hand-written backward (the same values); under CPU bf16 "
                             "autocast the norms only linears read write their output in bf16 once for all of them; "
                             "false: the model's own norm")
    keep_freed_memory: bool = Field(
        True, description="set glibc's malloc to keep freed memory for the next step instead of handing it back "
        "(fewer page faults; kernels/allocator.py). It applies to the whole process for the rest of its life (glibc "
        "has no undo): false leaves the allocator alone, e.g. when tunesmith runs inside a long-lived process")
    compile: bool | Literal["auto"] = Field(
        "auto", description="torch.compile the decoder layers (all but the first) for the training step. auto: after "
        "3 eager steps, compile when the tokens left at the measured eager speed would save at least 1.5x the "
        "compile time (the speed-up and compile seconds last measured on this machine, else 1.25x and 60 s); only on "
        "CPU under bf16 (fp32 compiled ran 0.65x eager), one process, the supervised step. true: compile from the "
        "first step; false: never. summary.json reports the decision and the compile seconds")
    activation_checkpointing: bool = Field(
        False, description="recompute each decoder layer's activations in the backward pass: less memory, ~30 % "
        "more compute")
    threads: int | None = Field(None, gt=0, description="torch's CPU threads for the run; null: torch's default")
    device: Literal["auto", "cpu", "cuda", "mps"] = Field(
        "auto", description="where the run trains: auto is CUDA, else Apple's MPS, else the CPU")


class ForgettingSettings(Strict):
    corpus: Annotated[str | None, Expect.DATA] = Field(
        None, description="a JSONL/CSV/Parquet file of {text} records; default: the shipped slice of general English "
        "and code (src/tunesmith/eval/general_text.jsonl, data/general/README.md)")
    max_tokens: int = Field(512, gt=8, description="tokens read from the corpus, split evenly between its records")


class ReportSettings(Strict):
    compare: bool = Field(True, description="score the held-out data and answer the sample prompts with the untrained "
                          "model too, so report.md compares before and after; false: no before scores and no samples")
    forgetting: ForgettingSettings | None = Field(
        default_factory=ForgettingSettings, description="general-text perplexity before and after training (how much "
        "general ability the run cost); null or false: off")
    heldout_samples: int = Field(3, ge=0, description="held-out prompts answered before and after training in "
                                 "report.md; 0: none")
    trained_samples: int = Field(3, ge=0, description="training prompts answered before and after training in "
                                 "report.md (what the run learned); 0: none")
    max_new_tokens: int = Field(64, gt=0, description="the longest answer of those samples, in tokens")

    @field_validator("forgetting", mode="before")
    @classmethod
    def _false_is_off(cls, value):
        if value is False:
            return None
        return {} if value is True else value


def _quantize_base_means_qlora(data):
    """`method: {name: lora, quantize_base: nf4}` is spelled-out QLoRA: the same settings as `name: qlora`."""
    method = data.get("method") if isinstance(data, dict) else None
    if not isinstance(method, dict) or "quantize_base" not in method or method.get("name") != "lora":
        return data
    method = dict(method)
    quant_type = method.pop("quantize_base")
    if quant_type is not None:
        method.update(name="qlora", quant_type=quant_type)
    return {**data, "method": method}


def _objective_section(name: str):
    return Field(None, description=f"the options of objective {name}, only with objective: {name}, which takes "
                 "their defaults where the section is left out")


class RunConfig(Strict):
    model: ModelSettings = Field(default_factory=ModelSettings, description="the model to fine-tune and how it "
                                 "loads")
    method: MethodSettings = Field(default_factory=LoraSettings, discriminator="name", description="what trains: the "
                                   "method named by method.name, with its options; default: lora")
    objective: Literal[OBJECTIVE_NAMES] = Field(
        "sft", description="the loss: each objective reads its own data formats (Methods table) and takes its options "
        "from the section of its name")
    reward: RewardSettings | None = _objective_section("reward")
    dpo: DpoSettings | None = _objective_section("dpo")
    orpo: OrpoSettings | None = _objective_section("orpo")
    simpo: SimpoSettings | None = _objective_section("simpo")
    kto: KtoSettings | None = _objective_section("kto")
    ppo: PpoSettings | None = _objective_section("ppo")
    grpo: GrpoSettings | None = _objective_section("grpo")
    classify: ClassifySettings | None = _objective_section("classify")
    distill: DistillSettings | None = _objective_section("distill")
    data: DataSettings = Field(description="where the training and held-out examples come from and how they become "
                               "token sequences")
    train: TrainSettings = Field(default_factory=TrainSettings, description="the optimisation: its length, batch, "
                                 "learning rate, precision, speed switches, checkpoints and device")
    report: ReportSettings = Field(default_factory=ReportSettings, description="what report.md shows beside the "
                                   "loss: before and after scores, sample answers, forgetting")
    distributed: DistributedSettings | None = Field(
        None, description="for runs launched by torchrun: how the ranks share the work; without torchrun the run "
        "is one process")
    output_dir: Annotated[str, Expect.OUT_FOLDER] = Field(
        "runs/latest", description="the run folder for the trained artifact, config.yaml, metrics.jsonl, report.md "
        "and checkpoints; one that holds files needs --overwrite or --resume")

    @model_validator(mode="before")
    @classmethod
    def _lora_by_default(cls, data):
        if isinstance(data, dict) and isinstance(data.get("method"), dict) and "name" not in data["method"]:
            data = {**data, "method": {"name": "lora", **data["method"]}}
        return _quantize_base_means_qlora(data)

    @model_validator(mode="before")
    @classmethod
    def _objective_section_by_default(cls, data):
        """`objective: dpo` without a `dpo:` section gets the defaults."""
        name = data.get("objective") if isinstance(data, dict) else None
        if name in OBJECTIVE_SECTIONS and data.get(name) is None:
            data = {**data, name: {}}
        return data

    @model_validator(mode="after")
    def _trained_weights_are_fp32(self) -> "RunConfig":
        """Master weights in fp32 for bf16 storage would cost more memory than fp32 weights under bf16 autocast
        (6 bytes a weight against 4), so bf16 storage of the trained weights is refused, not patched."""
        if self.model.dtype == "bfloat16" and self.method.declaration.trains_base:
            raise ValueError(
                f"model.dtype: bfloat16 with method {self.method.name} trains the model's own bf16 weights with "
                "no fp32 master copy, so AdamW updates smaller than bf16's resolution (about 1/256 of a weight) "
                "round away. Use model.dtype: float32 with train.bf16: true (bf16 autocast over fp32 master "
                "weights), or a method that trains fp32 parameters beside the bf16 base (lora, qlora, ia3, adapter, "
                "...)")
        return self

    @model_validator(mode="after")
    def _token_rows_where_the_embedding_is_frozen(self) -> "RunConfig":
        if self.model.trainable_tokens is not None and self.method.declaration.parameters == "whole":
            raise ValueError(f"model.trainable_tokens: method {self.method.name} trains the whole embedding (every "
                             "row) anyway; remove trainable_tokens (tokens added by model.add_tokens simply grow the "
                             "model), or use an adapter method such as lora to train only chosen rows")
        if (self.model.added_tokens or self.model.trainable_tokens) and self.distributed is not None \
                and self.distributed.strategy == "fsdp":
            raise ValueError("model.add_tokens / model.trainable_tokens: not under distributed.strategy fsdp (the "
                             "embedding is read shard by shard as the checkpoint has it, so it cannot grow first); "
                             "use distributed.strategy: ddp or one process")
        return self

    @model_validator(mode="after")
    def _objective_fits_data(self) -> "RunConfig":
        declared = self.objective_declaration
        if declared.split_refusal and self.data.overlong == "split":
            raise ValueError(f"data.overlong: 'split' {declared.split_refusal}")
        self._refuse_settings_the_objective_cannot_use()
        section = declared.section
        settings = self.objective_settings
        if settings is None and hasattr(section, "run_refusal"):
            settings = section()  # the defaults of a section left out
        why = settings.run_refusal(self) if hasattr(settings, "run_refusal") else None
        if why:
            raise ValueError(why)
        if self.distributed is not None:
            why = refusal(declared, self.method, self.distributed.strategy)
            if why:
                raise ValueError(f"distributed: {why}")
        for name in OBJECTIVE_SECTIONS:
            if name != self.objective and getattr(self, name) is not None:
                raise ValueError(f"{name}: these are settings of objective '{name}', but objective is "
                                 f"'{self.objective}'; remove the section or set objective: {name}")
        if declared.accumulates_itself and self.train.grad_accum != 1:
            raise ValueError(f"train.grad_accum: {declared.accumulates_itself}")
        if self.train.optimizer == "galore":
            why = galore_refusal(self.method, self.distributed.strategy if self.distributed else None)
            if why:
                raise ValueError(f"train.optimizer: {why}")
        return self

    def _refuse_settings_the_objective_cannot_use(self) -> None:
        """Settings a user gave that this objective would have nothing to apply to (their defaults pass)."""
        declared = self.objective_declaration
        if self.data.tasks is not None and not declared.mixes_tasks:
            mixing = " and ".join(d.name for d in OBJECTIVES if d.mixes_tasks)
            raise ValueError(f"data.tasks: multi-task mixtures are for objectives {mixing} (token-level losses "
                             f"that mix), not {self.objective!r}; use data.train")
        if declared.own_head:
            if "loss_chunk" not in self.train.model_fields_set:
                self.train.loss_chunk = None  # so config.yaml records what the run computes
            elif self.train.loss_chunk is not None:
                raise ValueError(f"train.loss_chunk: objective '{self.objective}' {declared.own_head} and never "
                                 "computes the LM head's logits, so there is nothing to chunk; remove it or set it to "
                                 "null")
        if declared.fixed_format and self.data.format != "auto":
            raise ValueError(f"data.format: objective '{self.objective}' reads {declared.fixed_format} records, not "
                             f"'{self.data.format}'; leave data.format at auto")
        if self.data.train_on_prompt and declared.prompt_never_trained:
            raise ValueError(f"data.train_on_prompt: objective '{self.objective}' "
                             f"{declared.prompt_never_trained}; remove it or set it to false")
        if declared.samples and self.data.overlong == "truncate":
            name = self.objective
            raise ValueError(f"data.overlong: 'truncate' has no meaning for objective '{name}': a prompt cut short "
                             "would lose its chat template's start or its generation prompt, so it keeps each prompt "
                             f"whole and drops those that leave fewer than {name}.max_new_tokens tokens within "
                             "data.max_length; use 'drop' (the default) or raise data.max_length")

    def resolved_dtype(self, device: str = "cpu") -> tuple[str, str]:
        """(the dtype the weights load in on `device` (cpu, cuda, mps), why) — model.dtype itself unless it is auto."""
        if self.model.dtype != "auto":
            return self.model.dtype, "as configured"
        if not self.train.bf16:
            return "float32", "train.bf16 is off: the run computes in fp32"
        if self.method.declaration.trains_base:
            return "float32", (f"method {self.method.name} trains the base's own weights, which keep fp32 master "
                               "copies (bf16 autocast over them)")
        if not self.train.bf16_frozen_weights:
            return "float32", "train.bf16_frozen_weights: false keeps the frozen weights in fp32"
        if device == "cpu":
            return "float32", ("on CPU a bf16 base makes the residual stream bf16, which trains 2.3x slower than fp32 "
                               "activations over frozen linears stored in bf16 (train.bf16_frozen_weights; measured "
                               "on the demo, AMD EPYC fam 25: 23.5 against 53.1 tokens/s); set model.dtype: bfloat16 "
                               "for the smaller footprint")
        return "bfloat16", (f"train.bf16 with method {self.method.name}, which keeps the base frozen: the base loads "
                            "in bf16 straight from the checkpoint (no fp32 copy); its trained parameters are fp32")

    @property
    def weights_dtype(self) -> str:
        """model.dtype with auto resolved (for CPU; a run or a plan for another device resolves it for that device
        first): float32 or bfloat16."""
        return self.resolved_dtype()[0]

    @property
    def frozen_linears_bf16(self) -> bool:
        """Whether train.bf16_frozen_weights stores the fp32 model's frozen linear weights in bf16, so they may load
        in bf16 (never for a method that trains the base, reads its base weights (DoRA) or quantises them)."""
        declared = self.method.declaration
        return (self.train.bf16 and self.train.bf16_frozen_weights and self.weights_dtype == "float32"
                and not declared.trains_base and not declared.memory.reads_base_weight
                and not declared.memory.quantized_base)

    @property
    def objective_declaration(self) -> ObjectiveDeclaration:
        return objective_declaration(self.objective)

    @property
    def objective_settings(self):
        """The objective's config section (`cfg.dpo`, ...), or None where it has none."""
        return getattr(self, self.objective) if self.objective_declaration.section else None

    @property
    def overlong(self) -> str:
        return self.data.overlong or self.objective_declaration.default_overlong


def _switch_method(tree: dict, pairs: list[tuple[str, str]], notes: list[str]) -> None:
    """`--set method.name=X` over a file written for another method: drop the file's options X does not have (and
    say so in `notes`)."""
    new_name = next((yaml.safe_load(v) for k, v in pairs if k == "method.name"), None)
    section = tree.get("method")
    if new_name is None or not isinstance(section, dict) or section.get("name", "lora") == new_name:
        return

    known = settings_class(new_name)
    if known is None:
        return
    explicit = {k.split(".", 1)[1] for k, _ in pairs if k.startswith("method.")}
    dropped = [k for k in section if k not in known.model_fields and k not in explicit]
    tree["method"] = {k: v for k, v in section.items() if k not in dropped}
    if dropped:
        notes.append(f"method switched to {new_name!r}; ignoring the config's method options it does not have: "
                     + ", ".join(dropped))


def load_config(path: str | Path | None, overrides: list[str] | None = None, base: dict | None = None,
                notes: list[str] | None = None) -> RunConfig:
    """Read YAML (or start from `base`), apply `key.sub=value` overrides, validate. What the caller may want to
    tell the user (options dropped by a method switch) is appended to `notes`; nothing is printed."""
    notes = [] if notes is None else notes
    return load_yaml_model(RunConfig, path, overrides, base, sections="model, method, data, ...",
                           adjust=lambda tree, pairs: _switch_method(tree, pairs, notes), unions={"method": METHOD_NAMES},
                           anchors="")


def dump_config(cfg: RunConfig) -> str:
    unused = {name for name in (*OBJECTIVE_SECTIONS, "distributed") if getattr(cfg, name) is None}
    return yaml.safe_dump(cfg.model_dump(mode="json", exclude=unused), sort_keys=False)
