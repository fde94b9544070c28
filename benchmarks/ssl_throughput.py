"""Training-step speed of each self-supervised method, against a supervised step of the same backbone.

    python benchmarks/ssl_throughput.py                                     # CPU: resnet-micro, 32 px, batch 128
    python benchmarks/ssl_throughput.py --device cuda --backbone resnet18-small --batch-size 512
    python benchmarks/ssl_throughput.py --device cuda --backbone vit-small --image-size 224 --patch-size 16

Timed, per method: forward, backward and optimiser step (with the momentum
updates and SwAV's prototype freezing) on one ready batch of augmented views,
in bf16 autocast on the GPU exactly as `tandem train` runs it. Data loading is
not timed (it runs in DataLoader workers during training). Baseline, in the
same process: a supervised step of the same backbone with a linear classifier
on the same number of images (one view each), AdamW. Printed: images/s (source
images; each method turns them into 2 or more views), the ratio to the
supervised step, and the model FLOPs of one step (PyTorch's FlopCounterMode:
matmuls and convolutions, forward and backward) as achieved TFLOP/s and, on a
known GPU or with --peak-tflops, the fraction of the GPU's dense bf16 peak.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from training.config import TrainConfig  # noqa: E402
from training.data import procedural  # noqa: E402
from training.methods import SSL_METHODS, ssl_class, ssl_config  # noqa: E402
from training.trainer import make_optimizer  # noqa: E402

# Dense bf16 tensor-core peak in TFLOP/s (NVIDIA data sheets, without sparsity), by device-name fragment.
PEAK_BF16_TFLOPS = {"H100 80GB HBM3": 989.0, "H100 PCIe": 756.0, "H100 NVL": 835.0, "H200": 989.0,
                    "A100": 312.0, "L4": 121.0}


def peak_tflops(device: torch.device, given: float | None) -> float | None:
    if given or device.type != "cuda":
        return given
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_steps(step, device: torch.device, warmup: int, steps: int) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    """(seconds per step, FLOPs per step) of `step()`."""
    for _ in range(warmup):
        step()
    with FlopCounterMode(display=False) as counter:
        step()
    synchronize(device)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return (time.perf_counter() - started) / steps, float(counter.get_total_flops())


def method_step(name: str, args: argparse.Namespace, images: list, device: torch.device):  # type: ignore[no-untyped-def]
    """A closure running one training step of `name` on a fixed batch of its own augmented views."""
    cls = ssl_class(name)
    backbone = args.vit_backbone if cls.needs_vit else args.backbone
    config = ssl_config(name, backbone=backbone, image_size=args.image_size, patch_size=args.patch_size,
                        hidden_dim=args.hidden_dim, out_dim=args.out_dim, batch_size=args.batch_size)
    method = cls(config, None).to(device).train()  # with its online linear probe, as `tandem train` runs it
    optimizer = make_optimizer(method, TrainConfig.for_run(config))  # the method's default optimiser
    views = method.views()
    batch = method.collate([(views(img), 0) for img in images])
    autocast = device.type == "cuda"
    count = [0]

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = method.loss(method, batch, device)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if hasattr(method, "after_backward"):
            method.after_backward(count[0])
        optimizer.step()
        count[0] += 1
        method.after_step(count[0], 10**6)

    return step, backbone


def supervised_step(backbone_name: str, args: argparse.Namespace, images: list, device: torch.device):  # type: ignore[no-untyped-def]
    from training.backbones import build_backbone
    from training.transforms import eval_transform

    backbone = build_backbone(backbone_name, args.image_size, args.patch_size)
    model = nn.Sequential(backbone, nn.Linear(backbone.dim, 56)).to(device).train()
    optimizer = make_optimizer(model, TrainConfig(steps=1, batch_size=len(images), optimizer="adamw", lr=1e-3,
                                                  weight_decay=1e-4, warmup_steps=0))
    transform = eval_transform(args.image_size)
    x = torch.stack([transform(img) for img in images]).to(device)
    y = torch.randint(0, 56, (len(images),), device=device)
    autocast = device.type == "cuda"

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=list(SSL_METHODS))
    p.add_argument("--backbone", default="resnet-micro", help="backbone of every method except MAE")
    p.add_argument("--vit-backbone", default="vit-micro", help="MAE's backbone")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--patch-size", type=int)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--hidden-dim", type=int, default=512)
    p.add_argument("--out-dim", type=int, default=128)
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 10 on CPU, 50 on GPU)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak (known GPUs: automatic)")
    return p.parse_args(argv)


def measure(args: argparse.Namespace) -> list[dict]:  # type: ignore[type-arg]
    """One row per method, after one `supervised` row per backbone; printed as they come."""
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    steps = args.steps or (50 if device.type == "cuda" else 10)
    peak = peak_tflops(device, args.peak_tflops)
    torch.manual_seed(0)
    images = [procedural.ShapesDataset("train", args.batch_size)[i][0] for i in range(args.batch_size)]
    what = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.machine()} CPU"
    print(f"device: {what}; torch {torch.__version__}; {args.image_size} px, batch {args.batch_size}, "
          f"{steps} timed steps after {args.warmup} warm-up; bf16 autocast: {device.type == 'cuda'}", flush=True)
    print("method | backbone | images/s | vs supervised step | GFLOP/step | TFLOP/s | of peak")
    rows: list[dict] = []  # type: ignore[type-arg]
    supervised: dict[str, float] = {}

    def report(name: str, backbone: str, seconds: float, flops: float) -> None:
        rate = args.batch_size / seconds
        supervised.setdefault(backbone, rate)
        tflops = flops / seconds / 1e12
        rows.append({"method": name, "backbone": backbone, "images_per_s": rate, "gflop_per_step": flops / 1e9,
                     "vs_supervised": rate / supervised[backbone], "tflops": tflops,
                     "of_peak": tflops / peak if peak else None})
        print(f"{name} | {backbone} | {rate:.0f} | {rate / supervised[backbone]:.2f} | {flops / 1e9:.1f} | "
              f"{tflops:.2f} | " + (f"{tflops / peak:.1%}" if peak else "-"), flush=True)

    for name in args.methods:
        step, backbone = method_step(name, args, images, device)
        if backbone not in supervised:
            report("supervised", backbone,
                   *timed_steps(supervised_step(backbone, args, images, device), device, args.warmup, steps))
        report(name, backbone, *timed_steps(step, device, args.warmup, steps))
    return rows


def main(argv: list[str] | None = None) -> int:
    measure(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
