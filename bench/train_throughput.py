"""Training throughput: our loop (``jobs.train.train`` on ``make_loader``) against a tutorial-style DataLoader loop.

Same model and initial weights, same optimizer, same number of steps, same process, on generated
data shaped like MNIST (lenet_300_100, 1x28x28) and CIFAR (resnet18 with the small stem, 3x32x32).
Each model runs twice: plain tensors (baseline ``DataLoader(TensorDataset, shuffle=True)``) and with
the datasets' augmentation (baseline: torchvision's own MNIST/CIFAR10 ``__getitem__`` with
``RandomCrop`` [+ ``RandomHorizontalFlip``], ``ToTensor``, ``Normalize`` per sample). Runs on the CPU,
and on the GPU when there is one (there our loop also uses its defaults: bf16/fp16 autocast and
channels_last for conv nets; the baseline stays float32, as tutorials are).

    .venv/bin/python bench/train_throughput.py [--device cpu|cuda|all] [--repeat 3] [--batch-size 64] [--threads N]
        [--model lenet_300_100|resnet18|all]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, Subset, TensorDataset  # noqa: E402

from jobs.batches import Augment, ImageTensors  # noqa: E402
from jobs.config import ModelConfig, TrainConfig  # noqa: E402
from jobs.models import build_model  # noqa: E402
from jobs.train import make_loader, train  # noqa: E402

# name, model, shape, normalisation statistics, crop padding, flip, steps per run on (cpu, cuda)
CASES = [
    ("lenet_300_100 / MNIST-shaped", "lenet_300_100", (1, 28, 28), (0.1307,), (0.3081,), 2, False, (300, 2000)),
    ("resnet18 / CIFAR-shaped", "resnet18", (3, 32, 32), (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
     4, True, (4, 300)),
]


def tutorial_dataset(pixels: torch.Tensor, labels: torch.Tensor, mean, std, padding: int, flip: bool):
    """torchvision's MNIST or CIFAR10 dataset class over generated pixels, with the tutorial transforms."""
    from torchvision import datasets, transforms as T

    cls = datasets.MNIST if pixels.shape[1] == 1 else datasets.CIFAR10
    ds = cls.__new__(cls)  # skip the files: only __getitem__ and __len__ are used
    ds.data = pixels[:, 0] if cls is datasets.MNIST else pixels.permute(0, 2, 3, 1).numpy()
    ds.targets = labels if cls is datasets.MNIST else labels.tolist()
    ds.transform = T.Compose([T.RandomCrop(pixels.shape[-1], padding=padding),
                              *([T.RandomHorizontalFlip()] if flip else []), T.ToTensor(), T.Normalize(mean, std)])
    ds.target_transform = None
    return ds


def tutorial_loop(model: nn.Module, loader: DataLoader, device: torch.device) -> None:
    """The loop of the PyTorch tutorials: batches from a DataLoader, copied to the device, loss.item() per step."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    model.to(device).train()
    running = 0.0
    for inputs, targets in loader:
        inputs, targets = inputs.to(device), targets.to(device)
        optimizer.zero_grad()
        loss = loss_fn(model(inputs), targets)
        loss.backward()
        optimizer.step()
        running += loss.item()


def timed(fn, device: torch.device) -> float:
    """Seconds ``fn()`` takes, the GPU's queued work included."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def measure(case, device: torch.device, batch_size: int, repeat: int, augment: bool) -> tuple[float, float]:
    """Median samples/s of (ours, baseline) for one case, alternating the two loops."""
    title, model_name, shape, mean, std, padding, flip, steps = case
    n = batch_size * steps[device.type == "cuda"]
    g = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (n, *shape), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (n,), generator=g)
    x = pixels.float().div(255).sub(torch.tensor(mean).view(1, -1, 1, 1)).div(torch.tensor(std).view(1, -1, 1, 1))
    black = tuple((-torch.tensor(mean) / torch.tensor(std)).tolist())
    ours_data = ImageTensors(x, labels, Augment(padding, flip, black) if augment else None)
    theirs_data = tutorial_dataset(pixels, labels, mean, std, padding, flip) if augment else TensorDataset(x, labels)
    torch.manual_seed(0)
    initial = build_model(ModelConfig(name=model_name), shape, 10)
    cfg = TrainConfig(epochs=1, batch_size=batch_size, lr=0.05, momentum=0.9)
    ours_loader = make_loader(ours_data, batch_size, shuffle=True, device=device)  # data moves to the device here
    theirs_loader = DataLoader(theirs_data, batch_size=batch_size, shuffle=True)

    def ours(loader=ours_loader):
        train(copy.deepcopy(initial), loader, cfg, device)

    def theirs(loader=theirs_loader):
        tutorial_loop(copy.deepcopy(initial), loader, device)

    # Warm-up on two batches each (allocator, kernels, thread pools), untimed.
    ours(make_loader(Subset(ours_data, range(2 * batch_size)), batch_size, shuffle=True, device=device))
    theirs(DataLoader(Subset(theirs_data, range(2 * batch_size)), batch_size=batch_size, shuffle=True))
    rates = {"ours": [], "theirs": []}
    for _ in range(repeat):
        rates["ours"].append(n / timed(ours, device))
        rates["theirs"].append(n / timed(theirs, device))
    return statistics.median(rates["ours"]), statistics.median(rates["theirs"])


def main() -> int:
    """Print samples/s of both loops per device, case and augmentation, and their ratio."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda", "all"], default="all",
                        help="all: the CPU, and the GPU when there is one")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per loop (median reported)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--model", choices=["lenet_300_100", "resnet18", "all"], default="all")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = [torch.device("cpu")] if args.device in ("cpu", "all") else []
    if args.device in ("cuda", "all"):
        if torch.cuda.is_available():
            devices.append(torch.device("cuda"))
        else:
            print("cuda: no GPU here, skipped")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, batch size {args.batch_size}, "
          f"median of {args.repeat}")
    print("| device | model / data | augment | ours samples/s | tutorial DataLoader samples/s | ratio |")
    print("|---|---|---|---|---|---|")
    for device in devices:
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        for case in (c for c in CASES if args.model in ("all", c[1])):
            for augment in (False, True):
                ours, theirs = measure(case, device, args.batch_size, args.repeat, augment)
                print(f"| {name} | {case[0]} | {'yes' if augment else 'no'} | {ours:,.0f} | {theirs:,.0f} | "
                      f"{ours / theirs:.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
