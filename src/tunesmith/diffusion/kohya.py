"""The kohya / Automatic1111 single-file LoRA that ComfyUI and A1111 load, from a LoRA in diffusers' format. The keys
come from diffusers' own converter (`convert_state_dict_to_kohya`): `lora_unet_<module with _ for .>.lora_down.weight`,
`.lora_up.weight` and `.alpha`; text encoders `lora_te1_` / `lora_te2_` (SDXL). A lone text encoder (SD 1.x/2.x) is
`lora_te_`, as kohya's sd-scripts write it. CLIP modules keep their checkpoint names (`text_model.encoder.layers.N`),
which transformers 5 flattens away from CLIPTextModel (its PrefixChange "text_model") and diffusers' loader strips again
for a flattened encoder. diffusers writes the rank as every alpha (scale 1); the file gets the run's alpha instead, so
that alpha / rank scales the update as the run did.

The format exists for UNet pipelines only (SD 1.x/2.x, SDXL): diffusers reads kohya's SD3 and Flux files but ships no
converter that writes one, and ComfyUI loads their diffusers-format `transformer.` LoRAs as they are."""

from __future__ import annotations

from pathlib import Path

import torch

from tunesmith.errors import ModelError

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")  # the prefixes diffusers' converter knows
CLIP_TOP = ("text_model.", "text_projection.")  # a CLIP text encoder's checkpoint names begin so
SUFFIX = "_kohya.safetensors"


def component(key: str) -> str:
    return key.split(".", 1)[0]


def checkpoint_name(key: str) -> str:
    """A text encoder's LoRA key by its CLIP checkpoint name (`text_model.` put back where transformers dropped it)."""
    prefix, rest = key.split(".", 1)
    return key if prefix == "unet" or rest.startswith(CLIP_TOP) else f"{prefix}.text_model.{rest}"


def supported(tensors: dict[str, torch.Tensor]) -> bool:
    return bool(tensors) and all(component(k) in COMPONENTS for k in tensors)


def to_kohya(tensors: dict[str, torch.Tensor], meta: dict) -> dict[str, torch.Tensor]:
    """diffusers-format LoRA tensors (`unet.<module>.lora_A.weight`, ...) and their `lora_adapter_metadata` → the
    kohya state dict. `meta[<component>.lora_alpha]` is each component's alpha (its rank where absent)."""
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya

    others = sorted({component(k) for k in tensors} - set(COMPONENTS))
    if others or not tensors:
        raise ModelError(f"no kohya single-file LoRA for {', '.join(o + '.*' for o in others) or 'an empty LoRA'}: "
                         f"the format covers {', '.join(COMPONENTS)} (SD 1.x/2.x, SDXL)")
    lone_text_encoder = not any(component(k) == "text_encoder_2" for k in tensors)
    out = {}
    for prefix in COMPONENTS:
        mine = {checkpoint_name(k): v for k, v in tensors.items() if component(k) == prefix}
        if not mine:
            continue
        rank = next(v.shape[0] for k, v in mine.items() if k.endswith("lora_A.weight"))
        alpha = torch.tensor(float(meta.get(f"{prefix}.lora_alpha") or rank))
        for key, value in convert_state_dict_to_kohya(mine).items():
            if lone_text_encoder and key.startswith("lora_te1_"):
                key = "lora_te_" + key[len("lora_te1_"):]
            out[key] = alpha.clone() if key.endswith(".alpha") else value.contiguous()
    return out


def save_kohya(path: Path, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
    from safetensors.torch import save_file

    save_file(to_kohya(tensors, meta), str(path), metadata={"format": "pt"})
    return path


def file_name(run_dir: Path) -> str:
    """`<run folder's name>_kohya.safetensors`: the name ComfyUI and A1111 list it by once copied into their loras/."""
    return Path(run_dir).resolve().name + SUFFIX
