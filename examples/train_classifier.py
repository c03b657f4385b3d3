"""Train the Fashion-MNIST classifier behind `class_accuracy` (scm_distill/metrics/classifier.py) and ship it.

    python examples/train_classifier.py --output scm_distill/assets/fashion-classifier

Data: the Fashion-MNIST train split (60,000 images; offline from the Debian package dataset-fashion-mnist, else
the Hub through `datasets`). Half of the batches keep the 28x28 items at their size, the others draw one random
size in [24, 32] pixels; each item sits at its own random place in a black 32x32 frame, and a random 20% of the
batches are blurred by a round trip through 16x16. So the classifier reads samples padded to 32 (28 in 32) best,
and items that fill their frame (16x16 teachers, upsampled) too.
Adam with a cosine learning rate, cross-entropy with 0.1 label smoothing. Test accuracy on the 10,000 test images
in three layouts (padded to 32, full frame at 28 and at 16) is written to classifier.json next to the weights.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from family_teachers.training import cpu_minutes, output_folder
from safetensors.torch import save_file

from scm_distill.data import batch_indices, load_images
from scm_distill.metrics.classifier import (
    INFO_FILE,
    INPUT_SIZE,
    WEIGHTS_FILE,
    ClassifierConfig,
    FashionClassifier,
    class_accuracy,  # fmt: skip
)

ITEM_SIZE = 28  # Fashion-MNIST's side, pixels
SIZE_RANGE = (24, INPUT_SIZE)  # the item's side inside the 32x32 frame during training, pixels (inclusive)
RESIZE_PROBABILITY = 0.5  # fraction of the batches drawn at a random size from SIZE_RANGE (the rest at 28)
BLUR_SIZE, BLUR_PROBABILITY = 16, 0.2  # the low-resolution round trip of a fraction of the batches
TEST_LAYOUTS = {"padded-32": {"pad_to": 32}, "full-28": {}, "full-16": {"resize_to": 16}}  # data transforms


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", required=True, help="folder to write (model.safetensors + classifier.json)")
    p.add_argument("--epochs", type=float, default=10.0)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--widths", default="32,64,128", help="channels of the three stages, comma-separated")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    return p.parse_args(argv)


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Items [B, 1, 28, 28] in [-1, 1] -> [B, 1, 32, 32]: one size for the batch (28 or random), a random place per
    item, black (-1) around it, and sometimes the 16-pixel blur."""
    size = ITEM_SIZE
    if float(torch.rand((), generator=generator)) < RESIZE_PROBABILITY:
        size = int(torch.randint(SIZE_RANGE[0], SIZE_RANGE[1] + 1, (), generator=generator))
    if size != ITEM_SIZE:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    room = INPUT_SIZE - size
    frame = torch.full((x.shape[0], 1, INPUT_SIZE, INPUT_SIZE), -1.0)
    offsets = torch.randint(0, room + 1, (x.shape[0], 2), generator=generator).tolist()
    for i, (top, left) in enumerate(offsets):
        frame[i, :, top : top + size, left : left + size] = x[i]
    if float(torch.rand((), generator=generator)) < BLUR_PROBABILITY:
        small = F.interpolate(frame, size=(BLUR_SIZE, BLUR_SIZE), mode="bilinear", antialias=True, align_corners=False)
        frame = F.interpolate(small, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
    return frame


# Cosine learning-rate decay to 0 after a linear warm-up of `warmup` steps.
def learning_rate(step: int, total: int, peak: float, warmup: int = 200) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return 0.5 * peak * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def test_accuracies(net: FashionClassifier) -> dict[str, float]:
    """Accuracy on the 10,000 test images in each layout of TEST_LAYOUTS."""
    out = {}
    for name, transform in TEST_LAYOUTS.items():
        test = load_images("fashion-mnist", split="test", **transform)
        out[name] = round(class_accuracy(test.uint8_images(), test.labels, net), 4)
    return out


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    out = Path(args.output)
    if out.exists() and not args.overwrite:
        raise SystemExit(f"error: output '{out}' exists; pass --overwrite to replace it.")
    torch.manual_seed(args.seed)
    config = ClassifierConfig(widths=tuple(int(w) for w in args.widths.split(",")))
    train = load_images("fashion-mnist", split="train")
    images, labels = train.images, train.labels  # uint8 [N, 1, 28, 28], int64 [N]
    net = FashionClassifier(config).train().to(memory_format=torch.channels_last)  # faster convolutions on CPU
    optimizer = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    generator = torch.Generator().manual_seed(args.seed)
    steps = int(args.epochs * len(images) / args.batch_size)
    started, losses = time.time(), []
    for step in range(steps):
        index = batch_indices(step, args.batch_size, len(images), args.seed)
        x = augment(images[index].float() / 127.5 - 1.0, generator).contiguous(memory_format=torch.channels_last)
        loss = F.cross_entropy(net(x), labels[index], label_smoothing=0.1)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps, args.lr)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step % 200 == 0 or step == steps - 1:
            print(f"step {step}/{steps} loss {sum(losses[-200:]) / len(losses[-200:]):.4f}", flush=True)
    net.eval()
    accuracy = test_accuracies(net)
    info = {"data": "fashion-mnist (train split, 60,000 images)", "config": dataclasses.asdict(config),
            "input": f"greyscale {INPUT_SIZE}x{INPUT_SIZE} in [-1, 1]", "classes": list(train.class_names),
            "test_accuracy": accuracy, "test_images": 10000, "steps": steps, "batch_size": args.batch_size,
            "epochs": args.epochs, "lr": args.lr, "parameters": sum(p.numel() for p in net.parameters()),
            "train_minutes": round((time.time() - started) / 60, 2), "cpu_minutes": round(cpu_minutes(), 2),
            "seed": args.seed, "command": "python examples/train_classifier.py " + " ".join(argv)}  # fmt: skip
    with output_folder(out, overwrite=args.overwrite) as tmp:  # temporary folder, fsynced, renamed
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, tmp / WEIGHTS_FILE)
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    print(f"saved {out}: test accuracy {accuracy}")


if __name__ == "__main__":
    main()
