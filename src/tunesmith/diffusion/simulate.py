"""A diffusion pipeline without its weights, for the planner (plan.py): every component instantiated from its
config.json on the meta device (nothing read but configs, tokenizers and scheduler configs), its parameters counted,
and the run's steps replayed on fake tensors (torch's FakeTensorMode: shapes, dtypes and devices, no data, no
arithmetic) while a dispatch mode adds up the bytes of every tensor an operator creates and subtracts them when the
tensor dies. The high-water mark of that count is the step's peak of live tensor memory: what torch's allocator would
hold beyond what existed before, exactly (tests/test_diffusion_plan.py: the same count over real tensors agrees).

The replayed training step is the loop's own (loop.py): the family's text encoding and prediction, the loss, the
backward, gradient clipping and AdamW's step with the trained parts made trainable by trainable.apply, so a LoRA's
count, the saved activations at the resolution and the gradients are what the run makes."""

from __future__ import annotations

import json
import weakref
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from tunesmith.errors import ModelError


# What a replay answers where the code reads a value back: pipelines compare the tokenizer's ids for truncation
# (taken as equal: nothing truncated) and SDXL reads its size conditioning with .tolist() (taken as zeros: the
# values, not the shapes, change). No family reads a value that sizes a tensor.
DATA_DEPENDENT = {torch.ops.aten.equal.default: lambda _t: True,
                  torch.ops.aten._local_scalar_dense.default:
                      lambda t: False if t.dtype == torch.bool else 0.0 if t.dtype.is_floating_point else 0}


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages operators created that are still alive (views count nothing: they share their base's
    storage), and the high-water mark since `reset()`."""

    def __init__(self, fake: bool = False):
        super().__init__()
        self.fake = fake
        self.now = 0
        self.peak = 0
        self.counted: set[int] = set()

    def reset(self) -> None:
        self.peak = self.now

    def _free(self, key: int, n: int) -> None:
        self.now -= n
        self.counted.discard(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.fake and func in DATA_DEPENDENT:
            from torch._subclasses.fake_tensor import DataDependentOutputException

            try:  # a fake scalar made from a Python number keeps it (AdamW's step count); others have no value
                return func(*args, **(kwargs or {}))
            except DataDependentOutputException:
                return DATA_DEPENDENT[func](args[0])
        out = func(*args, **(kwargs or {}))
        returns = func._schema.returns
        for i, t in enumerate(tree_flatten(out)[0]):
            if not isinstance(t, torch.Tensor) or (i < len(returns) and returns[i].alias_info is not None):
                continue
            # the storage's Python object lives as long as the storage does (torch preserves it), also where only
            # autograd holds the tensor (saved for backward, a stolen .grad); a tensor's own Python object does not
            storage = t.untyped_storage()
            if storage._cdata in self.counted:
                continue
            n = storage.nbytes()
            self.counted.add(storage._cdata)
            self.now += n
            self.peak = max(self.peak, self.now)
            weakref.finalize(storage, self._free, storage._cdata, n)
        return out


@dataclass
class Component:
    name: str
    library: str
    class_name: str
    module: object   # an nn.Module on the meta device, or a tokenizer / scheduler (loaded: they are small)


def _model_index(folder: Path) -> dict:
    path = folder / "model_index.json"
    if not path.is_file():
        raise ModelError(f"model: {folder} has no model_index.json; the planner reads the pipeline's components "
                         "from it (a diffusers pipeline folder)")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelError(f"model: {path} is not valid JSON ({e})") from None


def _instantiate(folder: Path, name: str, library: str, class_name: str):
    import diffusers
    import transformers
    from accelerate import init_empty_weights

    path = folder / name
    if library not in ("diffusers", "transformers"):
        raise ModelError(f"model: {folder}/model_index.json: component {name!r} comes from {library!r}; the planner "
                         "reads diffusers and transformers components")
    cls = getattr(diffusers if library == "diffusers" else transformers, class_name, None)
    if cls is None:
        raise ModelError(f"model: {folder}/model_index.json: {library} has no class {class_name!r} ({name})")
    try:
        if "Tokenizer" in class_name:
            return transformers.AutoTokenizer.from_pretrained(path)
        if "Scheduler" in class_name:
            return cls.from_pretrained(path)
        with init_empty_weights():
            if library == "diffusers":
                return cls.from_config(cls.load_config(path))
            model = cls._from_config(transformers.AutoConfig.from_pretrained(path))
        model.tie_weights()  # as from_pretrained does (T5's encoder embedding is its shared one): outside the context
        return model
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelError(f"model: {path}: could not read its config: {e}") from None


def meta_components(folder: str | Path) -> dict[str, Component]:
    """Every component model_index.json lists (the optional ones it leaves null skipped), models on meta."""
    folder = Path(folder)
    out = {}
    for name, entry in _model_index(folder).items():
        if name.startswith("_") or not isinstance(entry, list) or len(entry) != 2 or entry[0] is None:
            continue
        out[name] = Component(name, entry[0], entry[1], _instantiate(folder, name, *entry))
    return out


def meta_pipeline(folder: str | Path, components: dict[str, Component]):
    """The pipeline object over the meta components, as the family's load makes it: tunesmith's TextToImagePipeline
    for Stable Diffusion 1.x/2.x folders (families/sd.py loads a StableDiffusionPipeline folder into it), else the
    diffusers class model_index.json names, its components listed as null (a safety checker) given as None."""
    import diffusers

    index = _model_index(Path(folder))
    class_name = index.get("_class_name")
    modules = {name: c.module for name, c in components.items()}
    if class_name in ("TextToImagePipeline", "StableDiffusionPipeline"):
        from tunesmith.diffusion.pipeline import TextToImagePipeline

        keep = ("unet", "text_encoder", "tokenizer", "scheduler", "vae")
        pipe = TextToImagePipeline(**{name: m for name, m in modules.items() if name in keep})
    else:
        cls = getattr(diffusers, str(class_name), None)
        if cls is None:
            raise ModelError(f"model: {folder}/model_index.json names the pipeline {class_name!r}, which diffusers "
                             "does not have")
        absent = {name: None for name, entry in index.items()
                  if not name.startswith("_") and isinstance(entry, list) and name not in modules}
        pipe = cls(**absent, **modules)
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    return pipe


def modules(pipe, names) -> list[torch.nn.Module]:
    return [m for m in (getattr(pipe, n, None) for n in names) if isinstance(m, torch.nn.Module)]


class FakeRun:
    """The pipeline's modules moved to fake tensors on `device`; `measure(fn)` runs fn under the live-byte count and
    returns (its result, the peak bytes above what was alive when it began)."""

    def __init__(self, pipe, module_names, device: str = "cpu"):
        from torch._subclasses.fake_tensor import FakeTensorMode

        self.pipe = pipe
        self.mode = FakeTensorMode(allow_non_fake_inputs=True)
        self.device = torch.device(device)
        with self.mode:  # to_empty's empty_like would convert each meta tensor to a fake one first: slower
            for module in modules(pipe, module_names):
                module._apply(lambda t: torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=self.device))
        self.live = LiveBytes(fake=True)

    def measure(self, fn):
        with self.mode, self.live:
            base = self.live.now
            self.live.reset()
            result = fn()
            return result, self.live.peak - base


def training_step(run: FakeRun, family, trained: dict, rows: int, latent: tuple[int, int, int], prompts: list[str],
                  micro: list | None, bf16: bool, foreach: bool | None) -> dict[str, int]:
    """One step of loop.py on fake tensors: the peaks of forward + backward and of the optimizer step, and what stays
    alive after it (AdamW's moments). Step 2's backward holds step 1's moments beside its activations. `micro`: SDXL's
    size conditioning rows, as lists."""
    from tunesmith.diffusion.loss import per_sample_mse
    from tunesmith.diffusion.trainable import named_trainable, set_train_mode

    pipe = run.pipe
    params = named_trainable(trained)
    text_trains = any(name in trained for name in family.text_encoders)
    autocast = torch.autocast(run.device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    set_train_mode(trained, True)

    def forward_backward():
        c, h, w = latent
        clean = torch.randn(rows, c, h, w, device=run.device)
        noise = torch.randn_like(clean)
        timesteps = torch.randint(0, 1000, (rows,), device=run.device)
        noisy = clean + noise
        sizes = torch.tensor(micro, dtype=torch.float32) if micro else None  # made here: a constant the family reads
        with autocast:
            with (nullcontext() if text_trains else torch.no_grad()):
                text = family.encode_text(pipe, prompts)
            prediction = family.predict(pipe, noisy, timesteps, text, sizes)
        loss = per_sample_mse(prediction, noise).mean()
        loss.backward()
        return text

    def optimizer_step(optimizer):
        torch.nn.utils.clip_grad_norm_(params.values(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    with run.mode, run.live:
        start = run.live.now
        run.live.reset()
        text = forward_backward()
        backward = run.live.peak - start
        optimizer = torch.optim.AdamW(params.values(), lr=1e-4, foreach=foreach)
        run.live.reset()
        optimizer_step(optimizer)
        step = run.live.peak - start
        moments = run.live.now - start
    set_train_mode(trained, False)
    del text
    return {"backward": backward, "optimizer step": step, "moments": moments}


def no_grad_peak(run: FakeRun, fn) -> int:
    def call():
        with torch.no_grad():
            fn()
    return run.measure(call)[1]
