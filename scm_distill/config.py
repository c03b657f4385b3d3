"""One config schema for a distillation run: frozen dataclasses, recipes as YAML overrides, eager validation.

Resolution order: the defaults below <- a recipe (YAML file that only overrides fields) <- command-line flags.
The resolved config is written to every run directory as `config.json`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .errors import MissingFileError, UserError
from .objective import SCDConfig

INT64_MAX = 2**63 - 1  # integers must fit torch's int64 (step counters, seeds, sizes)
SEED_LIMIT = 2**32  # seeds in [0, 2**32): step_seed(seed, rank, step) then stays inside torch's 64-bit seed range
HALF_PI = math.pi / 2


@dataclass(frozen=True)
class DataConfig:
    spec: str = "digits"  # built-in name, image folder, or hf:NAME (see scm_distill.data)
    split: str = "train"
    resize_to: int | None = None  # resize short side (bilinear, antialias) + center crop to this size
    pad_to: int | None = None  # pad symmetrically with black to this size
    max_items: int | None = None  # use only the first N examples
    latent_cache: str | None = None  # latent teachers: folder of the on-disk latent cache (None: encode each batch)
    sigma_data_images: int = 1024  # latent teachers: images whose latents measure sigma_d (evenly spaced)
    random_flip: bool = False  # flip each training image horizontally with probability 1/2 (seeded per step)
    image_column: str | None = None  # hf: and folder data: the image column (None: the first Image feature)
    caption_column: str | None = None  # hf: and folder data: the caption column (None: the first of text, caption,
    # prompt, sentence, description)


@dataclass(frozen=True)
class StudentConfig:
    prediction: Literal["auto", "v_prediction", "epsilon", "sample", "flow"] = "auto"  # auto: v (VP), flow (flow)
    dropout: float = 0.0  # sCD uses 0 (paper); non-zero runs both passes on one seeded RNG stream
    logvar_channels: int = 128  # width of the adaptive-weighting head's time features
    # drop UNet time-embedding channels faster than this (rad per unit of the network's time input; None: keep
    # all); smooths dF/dt in the sCD tangent (student.low_pass_time_embedding)
    time_embedding_max_frequency: float | None = None


@dataclass(frozen=True)
class OptimConfig:
    name: Literal["radam", "adam", "adamw"] = "radam"
    lr: float = 1e-4  # paper: ~1e-4 for small models; ImageNet: teacher lr x 0.01
    convert_lr: float | None = None  # learning rate of the conversion (F regression) steps; None: lr
    betas: tuple[float, float] = (0.9, 0.99)  # paper
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_steps: int = 0  # linear learning-rate warmup (sCD steps)
    # learning-rate schedule of the sCD steps: constant (after the warmup); inverse_sqrt: lr / sqrt(max(step / ref,
    # 1)); constant_with_warmup, linear, cosine: diffusers' get_scheduler over train.max_steps (optim.py)
    decay: Literal["constant", "constant_with_warmup", "linear", "cosine", "inverse_sqrt"] = "constant"
    decay_ref_steps: int = 10_000
    scale_lr: bool = False  # multiply lr and convert_lr by the global batch (diffusers' --scale_lr)
    grad_clip: float | None = None  # max global gradient norm (None: no clipping)


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = 64  # per process and micro-batch (global batch = batch_size x processes x grad_accum_steps)
    max_steps: int = 2_000  # sCD optimizer steps (after the conversion steps)
    convert_steps: int = 200  # warm-start steps regressing the student's F onto the teacher's (0 to skip)
    seed: int = 0
    # bf16 autocast or none; null: what `accelerate launch --mixed_precision` / `accelerate config` say (else no)
    mixed_precision: Literal["no", "bf16"] | None = None
    ema_halflife_kimg: float = 500.0  # EMA half-life in thousands of samples (paper CIFAR-10: 0.5 Mimg)
    ema_rampup_ratio: float | None = 0.05  # half-life <= ratio x samples seen (None: no ramp-up)
    checkpoint_every: int = 500  # steps; 0 disables intermediate checkpoints
    keep_checkpoints: int = 2  # newest checkpoints kept on disk
    sample_every: int = 500  # steps between teacher-vs-student sample grids; 0 disables
    log_every: int = 10  # steps between log.jsonl records
    max_nonfinite_in_a_row: int = 20  # stop the run after this many skipped (non-finite) steps in a row
    num_workers: int = 0  # DataLoader workers
    # ddp: every process holds the whole training state; fsdp: FSDP2 shards the student, its gradients, optimizer
    # state and EMA and the teacher per block across the processes (scm_distill/parallel.py); null: fsdp when the
    # accelerate config asks for FSDP2, else ddp
    parallel: Literal["ddp", "fsdp"] | None = None
    # micro-batches per optimizer step (micro-batch m of rank r is virtual rank r*N+m); null: accelerate's
    # ACCELERATE_GRADIENT_ACCUMULATION_STEPS, else 1
    grad_accum_steps: int | None = None
    activation_checkpointing: bool = False  # recompute the student's blocks in the gradient pass (never the JVP)
    # accelerate tracker of the logged numbers, the collapse monitor and the sample grids (tracking.py)
    report_to: Literal["none", "tensorboard", "wandb"] = "none"


@dataclass(frozen=True)
class SamplingConfig:
    sigma_max: float = 80.0  # t_max = arctan(sigma_max / sigma_d), clamped to the teacher's range (Sec. 5.2)
    t_mid: float = 1.1  # intermediate time of the 2-step sampler (paper, all experiments)
    teacher_steps: int = 100  # steps of the teacher's own (DDIM) sampler in grids and reports
    grid_size: int = 16  # images per row in sample grids


@dataclass(frozen=True)
class ExportConfig:
    base_model_id: str | None = None  # Hub id of the teacher for the model card (default: the --teacher value)
    # which EMA weights the run's end exports: the last step's, or the collapse monitor's best (checkpoints/best)
    checkpoint: Literal["last", "best"] = "last"


@dataclass(frozen=True)
class GuidanceConfig:
    """Classifier-free guidance of text-conditioned teachers (arXiv 2410.11081v2 Sec. 5.2, App. G.2)."""

    s_min: float = 1.0  # training scales s ~ U[s_min, s_max] (paper: U[1, 2]); 1 = no guidance
    s_max: float | None = None  # None: max(2, the export's default scale) (paper: 2; SD's stock call uses 7.5)
    # the export's default guidance_scale and the sample grids' (None: the family's default - the stock pipeline's own
    # default where a stock pipeline feeds the scale (SD 7.5, SDXL and EDM 5.0, FLUX 3.5), else 1.5, the paper's
    # 1.2-1.5); LoRA students of CFG teachers: the one scale distilled into the weights
    scale: float | None = None
    negative_prompt: str = ""  # prompt of CFG's unconditional branch ("": the pipeline's own empty-prompt rule)
    embedding_dim: int = 256  # width of the student's guidance input (UNet time_cond_proj_dim; LCM uses 256)
    prompts: tuple[str, ...] = ()  # prompts of sample grids (empty: the first captions of the data)


@dataclass(frozen=True)
class LoraConfig:
    """LoRA distillation (peft): only low-rank adapters of the student train; rank 0 = full fine-tune."""

    rank: int = 0
    alpha: float | None = None  # LoRA alpha (None: = rank, i.e. scale 1)
    # names of the adapted layers (suffix match; default: the UNet layers LCM-LoRA adapts)
    target_modules: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj",
                                       "ff.net.2", "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv",
                                       "upsamplers.0.conv", "time_emb_proj")  # fmt: skip


@dataclass(frozen=True)
class DistillConfig:
    teacher: str = ""  # local pipeline folder or Hub id
    teacher_revision: str | None = None  # Hub teachers: branch, tag or commit (None: main)
    teacher_variant: str | None = None  # diffusers weight variant of the teacher's files, e.g. fp16 (None: default)
    cache_dir: str | None = None  # Hub teachers: download cache folder (None: the Hub's, HF_HOME)
    output: str = ""  # run directory
    sigma_data: float = 0.5  # TrigFlow sigma_d (paper: 0.5 for pixels; measured for latents)
    data: DataConfig = field(default_factory=DataConfig)
    objective: SCDConfig = field(default_factory=SCDConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    guidance: GuidanceConfig = field(default_factory=GuidanceConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)


def to_dict(config: Any) -> dict:
    return dataclasses.asdict(config)


def _coerce(value: Any, hint: Any, name: str) -> Any:
    """Check a YAML/CLI value against a field's type hint; tuples from lists, ints accepted for floats."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        if not any(value == a and type(value) is type(a) for a in args):
            raise UserError(f"config field '{name}' must be one of {list(args)}, got {value!r}.")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], name)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:  # tuple[X, ...]: any length
        if not isinstance(value, list | tuple):
            raise UserError(f"config field '{name}' must be a list, got {value!r}.")
        return tuple(_coerce(v, args[0], name) for v in value)
    if origin is tuple:
        if not isinstance(value, list | tuple) or len(value) != len(args):
            raise UserError(f"config field '{name}' must be a list of {len(args)} values, got {value!r}.")
        return tuple(_coerce(v, a, name) for v, a in zip(value, args, strict=True))
    if hint is float:
        return _number(value, name)
    if hint in (int, str, bool) and not (isinstance(value, hint) and not (hint is int and isinstance(value, bool))):
        raise UserError(f"config field '{name}' must be {hint.__name__}, got {value!r}.")
    return value


