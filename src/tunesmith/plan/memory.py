"""The peak memory of a training run, from its config and the model's architecture: a sum of named parts.

Peak = runtime + max(loading, training), where
  loading   the checkpoint's weights as read (on CPU the file's pages are mapped while the model's own copy is
            filled in) — QLoRA and bf16 runs read fp32/bf16 weights before quantising or casting them;
  training  weights (by dtype or 4-bit format) + gradients + AdamW's moments + the activations saved for backward
            (per token and per layer, from what the decoder, tunesmith's kernels and the method keep) + the loss's
            buffers (the chunked loss's chunk × vocabulary logits, also for DPO's and PPO's per-token log-probs; without
            chunks, label positions × vocabulary logits and log-softmax)
            + the method's extras + one layer's backward workspace, all at once: the peak is the second step's
            backward (bench/plan.py records the high-water mark after loading, after each backward and after each
            optimizer step: AdamW creates its moments in step 1, so step 2's backward holds them beside the
            activations and gradients). The decoder blocks' weight gradients are formed as backward frees those
            blocks' activations, so only the larger of the two counts. Tokens are those of the largest micro-batch
            the config's data forms, read and collated as the run does (batches.py): packed rows, shared prefixes
            computed once, the loss's buffers sized by the labelled positions.
On CPU the figure is peak RSS and `runtime` is the RSS of the interpreter with torch, transformers and tunesmith
imported (measured once per machine: runtime.py); glibc keeps freed memory in the process (kernels/allocator.py),
so the high-water mark of allocations is what RSS shows. On CUDA it is peak allocated memory: no runtime term (the
CUDA context is outside torch's count), no file mapping.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tunesmith.config import RunConfig
from tunesmith.plan.architectures import Architecture
from tunesmith.plan.batches import BatchTokens, largest_batch
from tunesmith.plan.initialisation import initialisation_parts
from tunesmith.plan.optimizer_state import optimizer_state, step_transient
from tunesmith.plan.parameters import (BLOCKS, ParameterPlan, count, linears, matched_linears, matches, new_tokens,
                                       numel, token_rows, widest_target, with_new_tokens)
from tunesmith.plan.saved_activations import saved_per_token_layer

NF4_BLOCK = 64          # weights per absmax scale (quant/nf4.py)
NF4_SCALE_BLOCK = 256   # bitsandbytes' double quantisation: 8-bit scales, one fp32 per 256 of them
# Peak RSS over the activations counted below, on CPU. The count itself is exact: it equals the bytes autograd saves
# (tests/test_plan.py measures them through tunesmith's kernels). RSS holds more: glibc keeps freed blocks
# (kernels/allocator.py), and the holes the forward's temporaries leave between the saved tensors are not all filled
# by later tensors of other sizes. Measured on SmolLM2 at 2 × 256 tokens per micro-batch (bench/plan.py, a fresh
# process per row, peak RSS after 2 steps): (measured peak − every other part) / counted activations was 1.30–1.50
# for full, bitfit, LoRA, DoRA, QLoRA, IA3, adapter, P-tuning v2 and LoRA + DPO, 1.66–1.71 for prompt and prefix
# (transformers' attention path), 2.4 for freeze (4 blocks: little to hold); 1.43 is the median of the 12 rows.
# The 4 × 256 rows were not used to choose it.
CPU_ACTIVATION_RSS = 1.43


@dataclass
class Part:
    name: str
    bytes: int
    detail: str = ""


@dataclass
class MemoryPlan:
    device: str
    batch: BatchTokens
    parameters: ParameterPlan
    runtime: Part
    loading: list[Part]
    training: list[Part]
    notes: list[str] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        """Tokens the decoder computes in the largest micro-batch."""
        return self.batch.decoder

    @property
    def loading_total(self) -> int:
        return sum(p.bytes for p in self.loading)

    @property
    def training_total(self) -> int:
        return sum(p.bytes for p in self.training)

    @property
    def peak(self) -> int:
        return self.runtime.bytes + max(self.loading_total, self.training_total)

    @property
    def peak_phase(self) -> str:
        return "loading" if self.loading_total > self.training_total else "training"


def gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def mib(n: int) -> str:
    return f"{n / 2**20:,.0f} MiB"


def _weight_parts(arch: Architecture, cfg: RunConfig, plan: ParameterPlan, int4_group: int | None,
                  device: str) -> list[Part]:
    """The model's weights as trained: model dtype, or the base linears in 4 bits (NF4/FP4 or int4 GPTQ)."""
    dtype_bytes = 2 if cfg.weights_dtype == "bfloat16" else 4
    method = cfg.method
    quantized = _block_linear_weights(arch)
    added = plan.total - sum_base(arch)
    if method.declaration.memory.quantized_base or int4_group:
        rest = sum_base(arch) - quantized
        if int4_group:  # quant/linear.py: uint8 codes (two per byte), fp16 scale and uint8 zero per group
            groups = quantized / int4_group
            q_bytes, what = quantized // 2 + int(groups * 3), f"int4, group {int4_group}: ½ byte + 3 bytes per group"
        elif method.double_quant:
            blocks = quantized / NF4_BLOCK
            q_bytes = quantized // 2 + int(blocks) + int(blocks / NF4_SCALE_BLOCK * 4)
            what = f"{method.quant_type} + double-quant scales: ½ byte + 1 byte per {NF4_BLOCK} + 4 per " \
                   f"{NF4_BLOCK * NF4_SCALE_BLOCK}"
        else:
            q_bytes = quantized // 2 + int(quantized / NF4_BLOCK * 4)
            what = f"{method.quant_type}: ½ byte + fp32 scale per {NF4_BLOCK}"
        return [Part("weights (4-bit linears)", q_bytes, f"{quantized:,} weights, {what}"),
                Part("weights (embeddings, norms)", rest * dtype_bytes, f"{rest:,} × {dtype_bytes} B"),
                Part("added parameters", added * 4, f"{added:,} × 4 B (fp32)")]
    frozen = _frozen_bf16_linears(arch, cfg)
    parts = [Part("weights", (sum_base(arch) - frozen) * dtype_bytes,
                  f"{sum_base(arch) - frozen:,} × {dtype_bytes} B ({cfg.weights_dtype}; on CPU an fp32 model is the "
                  "checkpoint's mapped pages, or its own copy once frozen weights are stored in bf16)")]
    if frozen:
        parts.append(Part("frozen linear weights in bf16", frozen * 2,
                          f"{frozen:,} × 2 B (train.bf16_frozen_weights; kernels/frozen_bf16.py)"))
    elif method.init_residual() and device == "cpu" and dtype_bytes == arch.checkpoint_bytes == 4:
        parts += [Part(*initialisation_parts(arch, cfg)[0])]  # the mapped file keeps W's pages beside the residuals
    if added:
        parts.append(Part("added parameters", added * 4, f"{added:,} × 4 B (fp32)"))
    if method.declaration.memory.shared_projections:
        widest_in, widest_out = widest_target(arch, method.target_modules)
        parts.append(Part("shared frozen projections", method.r * (widest_in + widest_out) * 4,
                          f"A {method.r} × {widest_in} and B {widest_out} × {method.r}, fp32 buffers"))
    return parts


