"""Train a small DDPM teacher (diffusers UNet2DModel + DDPMScheduler) and save it as a DDPMPipeline folder.

This is how the embedded demo teacher (scm_distill/assets/digits-teacher) and the Fashion-MNIST benchmark
teacher are made; the result is an ordinary diffusers pipeline, the same kind of folder users distill.

    python examples/train_teacher.py --data digits --resize-to 16 --output scm_distill/assets/digits-teacher
    python examples/train_teacher.py --data fashion-mnist --pad-to 32 --widths 64,128,128 --steps 20000 \
        --batch-size 256 --mixed-precision bf16 --output runs/fashion-teacher

Loss: the standard DDPM objective (Ho et al. 2020) in the chosen prediction type, uniform integer timesteps;
the saved weights are an EMA of the trained ones.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from tqdm.auto import tqdm

from scm_distill.checkpoint import atomic_directory
from scm_distill.data import batch_indices, collate, load_images
from scm_distill.ema import EMA, ema_beta


def build_unet(channels: int, size: int, widths: list[int], attention_levels: set[int], layers: int,
               dropout: float) -> UNet2DModel:  # fmt: skip
    """A UNet2DModel with self-attention at the listed resolution levels (0 = full resolution)."""
    down = [("AttnDownBlock2D" if i in attention_levels else "DownBlock2D") for i in range(len(widths))]
    up = [("AttnUpBlock2D" if i in attention_levels else "UpBlock2D") for i in reversed(range(len(widths)))]
    return UNet2DModel(sample_size=size, in_channels=channels, out_channels=channels, block_out_channels=widths,
                       down_block_types=down, up_block_types=up, layers_per_block=layers,
                       norm_num_groups=min(8, widths[0]), attention_head_dim=min(32, widths[0]),
                       dropout=dropout)  # fmt: skip


# DDPM training target: eps, or v = sqrt(ab) eps - sqrt(1 - ab) x0 (Salimans & Ho 2022).
def ddpm_target(x0: torch.Tensor, eps: torch.Tensor, ab: torch.Tensor, prediction: str) -> torch.Tensor:
    if prediction == "epsilon":
        return eps
    return ab.sqrt() * eps - (1 - ab).sqrt() * x0


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="digits", help="data spec (see scm_distill.data)")
    p.add_argument("--split", default="train")
    p.add_argument("--resize-to", type=int)
    p.add_argument("--pad-to", type=int)
    p.add_argument("--output", required=True, help="pipeline folder to write")
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup-steps", type=int, default=200)
    p.add_argument("--prediction", choices=["epsilon", "v_prediction"], default="epsilon")
    p.add_argument("--beta-schedule", default="linear")
    p.add_argument("--widths", default="32,64,64", help="block_out_channels, comma-separated")
    p.add_argument("--attention-levels", default="1", help="levels with self-attention, comma-separated")
    p.add_argument("--layers-per-block", type=int, default=1)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--ema-halflife-kimg", type=float, default=50.0)
    p.add_argument("--mixed-precision", choices=["no", "bf16"], default="no")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    out = Path(args.output)
    if out.exists() and not args.overwrite:
        raise SystemExit(f"error: output '{out}' exists; pass --overwrite to replace it.")
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    data = load_images(args.data, split=args.split, resize_to=args.resize_to, pad_to=args.pad_to)
    widths = [int(w) for w in args.widths.split(",")]
    levels = {int(i) for i in args.attention_levels.split(",") if i != ""}
    unet = build_unet(data.channels, data.resolution[0], widths, levels, args.layers_per_block, args.dropout)
    unet.to(device).train()
    scheduler = DDPMScheduler(beta_schedule=args.beta_schedule, prediction_type=args.prediction)
    alphas_cumprod = scheduler.alphas_cumprod.to(device)
    ema = EMA(unet)
    optimizer = torch.optim.Adam(unet.parameters(), lr=args.lr, betas=(0.9, 0.999))
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=args.mixed_precision == "bf16")
    generator = torch.Generator(device).manual_seed(args.seed)
    started, losses = time.time(), []
    for step in (bar := tqdm(range(args.steps), desc="teacher", dynamic_ncols=True)):
        batch = collate([data[i] for i in batch_indices(step, args.batch_size, len(data), args.seed).tolist()])
        x0 = batch["image"].to(device)
        tau = torch.randint(0, len(alphas_cumprod), (x0.shape[0],), device=device, generator=generator)
        eps = torch.randn(x0.shape, device=device, generator=generator)
        ab = alphas_cumprod[tau].view(-1, 1, 1, 1)
        with autocast:
            prediction = unet(ab.sqrt() * x0 + (1 - ab).sqrt() * eps, tau).sample
        loss = (prediction.float() - ddpm_target(x0, eps, ab, args.prediction)).square().mean()
        for group in optimizer.param_groups:
            group["lr"] = args.lr * min(1.0, (step + 1) / args.warmup_steps) / math.sqrt(max(step / 2000, 1.0))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        ema.update(unet, ema_beta(args.batch_size, (step + 1) * args.batch_size, args.ema_halflife_kimg, 0.1))
        losses.append(loss.item())
        bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}", refresh=False)

    with atomic_directory(out, overwrite=args.overwrite) as tmp:
        DDPMPipeline(unet=ema.module, scheduler=scheduler).save_pretrained(tmp, safe_serialization=True)
        info = {"data": args.data, "resize_to": args.resize_to, "pad_to": args.pad_to, "steps": args.steps,
                "batch_size": args.batch_size, "prediction": args.prediction, "widths": widths,
                "attention_levels": sorted(levels), "parameters": sum(p.numel() for p in unet.parameters()),
                "train_minutes": round((time.time() - started) / 60, 2),
                "final_loss": sum(losses[-200:]) / len(losses[-200:]),
                "seed": args.seed, "command": "python examples/train_teacher.py " + " ".join(argv)}  # fmt: skip
        (tmp / "teacher_info.json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"saved {out} ({info['parameters']} parameters, {info['train_minutes']} min)")


if __name__ == "__main__":
    main()