def _number(value: Any, name: str) -> float:
    """A float field's value: numbers and numeric strings (YAML 1.1 reads "3e-4", with no dot, as a string)."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise UserError(f"config field '{name}' must be a number, got {value!r}.")
    try:
        return float(value)
    except (ValueError, OverflowError):  # OverflowError: an integer beyond the float range
        raise UserError(f"config field '{name}' must be a number, got {value!r}.") from None


def override(config: Any, updates: dict, prefix: str = "") -> Any:
    """A copy of a frozen dataclass with nested `updates` applied; unknown fields are errors."""
    hints = typing.get_type_hints(type(config))
    changes = {}
    for key, value in updates.items():
        name = f"{prefix}{key}"
        if key not in hints:
            raise UserError(f"unknown config field '{name}'.")
        current = getattr(config, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise UserError(f"config section '{name}' must be a mapping, got {value!r}.")
            changes[key] = override(current, value, prefix=f"{name}.")
        else:
            changes[key] = _coerce(value, hints[key], name)
    return dataclasses.replace(config, **changes)


def load_recipe(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise MissingFileError(f"recipe file '{path}' does not exist.")
    if not path.is_file():
        raise UserError(f"recipe '{path}' is not a file.")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError, RecursionError) as error:
        raise UserError(f"recipe '{path}' is not valid YAML ({error.__class__.__name__}).") from None
    if not isinstance(data, dict):
        raise UserError(f"recipe '{path}' must be a mapping of config fields.")
    return data


def dotted_to_nested(assignments: list[str]) -> dict:
    """['train.lr=1e-4', ...] -> {'train': {'lr': 1e-4}}; values are parsed as YAML scalars."""
    nested: dict = {}
    for item in assignments:
        if "=" not in item:
            raise UserError(f"--set expects FIELD=VALUE, got '{item}'.")
        key, raw = item.split("=", 1)
        *parents, leaf = key.strip().split(".")
        node = nested
        for parent in parents:
            node = node.setdefault(parent, {})
            if not isinstance(node, dict):
                raise UserError(f"--set '{key}' sets a field inside '{parent}', which an earlier --set gave a value.")
        try:
            node[leaf] = yaml.safe_load(raw)
        except (yaml.YAMLError, RecursionError) as error:
            kind = error.__class__.__name__
            raise UserError(f"--set '{key}': the value is not a valid YAML scalar ({kind}).") from None
    return nested


def numbers_out_of_range(config: Any, prefix: str = "") -> str | None:
    """The first numeric field (dotted name) holding a NaN or infinite float or an integer beyond int64."""
    for item in dataclasses.fields(config):
        value, name = getattr(config, item.name), f"{prefix}{item.name}"
        if dataclasses.is_dataclass(value):
            found = numbers_out_of_range(value, f"{name}.")
            if found:
                return found
            continue
        for v in value if isinstance(value, tuple) else (value,):
            if isinstance(v, float) and not math.isfinite(v):
                return f"config field '{name}' must be a finite number, got {v}."
            if isinstance(v, int) and not isinstance(v, bool) and abs(v) > INT64_MAX:
                return f"config field '{name}' is too large ({v})."
    return None


def at_least(value: int | float | None, low: int | float) -> bool:
    return value is None or value >= low


def positive_or_none(value: int | float | None) -> bool:
    return value is None or value > 0


def range_checks(c: DistillConfig) -> list[tuple[bool, str]]:
    """(ok, one-sentence message) for every field whose range is limited; types and finiteness are checked before."""
    o, t, s, g, d = c.optim, c.train, c.sampling, c.guidance, c.data
    return [
        (bool(c.teacher), "a teacher is required (--teacher PATH_OR_ID)."),
        (bool(c.output), "an output directory is required (--output DIR)."),
        (c.sigma_data > 0, f"sigma_data must be positive, got {c.sigma_data}."),
        (at_least(d.resize_to, 1), f"data.resize_to must be a positive integer or null, got {d.resize_to}."),
        (at_least(d.pad_to, 1), f"data.pad_to must be a positive integer or null, got {d.pad_to}."),
        (at_least(d.max_items, 1), f"data.max_items must be a positive integer or null, got {d.max_items}."),
        (d.sigma_data_images >= 1, "data.sigma_data_images must be at least 1."),
        (c.objective.P_std > 0, f"objective.P_std must be positive, got {c.objective.P_std}."),
        (c.objective.tangent_warmup_steps >= 0, "objective.tangent_warmup_steps must be non-negative."),
        (c.objective.tangent_norm_c >= 0, "objective.tangent_norm_c must be non-negative."),
        (c.objective.finite_difference_h > 0, "objective.finite_difference_h must be positive."),
        (not c.objective.compile_jvp or c.objective.jvp == "exact",
         "objective.compile_jvp compiles the exact JVP; it cannot be combined with objective.jvp finite_difference."),
        (0 <= c.student.dropout < 1, f"student.dropout must be in [0, 1), got {c.student.dropout}."),
        (c.student.logvar_channels >= 2 and c.student.logvar_channels % 2 == 0,
         f"student.logvar_channels must be an even number of at least 2, got {c.student.logvar_channels}."),
        (positive_or_none(c.student.time_embedding_max_frequency),
         "student.time_embedding_max_frequency must be positive."),
        (o.lr > 0, f"optim.lr must be positive, got {o.lr}."),
        (positive_or_none(o.convert_lr), "optim.convert_lr must be positive."),
        (all(0 <= b < 1 for b in o.betas), f"optim.betas must lie in [0, 1), got {list(o.betas)}."),
        (o.eps > 0, f"optim.eps must be positive, got {o.eps}."),
        (o.weight_decay >= 0, f"optim.weight_decay must be non-negative, got {o.weight_decay}."),
        (o.warmup_steps >= 0, "optim.warmup_steps must be non-negative."),
        (o.decay_ref_steps >= 1, "optim.decay_ref_steps must be at least 1."),
        (positive_or_none(o.grad_clip), f"optim.grad_clip must be positive (null: no clipping), got {o.grad_clip}."),
        (t.batch_size >= 1, f"train.batch_size must be at least 1, got {t.batch_size}."),
        (t.max_steps >= 1, f"train.max_steps must be at least 1 (0 would export the untrained student), got "
                           f"{t.max_steps}."),
        (t.convert_steps >= 0, "train.convert_steps must be non-negative."),
        (at_least(t.grad_accum_steps, 1), f"train.grad_accum_steps must be at least 1, got {t.grad_accum_steps}."),
        (not (c.objective.compile_jvp and t.parallel == "fsdp"),
         "objective.compile_jvp is not supported with train.parallel fsdp yet (untested through FSDP2's hooks)."),
        (0 <= t.seed < SEED_LIMIT, f"train.seed must be in [0, 2**32), got {t.seed}."),
        (t.ema_halflife_kimg > 0, "train.ema_halflife_kimg must be positive."),
        (positive_or_none(t.ema_rampup_ratio), "train.ema_rampup_ratio must be positive (null: no ramp-up)."),
        (t.checkpoint_every >= 0, "train.checkpoint_every must be non-negative (0: only the final checkpoint)."),
        (t.keep_checkpoints >= 1, "train.keep_checkpoints must be at least 1."),
        (t.sample_every >= 0, "train.sample_every must be non-negative (0: no sample grids)."),
        (t.log_every >= 1, f"train.log_every must be at least 1, got {t.log_every}."),
        (t.max_nonfinite_in_a_row >= 1, "train.max_nonfinite_in_a_row must be at least 1."),
        (t.num_workers >= 0, "train.num_workers must be non-negative."),
        (0 < s.t_mid < HALF_PI, f"sampling.t_mid must be in (0, pi/2), got {s.t_mid}."),
        (s.sigma_max > 0, "sampling.sigma_max must be positive."),
        (s.teacher_steps >= 1, "sampling.teacher_steps must be at least 1."),
        (s.grid_size >= 1, "sampling.grid_size must be at least 1."),
        (c.export.checkpoint == "last" or t.sample_every > 0, "--export best needs the collapse monitor, which "
                                                              "measures every train.sample_every steps; set it > 0."),
        (g.s_min >= 1, f"guidance.s_min must be at least 1 (no guidance), got {g.s_min}."),
        (at_least(g.s_max, g.s_min), "guidance.s_max must not be below guidance.s_min."),
        (at_least(g.scale, 1), f"guidance.scale must be at least 1, got {g.scale}."),
        (g.embedding_dim >= 2, "guidance.embedding_dim must be at least 2."),
        (c.lora.rank >= 0, f"lora.rank must be a positive integer (0: no LoRA), got {c.lora.rank}."),
        (c.lora.rank == 0 or c.student.dropout == 0, "LoRA students share the teacher's network and need "
                                                     "student.dropout 0."),
        (positive_or_none(c.lora.alpha), "lora.alpha must be positive."),
    ]  # fmt: skip


def validate(config: DistillConfig) -> DistillConfig:
    """Eager checks with one-sentence errors: every number finite and inside its range."""
    problem = numbers_out_of_range(config)
    if problem:
        raise UserError(problem)
    for ok, message in range_checks(config):
        if not ok:
            raise UserError(message)
    return config


def resolve(recipe: str | None = None, cli: dict | None = None, sets: list[str] | None = None,
            base: DistillConfig | None = None) -> DistillConfig:  # fmt: skip
    """Defaults (or `base`, e.g. a run's config.json) <- recipe <- --set FIELD=VALUE <- explicit CLI flags, then
    validated."""
    config = base or DistillConfig()
    if recipe:
        config = override(config, load_recipe(recipe))
    if sets:
        config = override(config, dotted_to_nested(sets))
    if cli:
        config = override(config, cli)
    return validate(config)


def config_from_json(path: str | Path, check: bool = True) -> DistillConfig:
    try:
        values = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"config '{path}' cannot be read ({error.__class__.__name__}).") from None
    if not isinstance(values, dict):
        raise UserError(f"config '{path}' is not a JSON object of config fields.")
    if isinstance(values.get("export"), dict):
        values["export"].pop("eval_samples", None)  # read by no code; removed (runs before 0.1.1 wrote it)
    config = override(DistillConfig(), values)
    return validate(config) if check else config