def _block_linear_weights(arch: Architecture, suffixes: list[str] | None = None) -> int:
    """Weights of the decoder blocks' linears (the LM head left out), or of those whose name ends in `suffixes`."""
    return sum(lin.in_features * lin.out_features for lin in linears(arch)
               if lin.name != "lm_head" and (suffixes is None or lin.suffix in suffixes))


def _frozen_bf16_linears(arch: Architecture, cfg: RunConfig) -> int:
    """Weights of the base linears that kernels/frozen_bf16.py stores in bf16: every frozen fp32 one under bf16
    autocast (a tied head is the embedding; DoRA's targets read their fp32 base), for methods that leave the base
    untouched. They replace the fp32 weights, also on CPU, where the conversion then unmaps the checkpoint file
    (its pages count only while loading: `_loading_parts`)."""
    train, declared = cfg.train, cfg.method.declaration
    if not (train.bf16 and train.bf16_frozen_weights and cfg.weights_dtype == "float32"
            and not declared.trains_base and not declared.memory.quantized_base):
        return 0
    kept = ({lin.suffix for lin in linears(arch) if matches(lin.name, cfg.method.target_modules)}
            if declared.memory.reads_base_weight else set())
    return sum(lin.in_features * lin.out_features for lin in linears(arch)
               if lin.suffix not in kept and not (lin.name == "lm_head" and arch.tied_embeddings))


