"""The degradation experiment of He et al. 2016, "Deep Residual Learning" (Fig. 1 and 6), on a CPU.

What it shows: a deeper *plain* network (plain-56) ends with a higher *training* error than a
shallower one (plain-20) with the same recipe -- an optimisation problem, not overfitting --
while with identity (option-A) shortcuts the deeper network (ResNet-56) does at least as
well as the shallower one (ResNet-20). The right panel is the vanishing/exploding-gradient
view: the L2 norm of each convolution's weight gradient at initialisation, for one fixed
batch, in depth order. (He et al. argue that with BatchNorm the degradation is not a
vanishing-gradient effect; the panel shows what the gradients look like when training starts.)

Data: scikit-learn's bundled 8x8 handwritten digits (`sklearn.datasets.load_digits`, 1,797
images, 10 classes; nothing is downloaded), greyscale replicated to 3 channels, upsampled
bilinearly to `--image-size`, normalised with the training set's mean and standard deviation,
split 3/4 train / 1/4 test, stratified, with a fixed seed (`--seed`). No data augmentation.

Recipe (the paper's CIFAR recipe, shortened): SGD, momentum 0.9, weight decay 1e-4,
mini-batch 128, learning rate 0.1 (after a short linear warm-up from 0.01 over the first
epoch), divided by 10 at 50% and 75% of the epochs (the paper: at 32k and 48k of 64k
iterations). Every network is built after `torch.manual_seed(seed)` and sees the same
mini-batch order (a generator seeded with `seed`).

Recorded per epoch: the training loss (mean over the epoch's mini-batches, train mode), the
training error (%) measured in eval mode over the whole training set (the running train-mode
error is recorded too, as `train_error_running`), and the test error (%).

Run with fusedres installed (`pip install -e ".[examples]"` also brings scikit-learn and
matplotlib), or from the repository root with `PYTHONPATH=.`:

    python examples/degradation.py                  # full run: 16 epochs at 16x16, ~5 minutes on 2 CPU cores
    python examples/degradation.py --quick          # smoke run: 300 images, 2 epochs, 8x8, ~10 s
    python examples/degradation.py --image-size 32 --threads 4   # the paper's image size, ~4x the cost

Defaults: 16x16 images and 16 epochs (176 SGD steps per network) fit the four networks in
about 5 minutes on a 2-core CPU with room to spare (32x32 costs about 4x as much), and are
enough (seed 0) for plain-20 and both ResNets to fit the training set while plain-56 is still
far behind. One torch thread by default: on a 2-core machine with anything else running, two
threads were about 10x slower than one; on an idle or larger machine, raise `--threads`.

Writes `degradation.png` and `degradation.json` to `--out-dir` (default ./degradation-out)
and prints a summary table. Exits with status 1 if any loss is not finite.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import fusedres
from fusedres import models
from fusedres.cifar import CifarResNet

NETWORKS: tuple[str, ...] = ("plain20", "plain56", "resnet20", "resnet56")
BATCH_SIZE = 128
WARMUP_LR = 0.01

FULL_DEFAULTS = {"epochs": 16, "image_size": 16, "subset": None}
QUICK_DEFAULTS = {"epochs": 2, "image_size": 8, "subset": 300}


@dataclass
class Config:
    out_dir: str
    quick: bool
    epochs: int
    seed: int
    image_size: int
    threads: int
    subset: int | None
    batch_size: int = BATCH_SIZE
    lr: float = 0.1
    warmup_lr: float = WARMUP_LR
    momentum: float = 0.9
    weight_decay: float = 1e-4
    test_fraction: float = 0.25


@dataclass
class Data:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    mean: float
    std: float


def parse_args(argv: list[str] | None = None) -> Config:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", default="./degradation-out", help="where to write the PNG and JSON")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke run: {QUICK_DEFAULTS['subset']} images, {QUICK_DEFAULTS['epochs']} epochs, "
                             f"{QUICK_DEFAULTS['image_size']}x{QUICK_DEFAULTS['image_size']}")
    parser.add_argument("--epochs", type=int, default=None,
                        help=f"epochs per network (default {FULL_DEFAULTS['epochs']}, "
                             f"--quick {QUICK_DEFAULTS['epochs']})")
    parser.add_argument("--seed", type=int, default=0, help="split, initialisation and batch-order seed")
    parser.add_argument("--image-size", type=int, default=None,
                        help=f"side of the upsampled images (default {FULL_DEFAULTS['image_size']}, "
                             f"--quick {QUICK_DEFAULTS['image_size']}; the paper's CIFAR images are 32)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1; see the module docstring)")
    args = parser.parse_args(argv)
    defaults = QUICK_DEFAULTS if args.quick else FULL_DEFAULTS
    config = Config(
        out_dir=args.out_dir, quick=args.quick, seed=args.seed, threads=args.threads,
        epochs=args.epochs if args.epochs is not None else defaults["epochs"],
        image_size=args.image_size if args.image_size is not None else defaults["image_size"],
        subset=defaults["subset"],
    )
    if config.epochs < 1:
        parser.error("--epochs must be at least 1")
    if config.image_size < 4:
        parser.error("--image-size must be at least 4")
    if config.threads < 1:
        parser.error("--threads must be at least 1")
    return config


# Data ----------------------------------------------------------------------------------------

def load_data(config: Config) -> Data:
    """The digits, as 3-channel `image_size` squares, normalised, with a fixed stratified split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images, labels = digits.images, digits.target  # (1797, 8, 8) in 0..16, (1797,)
    if config.subset is not None:
        images, _, labels, _ = train_test_split(images, labels, train_size=config.subset,
                                                stratify=labels, random_state=config.seed)
    x_train, x_test, y_train, y_test = train_test_split(images, labels, test_size=config.test_fraction,
                                                        stratify=labels, random_state=config.seed)
    x_train, x_test = (_to_images(x, config.image_size) for x in (x_train, x_test))
    mean, std = x_train.mean().item(), x_train.std().item()
    return Data(x_train=(x_train - mean) / std, y_train=torch.as_tensor(y_train, dtype=torch.long),
                x_test=(x_test - mean) / std, y_test=torch.as_tensor(y_test, dtype=torch.long),
                mean=mean, std=std)


