"""Parameter counts of every method, from the architecture alone (no weights, no torch): the trainable count, the
model's total as training reports it (added parameters included, tied embeddings once), one row per kind of added
or trained tensor with its formula, and the tensors the adapter file holds (for its size).

Module and parameter names follow transformers' Llama layout, and targets are matched by the rule
methods/base.py's match_modules applies (a list: names equal to or ending in '.<entry>'; 'all-linear': every linear
but the LM head; another string: a full-name regex), so a count here equals the one `tunesmith train` prints
(tests/test_plan.py applies each method to a tiny model and compares).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace

from tunesmith.config.methods import ALL_LINEAR, BASE_MODEL_KEY, MethodSettings
from tunesmith.config.objectives import objective_declaration
from tunesmith.errors import ConfigError
from tunesmith.plan.architectures import Architecture

DTYPE_BYTES = {"float32": 4, "bfloat16": 2}
SAFETENSORS_DTYPE = {"float32": "F32", "bfloat16": "BF16"}
BLOCKS = "model.layers"
ADAPTER_PLACEMENTS = {"attention": ["o_proj"], "mlp": ["down_proj"], "both": ["o_proj", "down_proj"]}
PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class Linear:
    name: str
    in_features: int
    out_features: int
    bias: bool

    @property
    def suffix(self) -> str:
        return self.name.rsplit(".", 1)[-1]


def linears(arch: Architecture) -> list[Linear]:
    """Every nn.Linear of the model, in named_modules order (the LM head last)."""
    h, q, kv, i = arch.hidden_size, arch.q_dim, arch.kv_dim, arch.intermediate_size
    qkv_bias = arch.attention_bias or arch.qkv_bias
    out = []
    for n in range(arch.num_layers):
        att, mlp = f"{BLOCKS}.{n}.self_attn", f"{BLOCKS}.{n}.mlp"
        out += [Linear(f"{att}.q_proj", h, q, qkv_bias), Linear(f"{att}.k_proj", h, kv, qkv_bias),
                Linear(f"{att}.v_proj", h, kv, qkv_bias), Linear(f"{att}.o_proj", q, h, arch.attention_bias),
                Linear(f"{mlp}.gate_proj", h, i, arch.mlp_bias), Linear(f"{mlp}.up_proj", h, i, arch.mlp_bias),
                Linear(f"{mlp}.down_proj", i, h, arch.mlp_bias)]
    out.append(Linear("lm_head", h, arch.vocab_size, False))
    return out


def base_parameters(arch: Architecture) -> dict[str, tuple[int, ...]]:
    """name → shape of every parameter as model.named_parameters() lists them (a tied head once, as the embedding)."""
    params: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (arch.vocab_size, arch.hidden_size)}
    layers = [lin for lin in linears(arch) if lin.name != "lm_head"]
    for n in range(arch.num_layers):
        block = f"{BLOCKS}.{n}."
        for lin in layers[7 * n: 7 * n + 7]:
            params[f"{lin.name}.weight"] = (lin.out_features, lin.in_features)
            if lin.bias:
                params[f"{lin.name}.bias"] = (lin.out_features,)
            if arch.qk_norm and lin.suffix == "o_proj":
                params[f"{block}self_attn.q_norm.weight"] = (arch.head_dim,)
                params[f"{block}self_attn.k_norm.weight"] = (arch.head_dim,)
        params[f"{block}input_layernorm.weight"] = (arch.hidden_size,)
        params[f"{block}post_attention_layernorm.weight"] = (arch.hidden_size,)
    params["model.norm.weight"] = (arch.hidden_size,)
    if not arch.tied_embeddings:
        params["lm_head.weight"] = (arch.vocab_size, arch.hidden_size)
    return params


def numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def matches(name: str, targets: list[str] | str) -> bool:
    if targets == ALL_LINEAR:
        return name != "lm_head"
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def matched_linears(arch: Architecture, targets: list[str] | str, field_name: str = "method.target_modules"):
    hits = [lin for lin in linears(arch) if matches(lin.name, targets)]
    if not hits:
        suffixes = sorted({lin.suffix for lin in linears(arch)})
        raise ConfigError(f"{field_name}: {targets!r} matches no layer of this model; its linear layers are named: "
                          + ", ".join(suffixes))
    return hits


@dataclass
class Part:
    """One kind of trained tensor: `count` of them with `each` parameters, by `formula`."""
    what: str
    formula: str
    each: int
    count: int

    @property
    def total(self) -> int:
        return self.each * self.count


@dataclass
class ParameterPlan:
    method: str
    trainable: int
    total: int
    parts: list[Part]
    saved: dict[str, tuple[tuple[int, ...], str]] = field(default_factory=dict)  # adapter file: name → (shape, dtype)
    note: str = ""
    base_model: str = ""  # model.path, which the adapter file's metadata names
    token_rows: int = 0  # tokens whose embedding rows train beside the method (their head then computes whole logits)

    @property
    def fraction(self) -> float:
        return self.trainable / self.total if self.total else 0.0

    @property
    def saved_bytes(self) -> int:
        """The size of adapter_model.safetensors (or, for full, of the model's weights)."""
        if self.method == "full":
            return safetensors_size(self.saved)
        return safetensors_size(self.saved, {"format": "pt", BASE_MODEL_KEY: self.base_model} if self.base_model
                                else None)


def safetensors_size(tensors: dict[str, tuple[tuple[int, ...], str]], metadata: dict[str, str] | None = None
                     ) -> int:
    """Bytes of the safetensors file holding these tensors with `metadata` ({"format": "pt"} if not given): 8 bytes of
    header length, the JSON header padded with spaces to a multiple of 8, then the data (laid out by descending
    alignment, then name, as the safetensors writer does)."""
    itemsize = {"F32": 4, "BF16": 2}
    order = sorted(tensors, key=lambda k: (-itemsize[tensors[k][1]], k))
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name in order:
        shape, dtype = tensors[name]
        size = numel(shape) * itemsize[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = len(json.dumps(header, separators=(",", ":")).encode())
    return 8 + text + (-text % 8) + offset


def _grouped(rows: list[tuple[str, str, int]]) -> list[Part]:
    """Rows (what, formula, each) of equal `what` and `each` folded into one Part with a count."""
    parts: dict[tuple[str, str, int], Part] = {}
    for what, formula, each in rows:
        key = (what, formula, each)
        if key in parts:
            parts[key].count += 1
        else:
            parts[key] = Part(what, formula, each, 1)
    return list(parts.values())


def _whole(arch, s, params, dtype) -> tuple[list, dict, int]:
    return ([("every parameter", "the whole model", sum(numel(shape) for shape in params.values()))],
            {n: (shape, dtype) for n, shape in params.items()}, 0)


def _lora(arch, s, params, dtype) -> tuple[list, dict, int]:
    dora = s.declaration.memory.weight_norms  # DoRA's magnitude vector beside each target's pair
    rows, saved = [], {}
    saved_r = 2 * s.r if s.init_residual() else s.r  # saved converted to a rank-2r LoRA (methods/lora_init.py)
    for lin in matched_linears(arch, s.target_modules):
        d, k = lin.in_features, lin.out_features
        rows.append((lin.suffix, f"r·(d+k) = {s.r}·({d}+{k})", s.r * (d + k)))
        saved[f"{PEFT_PREFIX}{lin.name}.lora_A.weight"] = ((saved_r, d), "F32")
        saved[f"{PEFT_PREFIX}{lin.name}.lora_B.weight"] = ((k, saved_r), "F32")
        if dora:
            rows.append((f"{lin.suffix} magnitude", f"k = {k}", k))
            saved[f"{PEFT_PREFIX}{lin.name}.lora_magnitude_vector"] = ((k,), "F32")
    return rows, saved, 0


def _bitfit(arch, s, params, dtype) -> tuple[list, dict, int]:
    rows, saved, added = [], {}, 0
    for lin in matched_linears(arch, s.target_modules):
        rows.append((f"{lin.suffix} bias", f"k = {lin.out_features}", lin.out_features))
        saved[f"{lin.name}.bias"] = ((lin.out_features,), dtype)
        added += 0 if lin.bias else lin.out_features
    return rows, saved, added


def _freeze(arch, s, params, dtype) -> tuple[list, dict, int]:
    from tunesmith.methods.freeze import select_names

    chosen = select_names(list(params), BLOCKS, arch.num_layers, s)
    rows = [(re.sub(r"\.\d+\.", ".N.", n), "×".join(map(str, params[n])), numel(params[n])) for n in chosen]
    return rows, {n: (params[n], dtype) for n in chosen}, 0


def _ia3(arch, s, params, dtype) -> tuple[list, dict, int]:
    rows, saved = [], {}
    for lin in matched_linears(arch, s.target_modules):
        if matches(lin.name, s.feedforward_modules):
            rows.append((f"{lin.suffix} (input)", f"d = {lin.in_features}", lin.in_features))
            shape = (1, lin.in_features)
        else:
            rows.append((lin.suffix, f"k = {lin.out_features}", lin.out_features))
            shape = (lin.out_features, 1)
        saved[f"{PEFT_PREFIX}{lin.name}.ia3_l"] = (shape, "F32")
    return rows, saved, 0


def _loha(arch, s, params, dtype) -> tuple[list, dict, int]:
    rows, saved = [], {}
    for lin in matched_linears(arch, s.target_modules):
        d, k = lin.in_features, lin.out_features
        rows.append((lin.suffix, f"2·r·(d+k) = 2·{s.r}·({d}+{k})", 2 * s.r * (d + k)))
        for pair in ("1", "2"):
            saved[f"{PEFT_PREFIX}{lin.name}.hada_w{pair}_a"] = ((k, s.r), "F32")
            saved[f"{PEFT_PREFIX}{lin.name}.hada_w{pair}_b"] = ((s.r, d), "F32")
    return rows, saved, 0


def _lokr(arch, s, params, dtype) -> tuple[list, dict, int]:
    """W1 (a × c) ⊗ W2 (b × d) with k = a·b, d_in = c·d (methods/lokr_shapes.py): each factor a·c (b·d) in full, or
    r·(a+c) (r·(b+d)) as a rank-r pair."""
    from tunesmith.methods.lokr_shapes import lokr_factors

    rows, saved = [], {}
    for lin in matched_linears(arch, s.target_modules):
        shapes = lokr_factors(lin.in_features, lin.out_features, s.r, s.decompose_both, s.decompose_factor)
        terms = [f"{s.r}·({shapes[k + '_a'][0]}+{shapes[k + '_b'][1]})" if k + "_a" in shapes
                 else "×".join(map(str, shapes[k])) for k in ("lokr_w1", "lokr_w2")]
        rows.append((lin.suffix, f"W1 + W2 = {terms[0]} + {terms[1]}", sum(numel(v) for v in shapes.values())))
        saved.update({f"{PEFT_PREFIX}{lin.name}.{k}": (shape, "F32") for k, shape in shapes.items()})
    return rows, saved, 0


def widest_target(arch: Architecture, targets: list[str] | str) -> tuple[int, int]:
    """(widest input, widest output) over the targeted linears: VeRA's shared A is r × the one, B the other × r."""
    hits = matched_linears(arch, targets)
    return max(lin.in_features for lin in hits), max(lin.out_features for lin in hits)


def _vera(arch, s, params, dtype) -> tuple[list, dict, int]:
    rows, saved = [], {}
    for lin in matched_linears(arch, s.target_modules):
        k = lin.out_features
        rows.append((f"{lin.suffix} λ_d, λ_b", f"r + k = {s.r} + {k}", s.r + k))
        saved[f"{PEFT_PREFIX}{lin.name}.vera_lambda_b"] = ((k,), "F32")
        saved[f"{PEFT_PREFIX}{lin.name}.vera_lambda_d"] = ((s.r,), "F32")
    if s.save_projection:  # the frozen shared pair, stored beside the scales
        widest_in, widest_out = widest_target(arch, s.target_modules)
        saved["base_model.vera_A"] = ((s.r, widest_in), "F32")
        saved["base_model.vera_B"] = ((widest_out, s.r), "F32")
    return rows, saved, 0


def _bottleneck(arch, s, params, dtype) -> tuple[list, dict, int]:
    width = max(1, arch.hidden_size // s.reduction_factor)
    rows, saved = [], {}
    for lin in matched_linears(arch, ADAPTER_PLACEMENTS[s.placement], "method.placement"):
        k = lin.out_features
        rows.append((f"{lin.suffix} adapter", f"2·k·w + w + k = 2·{k}·{width} + {width} + {k}", 2 * k * width + width + k))
        saved.update({f"{lin.name}.adapter_down.weight": ((width, k), "F32"),
                      f"{lin.name}.adapter_down.bias": ((width,), "F32"),
                      f"{lin.name}.adapter_up.weight": ((k, width), "F32"),
                      f"{lin.name}.adapter_up.bias": ((k,), "F32")})
    return rows, saved, 0


def _virtual(arch, s, params, dtype) -> tuple[list, dict, int]:
    n, h = s.num_virtual_tokens, arch.hidden_size
    width = arch.num_layers * 2 * arch.kv_dim
    if s.declaration.memory.virtual == "embeddings":
        return [("prompt embeddings", f"N·h = {n}·{h}", n * h)], {"prompt_embeddings": ((n, h), "F32")}, 0
    saved = {"prompt_embeddings": ((n, width), "F32")}
    direct = f"N·layers·2·kv_dim = {n}·{arch.num_layers}·2·{arch.kv_dim}"
    if s.projection:
        p = s.projection_hidden
        return [("prefix embedding", f"N·h = {n}·{h}", n * h),
                ("projection MLP", f"h·p + p + p·W + W, W = layers·2·kv_dim = {width}", h * p + p + p * width + width)
                ], saved, 0
    return [("key/value prefix", direct, n * width)], saved, 0


def new_tokens(model_settings, vocabulary: set[str] | None = None) -> list[str]:
    """The tokens model.add_tokens and model.add_special_tokens add: those `vocabulary` (the tokenizer's, where the
    planner can read it) lacks; all of them without one."""
    return [t for t in model_settings.added_tokens if vocabulary is None or t not in vocabulary]


def with_new_tokens(arch: Architecture, added: list[str]) -> Architecture:
    """The architecture once the added tokens grew its vocabulary (each a new row past the embedding's; a model
    with spare rows past its tokenizer grows by fewer)."""
    return replace(arch, vocab_size=arch.vocab_size + len(added))


def token_rows(settings: MethodSettings, model_settings, added: list[str]) -> int:
    """How many tokens' embedding rows train on their own (methods/trainable_tokens.py): the `added` ones and
    model.trainable_tokens; none where the method trains the whole model."""
    if settings.declaration.parameters == "whole":
        return 0
    return len(set(added) | set(model_settings.trainable_tokens or []))


def _token_row_parts(arch: Architecture, n: int) -> tuple[list, dict]:
    h = arch.hidden_size
    modules = ["model.embed_tokens"] + ([] if arch.tied_embeddings else ["lm_head"])
    rows = [(f"{m.rsplit('.', 1)[-1]} token rows", f"n·h = {n}·{h}", n * h) for m in modules]
    return rows, {f"{PEFT_PREFIX}{m}.token_adapter.trainable_tokens_delta": ((n, h), "F32") for m in modules}


# plan/parameters' count of each layout a method declares (MethodDeclaration.parameters)
LAYOUTS = {"whole": _whole, "chosen": _freeze, "biases": _bitfit, "low_rank": _lora, "scales": _ia3,
           "projection_scales": _vera, "hadamard": _loha, "kronecker": _lokr, "bottleneck": _bottleneck,
           "virtual": _virtual}


def count(arch: Architecture, settings: MethodSettings, objective: str = "sft", dtype: str = "float32",
          base_model: str = "", trained_token_rows: int = 0) -> ParameterPlan:
    """What `settings` trains on `arch` with `objective`, and what the model then holds; `trained_token_rows`:
    tokens whose embedding rows train beside the method (`token_rows`)."""
    params = base_parameters(arch)
    base_total = sum(numel(s) for s in params.values())
    st_dtype = SAFETENSORS_DTYPE[dtype]
    declared = settings.declaration
    rows, saved, added = LAYOUTS[declared.parameters](arch, settings, params, st_dtype)
    note = ("trainable as LoRA's; training's printed total counts each 4-bit weight as half a parameter (two codes "
            "per stored byte)") if declared.memory.quantized_base else ""
    head = objective_declaration(objective).head  # a scalar head: h weights (and a bias)
    if head is not None:
        what, bias = head
        rows.append((what, f"{'h + 1' if bias else 'h'} = {arch.hidden_size + bias}", arch.hidden_size + bias))
    if trained_token_rows:
        token_parts, token_saved = _token_row_parts(arch, trained_token_rows)
        rows += token_parts
        saved.update(token_saved)
        added += sum(each for _, _, each in token_parts)
    parts = _grouped(rows)
    trainable = sum(p.total for p in parts)
    if not declared.trains_base:
        added = trainable
    elif head is not None:
        added += arch.hidden_size + head[1]
    return ParameterPlan(settings.name, trainable, base_total + added, parts, saved, note, base_model,
                         trained_token_rows)