def sum_base(arch: Architecture) -> int:
    from tunesmith.plan.parameters import base_parameters, numel

    return sum(numel(s) for s in base_parameters(arch).values())


def _trainable_bytes(cfg: RunConfig) -> int:
    """Trained base parameters (full, freeze, bitfit) have the model's dtype; added ones are fp32."""
    return 2 if cfg.weights_dtype == "bfloat16" and cfg.method.declaration.trains_base else 4


def _layers_with_grad(arch: Architecture, cfg: RunConfig) -> int:
    """Blocks that keep activations for backward: all, except below the lowest trained block of `freeze`."""
    return cfg.method.blocks_with_grad(arch.num_layers)


def _block_gradient_parameters(plan: ParameterPlan, cfg: RunConfig) -> int:
    """Trained base parameters inside the decoder blocks (full, freeze): their gradients appear during backward."""
    if not cfg.method.declaration.memory.linear_weights_train:
        return 0
    return sum(numel(shape) for name, (shape, _) in plan.saved.items() if name.startswith(BLOCKS + "."))


def _virtual_tokens(cfg: RunConfig) -> int:
    return cfg.method.num_virtual_tokens if cfg.method.declaration.memory.virtual == "embeddings" else 0


def _segments_attended_in_bf16(batch: BatchTokens) -> bool:
    """Whether a CPU under bf16 autocast attends this batch's segments (of their mean length) in bf16."""
    from tunesmith.kernels.attention_precision import bf16_on_cpu  # imports torch: only for bf16 plans

    return bf16_on_cpu(batch.decoder // max(1, batch.sequences))


def _training_parts(arch: Architecture, cfg: RunConfig, plan: ParameterPlan, device: str,
                    batch: BatchTokens) -> list[Part]:
    nbytes = _trainable_bytes(cfg)
    t = plan.trainable
    rows = batch.sequences
    seq_tokens = batch.decoder + rows * _virtual_tokens(cfg)
    attention_bf16 = device != "cpu" or (cfg.train.bf16 and _segments_attended_in_bf16(batch))
    per, detail = saved_per_token_layer(arch, cfg, attention_bf16)
    layers = _layers_with_grad(arch, cfg)
    factor = CPU_ACTIVATION_RSS if device == "cpu" else 1.0
    activations = Part("activations", int(seq_tokens * layers * per * factor),
                       f"{seq_tokens:,} tokens × {layers} layers × {per:,} B"
                       + (f" × {CPU_ACTIVATION_RSS} (CPU heap)" if device == "cpu" else "") + f" ({detail})")
    # gradients start as None (zero_grad(set_to_none=True)); a block's weight gradients are formed as backward leaves
    # the block and frees the activations it kept, so they take that memory: only the excess over the activations adds
    gradients = Part("gradients", t * nbytes, f"{t:,} trainable × {nbytes} B")
    parts = [gradients]
    reused = min(_block_gradient_parameters(plan, cfg) * nbytes, activations.bytes)
    if reused:
        parts.append(Part("block gradients in freed activations", -reused, "the decoder blocks' weight gradients, "
                          "formed in the memory their activations free (up to all of the activations)"))
    state = Part(*optimizer_state(arch, cfg, plan, nbytes))
    parts.append(state)
    declared = cfg.method.declaration
    # a method that trains the base but not its linear weights (bitfit) keeps them fp32 (it saves the base), so
    # autocast casts its frozen weights at every forward
    base_casts = declared.trains_base and not declared.memory.linear_weights_train
    if cfg.train.bf16 and cfg.weights_dtype == "float32" and declared.memory.linear_weights_train:
        cached = sum(lin.in_features * lin.out_features for lin in linears(arch))
        parts.append(Part("autocast weight cache", cached * 2, "bf16 copies of trained linear weights, per step"))
    elif cfg.train.bf16 and (base_casts or not cfg.train.bf16_frozen_weights):
        copies = (_block_linear_weights(arch) if base_casts else _frozen_bf16_linears(
            arch, cfg.model_copy(update={"train": cfg.train.model_copy(update={"bf16_frozen_weights": True})})))
        if copies:
            parts.append(Part("autocast copies of frozen weights", copies * 2,
                              "bf16 casts of the frozen linear weights, kept for backward, per step"))
    parts.append(activations)
    h, i = arch.hidden_size, arch.intermediate_size
    if cfg.train.activation_checkpointing:
        full, _ = saved_per_token_layer(arch, cfg.model_copy(update={"train": cfg.train.model_copy(
            update={"activation_checkpointing": False})}), attention_bf16)
        parts.append(Part("one block recomputed", seq_tokens * full, "checkpointing: one block's activations"))
    parts.append(Part("backward workspace", seq_tokens * (3 * i + 3 * h) * 4,
                      "one block's gradients in flight: 3 × intermediate + 3 × hidden per token, fp32"))
    parts.append(Part("embeddings out, final norm", seq_tokens * 3 * h * 4, "3 × hidden per token, fp32"))
    parts += _loss_parts(arch, cfg, batch, device, chunked=not plan.token_rows)
    parts += _method_extras(arch, cfg, plan, rows)
    transient = step_transient(arch, cfg, plan) * nbytes
    if transient:  # GaLore's step, after backward: only the gradients and the state are held beside its temporaries
        at_step = gradients.bytes + state.bytes + transient
        parts.append(Part("GaLore step beyond the backward", max(0, at_step - sum(p.bytes for p in parts)),
                          f"gradients + state + the step's largest temporary ({mib(transient)}: an SVD or a "
                          "denominator) past what the backward holds"))
    return parts


def _loss_parts(arch: Architecture, cfg: RunConfig, batch: BatchTokens, device: str, chunked: bool = True
                ) -> list[Part]:
    """`chunked`: the head is a plain linear the chunked loss can take (not one reading trained token rows)."""
    vocab, h = arch.vocab_size, arch.hidden_size
    loss_chunk = cfg.train.loss_chunk if chunked else None
    tokens = batch.labels
    head_trains = cfg.method.head_trains()
    objective = cfg.objective_declaration
    if objective.teacher:  # distill: the teacher's weights, forward and the divergence's buffers (plan/teacher.py)
        from tunesmith.plan.teacher import teacher_parts

        distilled = [Part(*p) for p in teacher_parts(arch, cfg, tokens, batch.decoder, batch.sequences)]
        settings = cfg.objective_settings
        if not (settings and settings.sft_weight):
            return distilled
        return distilled + _cross_entropy_parts(arch, cfg, tokens, loss_chunk, head_trains, device)
    if objective.own_head:  # the reward model's scalar head, classify's label head: no LM head logits
        return [Part(f"{objective.name} head", tokens * h * 4, "hidden states at each sequence's last token")]
    if objective.scores_logps:
        if loss_chunk is None:
            # sequence_logps: fp32 logits at the label positions, the log-softmax cross_entropy keeps, and the
            # reference's (no grad) or the backward's pair of the same size alive at once
            return [Part("log-probs over the vocabulary", 3 * tokens * vocab * 4,
                         f"3 × {tokens:,} label positions × {vocab:,} × 4 B (logits, log-softmax, reference/gradient)")]
        # chunked per-token log-probs (objectives/chunked_ce.py): the same buffers as the chunked loss; the backward
        # recomputes each chunk's logits from the saved log-sum-exp
    return _cross_entropy_parts(arch, cfg, tokens, loss_chunk, head_trains, device)


def _cross_entropy_parts(arch: Architecture, cfg: RunConfig, tokens: int, loss_chunk: int | None, head_trains: bool,
                         device: str) -> list[Part]:
    vocab, h = arch.vocab_size, arch.hidden_size
    chunk = loss_chunk
    if chunk is None:
        return [Part("logits", 3 * tokens * vocab * 4, f"3 × {tokens:,} × {vocab:,} × 4 B (logits, softmax, grad)")]
    chunk = min(chunk, tokens)
    n = 2 if (cfg.train.bf16 or device != "cpu" or not cfg.train.onednn_linear) else 1
    parts = [Part("chunked loss buffers", n * chunk * vocab * 4 + tokens * h * 4,
                  f"{n} × {chunk} rows × {vocab:,} × 4 B, and the hidden-state gradient {tokens:,} × {h} × 4 B")]
    if head_trains:
        parts.append(Part("head gradient (in the forward)", vocab * h * 4, f"{vocab:,} × {h} × 4 B"))
        if cfg.train.bf16:
            from tunesmith.objectives.chunked_ce import weight_grad_rows  # torch: only for such plans

            held = min(weight_grad_rows(chunk), tokens)
            parts.append(Part("held logit gradients", held * vocab * 2, f"{held:,} rows × {vocab:,} × 2 B: the head's "
                              "weight gradient takes them in one product (objectives/chunked_ce.py)"))
    return parts


def _method_extras(arch: Architecture, cfg: RunConfig, plan: ParameterPlan, rows: int) -> list[Part]:
    terms_of, objective = cfg.method.declaration.memory, cfg.objective_declaration
    out = []
    if terms_of.virtual == "key_values":
        n = cfg.method.num_virtual_tokens
        width = arch.num_layers * 2 * arch.kv_dim
        out.append(Part("prefix keys/values", 2 * rows * n * width * 4,
                        f"{rows} rows × {n} × {width:,} × 4 B, expanded per row (and its gradient)"))
        out.append(Part("padded batch attention", rows * arch.num_layers * cfg.data.max_length * (n + cfg.data.max_length)
                        // 8, "bool masks per row"))
    if terms_of.weight_norms and cfg.train.bf16:
        # measured under bf16 autocast (saved_tensors_hooks, SmolLM2, 1,024 and 4,096 tokens: 4.1 B a weight a layer);
        # the fp32 rows of bench/plan.py are within range without it (their per-token count carries more slack)
        targets = cfg.method.target_modules
        targeted = _block_linear_weights(arch, targets if isinstance(targets, list) else None)
        out.append(Part("DoRA weight norms' inputs", targeted * 4,
                        f"W0 + s·B·A of every target in fp32, kept for the norm's backward: {targeted:,} × 4 B"))
    elif terms_of.weight_norms:
        biggest = max(lin.in_features * lin.out_features for lin in linears(arch) if lin.name != "lm_head")
        out.append(Part("DoRA weight norm", biggest * 4, "||W0 + s·B·A|| forms one full weight in fp32 at a time"))
    if terms_of.delta_weights:  # fp32, or under autocast its bf16 cast (the fp32 one freed after each layer)
        nbytes = 2 if cfg.train.bf16 else 4
        targeted = sum(lin.in_features * lin.out_features
                       for lin in matched_linears(arch, cfg.method.target_modules))
        out.append(Part("ΔW of every target", targeted * nbytes, f"built at every forward, kept for backward: "
                        f"{targeted:,} × {nbytes} B"))
    section = cfg.objective_settings
    if objective.rollout_buffers:
        values = objective.rollout_buffers
        out.append(Part(f"{cfg.objective.upper()} rollouts", section.minibatch_size * (
            cfg.data.max_length + section.max_new_tokens) * 4 * values,
                        "tokens, log-probs, reference log-probs, values, advantages, returns per rollout token"))
    snapshot = objective.reference == "forward" and (
        not objective.reference_weight or getattr(section, objective.reference_weight) > 0)
    if snapshot and cfg.method.declaration.trains_base:
        out.append(Part("reference snapshot", plan.trainable * _trainable_bytes(cfg), f"{cfg.objective.upper()} "
                        "keeps the initial trained parameters for its reference forwards"))
    return out


def _loading_parts(arch: Architecture, cfg: RunConfig, plan: ParameterPlan, device: str) -> list[Part]:
    """What reading the checkpoint holds at its peak (models.py, weights.py). On CPU: an fp32 load goes through
    transformers, its weights views of the mapped file where that is fp32 (the file's pages are the weights), else
    the file's touched pages beside the fp32 copies; a bf16 load, an fp32 one whose frozen linears
    train.bf16_frozen_weights stores in bf16 (config `frozen_linears_bf16`) and QLoRA's read tensor by tensor into
    the final dtype (4 bits for QLoRA's base linears, quantised as each arrives), plus the largest tensor converted,
    read into one staging buffer. The model is read on CPU and moved to the device after the method is applied (train/run.py),
    so on CUDA loading holds the weights as moved: an fp32 base in fp32 before train.bf16_frozen_weights converts it
    there (unvalidated: no GPU has run it). An initialisation that replaces the targets' weights by residuals
    (method.init pissa, olora, loftq) holds them beside the weights as read, and makes QLoRA read the full-precision
    weights whole (quantised after the initialisation)."""
    parts = _weights_as_read(arch, cfg, plan, device)
    return parts + [Part(*p) for p in initialisation_parts(arch, cfg)] if cfg.method.init_residual() else parts


def _weights_as_read(arch: Architecture, cfg: RunConfig, plan: ParameterPlan, device: str) -> list[Part]:
    base, stored = sum_base(arch), arch.checkpoint_bytes
    dtype_bytes = 2 if cfg.weights_dtype == "bfloat16" else 4
    declared = cfg.method.declaration
    if declared.memory.quantized_base and not cfg.method.init_residual():  # an init reads the fp weights whole
        kept = [Part(f"{p.name} as loaded", p.bytes, p.detail)
                for p in _weight_parts(arch, cfg, plan, None, device) if p.name != "added parameters"]
        if device != "cpu":
            return kept
        largest = max(lin.in_features * lin.out_features for lin in linears(arch) if lin.name != "lm_head")
        staged = max(largest * stored, arch.vocab_size * arch.hidden_size * stored * (dtype_bytes != stored))
        # bitsandbytes' CPU quantiser, measured on an 8192 × 2048 weight (AMD EPYC fam 25): two fp32 temporaries of
        # the layer (128 MiB above an fp32 input), and an fp32 upcast of a bf16 input besides (228 MiB above it)
        per_weight = (dtype_bytes if dtype_bytes != stored else 0) + (4 if dtype_bytes == 2 else 0) + 8
        return kept + [Part("one tensor in flight", staged + largest * per_weight,
                            f"the largest tensor read ({staged:,} B staged in the file's {stored} B a weight) and "
                            f"the quantiser's work on one linear: {largest:,} × {per_weight} B")]
    frozen = _frozen_bf16_linears(arch, cfg) if cfg.frozen_linears_bf16 else 0
    if device != "cpu":
        return [Part("weights moved to the device", frozen * 2 + (base - frozen) * dtype_bytes,
                     f"{frozen:,} × 2 B + {base - frozen:,} × {dtype_bytes} B (unvalidated)")]
    if frozen:  # the frozen linears read in bf16, the rest in fp32, tensor by tensor (weights.py)
        largest = max(lin.in_features * lin.out_features for lin in linears(arch)
                      if not (lin.name == "lm_head" and arch.tied_embeddings))
        staged = max(largest * stored * (stored != 2), arch.vocab_size * arch.hidden_size * stored * (stored != 4))
        return [Part("weights as read", frozen * 2 + (base - frozen) * 4, f"{frozen:,} frozen linear weights × 2 B "
                     f"(train.bf16_frozen_weights, stored so as they load) + {base - frozen:,} × 4 B"),
                Part("conversion buffer", staged, f"the largest tensor converted, in the file's {stored} B a weight")]
    if dtype_bytes == 2:
        parts = [Part("bf16 weights as read", base * 2, f"{base:,} × 2 B, read tensor by tensor (weights.py)")]
        if stored != 2:
            staged = max(arch.vocab_size * arch.hidden_size, arch.intermediate_size * arch.hidden_size) * stored
            parts.append(Part("conversion buffer", staged, f"the largest tensor in the file's {stored} B a weight"))
        return parts
    parts = [Part("checkpoint pages", base * stored, f"{base:,} × {stored} B, the file mapped while read")]
    if stored != 4:
        parts.append(Part("fp32 copy", base * 4, f"{base:,} × 4 B, converted from the mapped file"))
    frozen = _frozen_bf16_linears(arch, cfg)
    if frozen:  # DoRA's other linears: the bf16 weights and a copy of the rest exist before the file is unmapped
        parts.append(Part("frozen weights converted to bf16", frozen * 2 + (base - frozen) * 4 * (stored == 4),
                          f"{frozen:,} × 2 B + the other {base - frozen:,} weights copied out of the file, × 4 B"))
    return parts


def _vocabulary(cfg: RunConfig) -> set[str] | None:
    """The tokenizer's vocabulary, where model.path names one this machine has (not a published card's name)."""
    from tunesmith.errors import TunesmithError
    from tunesmith.models import load_tokenizer

    try:
        return set(load_tokenizer(cfg.model.path, cfg.model.trust_remote_code).get_vocab())
    except TunesmithError:
        return None


def predict(cfg: RunConfig, device: str = "cpu", arch: Architecture | None = None,
            runtime_bytes: int | None = None, batch: BatchTokens | None = None) -> MemoryPlan:
    """The peak memory of training `cfg` on `device` ('cpu': peak RSS; 'cuda': peak allocated); `batch`: the largest
    micro-batch's tokens (default: read from the config's data, as the run does; batches.py)."""
    from tunesmith.plan.architectures import resolve
    from tunesmith.plan.runtime import runtime_overhead

    added = new_tokens(cfg.model, _vocabulary(cfg) if cfg.model.added_tokens else None)
    arch = with_new_tokens(arch or resolve(cfg.model.path), added)
    given = cfg
    if cfg.model.dtype == "auto":  # resolved for the device planned for; every part below reads weights_dtype
        cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"dtype": cfg.resolved_dtype(device)[0]})})
    plan = count(arch, cfg.method, cfg.objective, cfg.weights_dtype, cfg.model.path,
                 token_rows(cfg.method, cfg.model, added))
    int4_group = _int4_group(cfg.model.path)
    if runtime_bytes is None:
        runtime_bytes = runtime_overhead() if device == "cpu" else 0
    runtime = Part("runtime", runtime_bytes, "python + torch + transformers + tunesmith, measured once (runtime.py)"
                   if device == "cpu" else "the CUDA context is outside torch's allocated count")
    batch = batch or largest_batch(cfg)
    training = _weight_parts(arch, cfg, plan, int4_group, device) + _training_parts(arch, cfg, plan, device, batch)
    memory = MemoryPlan(device, batch, plan, runtime, _loading_parts(arch, cfg, plan, device), training)
    memory.notes.append(f"tokens: {batch.source}")
    if given.model.dtype == "auto":
        memory.notes.append("model.dtype: auto → {} ({})".format(*given.resolved_dtype(device)))
    if device != "cpu":
        memory.notes.append("the CUDA figures are unvalidated: no GPU has measured them")
    return memory


def _int4_group(path: str) -> int | None:
    from pathlib import Path

    marker = Path(path).expanduser() / "tunesmith_quant.json"
    if not marker.is_file():
        return None
    import json

    return int(json.loads(marker.read_text()).get("group_size", 128))