def _to_images(images: Any, size: int) -> torch.Tensor:
    x = torch.as_tensor(images, dtype=torch.float32).unsqueeze(1) / 16.0  # N, 1, 8, 8 in [0, 1]
    if size != x.shape[-1]:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x.expand(-1, 3, -1, -1).contiguous()


# Networks, gradient norms, training ----------------------------------------------------------

def build_network(name: str, seed: int) -> CifarResNet:
    """plain20 -> fusedres.models.cifar_plain20(), ...: the same seed for every network."""
    torch.manual_seed(seed)
    return getattr(models, f"cifar_{name}")(num_classes=10)


def conv_grad_norms(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """The L2 norm of each conv weight's gradient (depth order) for one batch, train mode.

    Runs on a copy, so the model's BN running statistics and gradients stay as built."""
    probe = copy.deepcopy(model).train()
    F.cross_entropy(probe(x), y).backward()
    return {name: m.weight.grad.norm().item()
            for name, m in probe.named_modules() if isinstance(m, nn.Conv2d)}


def lr_at(config: Config, epoch: int, step: int, steps_per_epoch: int) -> float:
    """Linear warm-up 0.01 -> 0.1 over epoch 0; then 0.1, /10 at 50% and /10 again at 75% of the epochs."""
    if epoch == 0 and config.epochs > 1:
        return config.warmup_lr + (config.lr - config.warmup_lr) * step / steps_per_epoch
    return config.lr * 0.1 ** sum(epoch >= m for m in (config.epochs // 2, (3 * config.epochs) // 4) if m > 0)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(mean loss, error %) in eval mode over the whole set."""
    model.eval()
    loss_sum, wrong = 0.0, 0
    for i in range(0, len(x), 256):
        logits = model(x[i:i + 256])
        loss_sum += F.cross_entropy(logits, y[i:i + 256], reduction="sum").item()
        wrong += (logits.argmax(1) != y[i:i + 256]).sum().item()
    return loss_sum / len(x), 100.0 * wrong / len(x)


def train_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, data: Data, config: Config,
                epoch: int, generator: torch.Generator) -> tuple[float, float]:
    """One epoch of SGD in train mode: (mean mini-batch loss, running error %)."""
    model.train()
    order = torch.randperm(len(data.x_train), generator=generator)
    steps = math.ceil(len(order) / config.batch_size)
    loss_sum, wrong = 0.0, 0
    for step in range(steps):
        idx = order[step * config.batch_size:(step + 1) * config.batch_size]
        for group in optimizer.param_groups:
            group["lr"] = lr_at(config, epoch, step, steps)
        logits = model(data.x_train[idx])
        loss = F.cross_entropy(logits, data.y_train[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += loss.item() * len(idx)
        wrong += (logits.detach().argmax(1) != data.y_train[idx]).sum().item()
    return loss_sum / len(order), 100.0 * wrong / len(order)


def run_network(name: str, data: Data, config: Config) -> dict[str, Any]:
    """Build, measure the gradient norms at init, train; the network's record."""
    model = build_network(name, config.seed)
    grad_norms = conv_grad_norms(model, data.x_train[:config.batch_size], data.y_train[:config.batch_size])
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(config.seed)
    epochs: list[dict[str, Any]] = []
    start = time.perf_counter()
    for epoch in range(config.epochs):
        train_loss, train_error_running = train_epoch(model, optimizer, data, config, epoch, generator)
        train_loss_eval, train_error = evaluate(model, data.x_train, data.y_train)
        test_loss, test_error = evaluate(model, data.x_test, data.y_test)
        epochs.append({"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"], "train_loss": train_loss,
                       "train_error_running": train_error_running, "train_loss_eval": train_loss_eval,
                       "train_error": train_error, "test_loss": test_loss, "test_error": test_error,
                       "elapsed_s": time.perf_counter() - start})
        print(f"  {name:9s} epoch {epoch + 1:3d}/{config.epochs}  loss {train_loss:7.4f}  "
              f"train err {train_error:6.2f}%  test err {test_error:6.2f}%  ({epochs[-1]['elapsed_s']:.0f} s)",
              flush=True)
        if not math.isfinite(train_loss):
            print(f"  {name}: the training loss is not finite; stopping this network", flush=True)
            break
    return {
        "depth": model.depth, "plain": model.plain,
        "parameters": sum(p.numel() for p in model.parameters()),
        "epochs": epochs,
        "final_train_error": epochs[-1]["train_error"], "final_test_error": epochs[-1]["test_error"],
        "final_train_loss": epochs[-1]["train_loss"],
        "grad_norms_at_init": {"layers": list(grad_norms), "norms": list(grad_norms.values())},
        "train_time_s": time.perf_counter() - start,
    }


# Output --------------------------------------------------------------------------------------

def all_losses_finite(results: dict[str, dict[str, Any]]) -> bool:
    return all(math.isfinite(e[key]) for r in results.values() for e in r["epochs"]
               for key in ("train_loss", "train_loss_eval", "test_loss"))


def summary(results: dict[str, dict[str, Any]]) -> dict[str, bool]:
    """The paper's two claims, on the final training error (strict), and the ResNet one with ties allowed
    (on these digits both ResNets can reach 0%)."""
    train = {name: r["final_train_error"] for name, r in results.items()}
    return {"plain56_train_error_above_plain20": train["plain56"] > train["plain20"],
            "resnet56_train_error_below_resnet20": train["resnet56"] < train["resnet20"],
            "resnet56_train_error_not_above_resnet20": train["resnet56"] <= train["resnet20"]}


def machine_info(threads: int) -> dict[str, Any]:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": threads, "python": platform.python_version()}


def _json_safe(value: Any) -> Any:
    """NaN/inf -> null, so the file is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def write_json(path: Path, config: Config, data: Data, results: dict[str, dict[str, Any]], wall_s: float) -> None:
    import sklearn

    record = {
        "experiment": "degradation (He et al. 2016, Fig. 1/6) on sklearn digits",
        "config": {**asdict(config), "networks": list(NETWORKS),
                   "lr_schedule": "linear warm-up 0.01->0.1 over epoch 1, then 0.1, /10 at 50% and 75% of the epochs",
                   "train_error_measure": "eval mode over the whole training set after each epoch "
                                          "(train_error_running: train mode, running over the epoch)",
                   "train_size": len(data.x_train), "test_size": len(data.x_test),
                   "normalisation": {"mean": data.mean, "std": data.std}},
        "networks": results,
        "summary": summary(results),
        "all_losses_finite": all_losses_finite(results),
        "wall_time_s": wall_s,
        "versions": {"torch": torch.__version__, "fusedres": getattr(fusedres, "__version__", "unknown"),
                     "sklearn": sklearn.__version__},
        "machine": machine_info(config.threads),
    }
    path.write_text(json.dumps(_json_safe(record), indent=1, allow_nan=False) + "\n")


def plot(path: Path, results: dict[str, dict[str, Any]], config: Config) -> None:
    """Training error, test error (plain dashed, ResNet solid) and gradient norms at init (log y)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {20: "tab:orange", 56: "tab:red"}
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    for r in results.values():
        style = {"color": colours.get(r["depth"], "tab:blue"), "linestyle": "--" if r["plain"] else "-",
                 "label": f"{'plain' if r['plain'] else 'ResNet'}-{r['depth']}"}
        epochs = [e["epoch"] for e in r["epochs"]]
        axes[0].plot(epochs, [e["train_error"] for e in r["epochs"]], **style)
        axes[1].plot(epochs, [e["test_error"] for e in r["epochs"]], **style)
        norms = r["grad_norms_at_init"]["norms"]
        axes[2].plot(range(1, len(norms) + 1), norms, marker=".", **style)
    for ax, title, ylabel in ((axes[0], "training error (eval mode)", "error (%)"),
                              (axes[1], "test error", "error (%)")):
        ax.set(title=title, xlabel="epoch", ylabel=ylabel, ylim=(0, None))
    axes[2].set(title="conv weight gradient norm at init (one batch)", xlabel="conv layer (depth order)",
                ylabel="L2 norm of gradient", yscale="log")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"Degradation on 8x8 digits upsampled to {config.image_size}x{config.image_size} "
                 f"({config.epochs} epochs, seed {config.seed}{', quick' if config.quick else ''})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_summary(results: dict[str, dict[str, Any]], wall_s: float) -> None:
    print(f"\n{'network':10s} {'train err %':>11s} {'test err %':>10s} {'train loss':>10s}")
    for name, r in results.items():
        print(f"{name:10s} {r['final_train_error']:11.2f} {r['final_test_error']:10.2f} {r['final_train_loss']:10.4f}")
    s = summary(results)
    print(f"plain-56 ends above plain-20 in training error (degradation): {s['plain56_train_error_above_plain20']}")
    tie = " (a tie)" if results["resnet56"]["final_train_error"] == results["resnet20"]["final_train_error"] else ""
    print(f"ResNet-56 ends below ResNet-20 in training error:             {s['resnet56_train_error_below_resnet20']}"
          f"{tie}")
    print(f"wall time {wall_s:.1f} s")


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    torch.set_num_threads(config.threads)
    start = time.perf_counter()
    data = load_data(config)
    print(f"digits: {len(data.x_train)} train / {len(data.x_test)} test, {config.image_size}x{config.image_size}, "
          f"{config.epochs} epochs, seed {config.seed}, {config.threads} thread(s)", flush=True)
    results = {}
    for name in NETWORKS:
        results[name] = run_network(name, data, config)
    wall_s = time.perf_counter() - start
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "degradation.json", config, data, results, wall_s)
    plot(out_dir / "degradation.png", results, config)
    print_summary(results, wall_s)
    print(f"wrote {out_dir / 'degradation.png'} and {out_dir / 'degradation.json'}")
    if not all_losses_finite(results):
        print("error: a loss is not finite", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
