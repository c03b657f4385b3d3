"""LoRA distillation with peft: adapters on the student, the teacher as the same network with adapters off.

Only the low-rank adapters train (lora_B starts at zero, so the student starts equal to the teacher). The student
shares the teacher's base weights: the teacher's calls run with the adapters disabled (`base_call`), which saves a
whole copy of the network next to a full fine-tune. Exports: the adapters in peft's key format, which diffusers'
`pipe.load_lora_weights(...)` loads onto the original teacher pipeline (rank and alpha travel in the file's
metadata), and a merged copy of the network (W + (alpha / r) B A) for a full pipeline.
"""

from __future__ import annotations

import copy
import importlib.util
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from .errors import UserError
from .parameterization import NetworkCall

ADAPTER = "scm"  # adapter name inside the student network
WEIGHTS_NAME = "pytorch_lora_weights.safetensors"  # the file name diffusers' load_lora_weights looks for


def adapted_layers(network: nn.Module, target_modules: tuple[str, ...]) -> dict[str, nn.Module]:
    """Linear and Conv2d layers whose qualified name ends with one of `target_modules` (peft's suffix rule)."""
    return {name: module for name, module in network.named_modules()
            if isinstance(module, nn.Linear | nn.Conv2d)
            and any(name == target or name.endswith(f".{target}") for target in target_modules)}  # fmt: skip


# Largest useful rank of a layer: min(fan-in, fan-out); a LoRA update B A of higher rank is not a low-rank update.
def layer_rank_limit(module: nn.Module) -> int:
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return min(module.in_channels // module.groups * kh * kw, module.out_channels)
    return min(module.in_features, module.out_features)


def check_lora(network: nn.Module, rank: int, target_modules: tuple[str, ...]) -> None:
    """One-sentence error for a rank or a set of target layers this network cannot take (or a missing peft)."""
    if importlib.util.find_spec("peft") is None:
        raise UserError("LoRA distillation needs peft: pip install 'scm-distill[text]'.")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise UserError(f"lora.rank must be a positive integer, got {rank!r}.")
    layers = adapted_layers(network, target_modules)
    if not layers:
        raise UserError(f"no layer of the {type(network).__name__} matches lora.target_modules "
                         f"{list(target_modules)}.")  # fmt: skip
    name, smallest = min(layers.items(), key=lambda item: layer_rank_limit(item[1]))
    if rank > layer_rank_limit(smallest):
        raise UserError(f"lora.rank {rank} is larger than the layer '{name}' can take (at most "
                         f"{layer_rank_limit(smallest)}); lower lora.rank or leave that layer out of "
                         f"lora.target_modules.")  # fmt: skip


def add_lora(network: nn.Module, rank: int, alpha: float | None, target_modules: tuple[str, ...],
             seed: int = 0) -> nn.Module:  # fmt: skip
    """Inject LoRA adapters in place (diffusers' peft integration); only they require grad afterwards. lora_A gets
    peft's initialisation drawn from `seed` (not the global RNG, so runs repeat), lora_B zeros."""
    check_lora(network, rank, target_modules)
    if has_lora(network):
        raise UserError("the network already carries LoRA adapters; build the student from a fresh teacher.")
    from peft import LoraConfig

    config = LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=list(target_modules), lora_dropout=0.0,
                        init_lora_weights=True)  # lora_B = 0: the student starts equal to the teacher  # fmt: skip
    network.requires_grad_(False)
    network.add_adapter(config, adapter_name=ADAPTER)
    generator = torch.Generator().manual_seed(seed)
    for name, parameter in network.named_parameters():
        parameter.requires_grad_(".lora_" in name)
        if ".lora_A." in name:  # kaiming-uniform with a = sqrt(5), as peft's default
            with torch.no_grad():
                init = torch.empty(parameter.shape, dtype=torch.float32)
                parameter.copy_(nn.init.kaiming_uniform_(init, a=math.sqrt(5), generator=generator))
    return network


def has_lora(network: nn.Module) -> bool:
    return bool(getattr(network, "_hf_peft_config_loaded", False))


@contextmanager
def without_adapters(network: nn.Module) -> Iterator[None]:
    """Run a LoRA-carrying network as its base network (the teacher); a no-op for networks without adapters. Only
    peft's per-layer switch is flipped: `disable_adapters()` would also turn the adapters' requires_grad off and on,
    which an FSDP2-sharded network then re-applies to its gathered parameters inside the JVP, where torch.func
    forbids it."""
    if not has_lora(network):
        yield
        return
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [module for module in network.modules() if isinstance(module, BaseTunerLayer)]
    for layer in layers:
        layer._disable_adapters = True
    try:
        yield
    finally:
        for layer in layers:
            layer._disable_adapters = False


def base_call(call: NetworkCall) -> NetworkCall:
    """A network call that always runs the base network (the teacher's call when the student shares it)."""

    def run(network: nn.Module, x, time, condition):
        with without_adapters(network):
            return call(network, x, time, condition)

    return run


def lora_state_dict(network: nn.Module) -> dict:
    """The adapters' weights in peft's key format (what diffusers' loaders read), without the adapter name."""
    from peft.utils import get_peft_model_state_dict

    return {key: value.detach().cpu().contiguous()
            for key, value in get_peft_model_state_dict(network, adapter_name=ADAPTER).items()}  # fmt: skip


def save_lora(network: nn.Module, folder: Path, pipeline_class, component: str = "unet") -> Path:
    """Write WEIGHTS_NAME (with rank/alpha metadata) for `component` ("unet" or "transformer") so that
    `pipe.load_lora_weights(folder)` loads it onto the original teacher."""
    metadata = network.peft_config[ADAPTER].to_dict()
    metadata["target_modules"] = sorted(metadata["target_modules"])
    pipeline_class.save_lora_weights(folder, **{f"{component}_lora_layers": lora_state_dict(network),
                                                f"{component}_lora_adapter_metadata": metadata},
                                     weight_name=WEIGHTS_NAME, safe_serialization=True)  # fmt: skip
    return Path(folder) / WEIGHTS_NAME


def merged_copy(network: nn.Module) -> nn.Module:
    """A copy of the network with the adapters folded into its weights, W + (alpha / r) B A, and removed."""
    merged = copy.deepcopy(network)
    merged.fuse_lora(lora_scale=1.0)
    merged.unload_lora()
    return merged
