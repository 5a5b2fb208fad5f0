"""Dataset loading: offline datasets directly, the others from files written in their on-disk format.

Nothing here touches the network: an autouse fixture makes every connection attempt fail.
"""
from __future__ import annotations

import hashlib
import pickle
import re
import socket
import struct

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from jobs.config import DatasetConfig
from jobs.data import DATASETS, DataBundle, DatasetMissingError, download, load_dataset
from runner.datacmd import data

OFFLINE = ["digits", "synthetic"]


def _tensors(ds) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack a whole dataset into (inputs, labels)."""
    xs, ys = zip(*(ds[i] for i in range(len(ds))))
    return torch.stack(xs), torch.as_tensor([int(y) for y in ys])


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Fail any DNS lookup or connection, so a test that would download fails fast instead."""

    def refuse(*args, **kwargs):
        raise OSError("network disabled in tests")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


def test_registry_names():
    assert set(DATASETS) == {"digits", "synthetic", "mnist", "fashion_mnist", "cifar10", "cifar100", "imagefolder"}


def test_unknown_dataset():
    with pytest.raises(ValueError, match="known: cifar10, cifar100, digits"):
        load_dataset(DatasetConfig(name="nope"))


@pytest.mark.parametrize("name", OFFLINE)
def test_offline_shapes_and_labels(name):
    b = load_dataset(DatasetConfig(name=name))
    assert isinstance(b, DataBundle)
    assert b.input_shape == (1, 8, 8) and b.num_classes == 10
    for ds in (b.train, b.test):
        x, y = _tensors(ds)
        assert x.dtype == torch.float32 and x.shape[1:] == (1, 8, 8)
        assert y.dtype == torch.long
        assert set(y.tolist()) == set(range(10))
    assert len(b.train) > len(b.test) > 0


def test_digits_split_and_standardisation():
    b = load_dataset(DatasetConfig(name="digits"))
    assert len(b.train) + len(b.test) == 1797 and len(b.test) == 450
    x, _ = _tensors(b.train)
    assert abs(x.mean().item()) < 1e-4 and abs(x.std().item() - 1) < 1e-4


def test_synthetic_sizes():
    b = load_dataset(DatasetConfig(name="synthetic"))
    assert (len(b.train), len(b.test)) == (600, 200)
    _, y = _tensors(b.train)
    assert torch.bincount(y).tolist() == [60] * 10


@pytest.mark.parametrize("name", OFFLINE)
def test_offline_deterministic_and_seed_independent(name):
    torch.manual_seed(1)
    a = load_dataset(DatasetConfig(name=name))
    torch.manual_seed(2)
    b = load_dataset(DatasetConfig(name=name))
    for split in ("train", "test"):
        xa, ya = _tensors(getattr(a, split))
        xb, yb = _tensors(getattr(b, split))
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


@pytest.mark.parametrize("name", OFFLINE)
def test_train_size_keeps_prefix(name):
    full = load_dataset(DatasetConfig(name=name))
    small = load_dataset(DatasetConfig(name=name, train_size=50))
    assert len(small.train) == 50 and len(small.test) == len(full.test)
    xs, ys = _tensors(small.train)
    xf, yf = _tensors(full.train)
    assert torch.equal(xs, xf[:50]) and torch.equal(ys, yf[:50])


def test_train_size_too_large():
    with pytest.raises(ValueError, match="only 600 training samples"):
        load_dataset(DatasetConfig(name="synthetic", train_size=601))


def test_synthetic_is_learnable_but_not_trivial():
    b = load_dataset(DatasetConfig(name="synthetic"))
    x, y = _tensors(b.train)
    xt, yt = _tensors(b.test)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 100), torch.nn.ReLU(),
                                torch.nn.Linear(100, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(2):
        for idx in torch.randperm(len(x)).split(64):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    with torch.no_grad():
        acc = (model(xt).argmax(1) == yt).float().mean().item()
    assert 0.4 < acc < 1.0


# --- torchvision-backed datasets, from files written in torchvision's on-disk format ---------


def _write_idx(path, data: np.ndarray) -> None:
    """Write an uncompressed IDX file: big-endian magic (0, 0, type 0x08=uint8, ndim), dims, data."""
    header = struct.pack(">I", 0x0800 | data.ndim) + struct.pack(f">{data.ndim}I", *data.shape)
    path.write_bytes(header + data.astype(np.uint8).tobytes())


def _make_mnist(root, n_train=20, n_test=10, folder="MNIST"):
    """Write MNIST's four raw files; torchvision needs all four present for either split."""
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    out = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) * 3 % 10).astype(np.uint8)
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
        out[prefix] = (images, labels)
    return out


def test_mnist_from_disk(tmp_path):
    written = _make_mnist(tmp_path)
    b = load_dataset(DatasetConfig(name="mnist", root=str(tmp_path), download=False))
    assert b.input_shape == (1, 28, 28) and b.num_classes == 10
    assert (len(b.train), len(b.test)) == (20, 10)
    for ds, (images, labels) in ((b.train, written["train"]), (b.test, written["t10k"])):
        x, y = _tensors(ds)
        assert x.shape == (len(images), 1, 28, 28) and x.dtype == torch.float32
        assert y.tolist() == labels.tolist()
        pixels = ((x * 0.3081 + 0.1307) * 255).round().to(torch.uint8)
        assert torch.equal(pixels[:, 0], torch.from_numpy(images))


def test_mnist_train_size(tmp_path):
    _make_mnist(tmp_path)
    b = load_dataset(DatasetConfig(name="mnist", root=str(tmp_path), train_size=5))
    assert len(b.train) == 5 and len(b.test) == 10


def _md5(path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _make_cifar10(root, monkeypatch, per_batch=4, n_test=6):
    """Write cifar-10-batches-py and point torchvision's md5 table at the written files."""
    import torchvision

    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    # The real files are Python 2 pickles; torchvision loads them with encoding="latin1",
    # which turns their keys into str. A Python 3 pickle must therefore use str keys too
    # (b"data" would stay bytes and torchvision's entry["data"] would miss it).
    batches = {}
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        n = n_test if name == "test_batch" else per_batch
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)  # rows are R plane, G, B
        labels = [(i + j) % 10 for j in range(n)]
        with open(folder / name, "wb") as f:
            pickle.dump({"batch_label": name, "data": data, "labels": labels}, f)
        batches[name] = (data, labels)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{k}" for k in range(10)], "num_vis": 3072}, f)

    cls = torchvision.datasets.CIFAR10
    monkeypatch.setattr(cls, "train_list", [[f"data_batch_{k}", _md5(folder / f"data_batch_{k}")]
                                            for k in range(1, 6)])
    monkeypatch.setattr(cls, "test_list", [["test_batch", _md5(folder / "test_batch")]])
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": _md5(folder / "batches.meta")})
    return batches


def test_cifar10_from_disk(tmp_path, monkeypatch):
    batches = _make_cifar10(tmp_path, monkeypatch)
    b = load_dataset(DatasetConfig(name="cifar10", root=str(tmp_path)))
    assert b.input_shape == (3, 32, 32) and b.num_classes == 10
    assert (len(b.train), len(b.test)) == (20, 6)
    x, y = _tensors(b.train)
    assert x.shape == (20, 3, 32, 32) and x.dtype == torch.float32
    expected = [lab for k in range(1, 6) for lab in batches[f"data_batch_{k}"][1]]
    assert y.tolist() == expected
    xt, yt = _tensors(b.test)
    assert xt.shape == (6, 3, 32, 32) and yt.tolist() == batches["test_batch"][1]
    # Undo Normalize and ToTensor: the first test image must come back channel-for-channel.
    mean = torch.tensor((0.4914, 0.4822, 0.4465)).view(3, 1, 1)
    std = torch.tensor((0.2470, 0.2435, 0.2616)).view(3, 1, 1)
    pixels = ((xt[0] * std + mean) * 255).round().to(torch.uint8)
    assert torch.equal(pixels, torch.from_numpy(batches["test_batch"][0][0].reshape(3, 32, 32)))


def test_cifar10_wrong_md5_is_missing(tmp_path, monkeypatch):
    _make_cifar10(tmp_path, monkeypatch)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"truncated")
    with pytest.raises(DatasetMissingError, match="cifar10"):
        load_dataset(DatasetConfig(name="cifar10", root=str(tmp_path)))


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist", "cifar10", "cifar100"])
def test_missing_dataset_explains_what_to_do(tmp_path, name):
    root = tmp_path / "nowhere"
    with pytest.raises(DatasetMissingError) as info:
        load_dataset(DatasetConfig(name=name, root=str(root), download=False))
    message = str(info.value)
    assert str(root) in message and "dataset.download" in message
    assert isinstance(info.value, RuntimeError)


def test_missing_dataset_relative_root_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DatasetMissingError, match=re.escape(str(tmp_path / "data"))):
        load_dataset(DatasetConfig(name="mnist", root="data"))


def test_partial_mnist_is_missing(tmp_path):
    _make_mnist(tmp_path)
    (tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DatasetMissingError):
        load_dataset(DatasetConfig(name="mnist", root=str(tmp_path)))


def test_corrupt_file_error_is_not_rewritten(tmp_path):
    _make_mnist(tmp_path)
    # Present but malformed (float32 instead of uint8): torchvision's own error must surface.
    path = tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte"
    path.write_bytes(struct.pack(">4I", 0x0D03, 1, 1, 1) + b"\0" * 4)
    with pytest.raises(TypeError, match="uint8"):
        load_dataset(DatasetConfig(name="mnist", root=str(tmp_path)))


def test_other_runtime_errors_are_not_rewritten(tmp_path, monkeypatch):
    import torchvision

    def boom(self, *args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(torchvision.datasets.MNIST, "__init__", boom)
    with pytest.raises(RuntimeError, match="disk on fire") as info:
        load_dataset(DatasetConfig(name="mnist", root=str(tmp_path)))
    assert not isinstance(info.value, DatasetMissingError)


# --- fashion_mnist, cifar100, imagefolder ---------------------------------------------------


def test_fashion_mnist_from_disk(tmp_path):
    written = _make_mnist(tmp_path, folder="FashionMNIST")
    b = load_dataset(DatasetConfig(name="fashion_mnist", root=str(tmp_path)))
    assert b.input_shape == (1, 28, 28) and b.num_classes == 10
    x, y = _tensors(b.test)
    assert y.tolist() == written["t10k"][1].tolist()
    pixels = ((x * 0.3530 + 0.2860) * 255).round().to(torch.uint8)
    assert torch.equal(pixels[:, 0], torch.from_numpy(written["t10k"][0]))


def _make_cifar100(root, monkeypatch, n_train=12, n_test=6):
    """Write cifar-100-python/{train,test,meta} (str keys, fine_labels) with matching md5s."""
    import torchvision

    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    out = {}
    for name, n in (("train", n_train), ("test", n_test)):
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        fine = [(7 * j + 93) % 100 for j in range(n)]
        with open(folder / name, "wb") as f:
            pickle.dump({"filenames": [f"{j}.png" for j in range(n)], "batch_label": name, "data": data,
                         "fine_labels": fine, "coarse_labels": [lab // 5 for lab in fine]}, f)
        out[name] = (data, fine)
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"fine{k}" for k in range(100)],
                     "coarse_label_names": [f"coarse{k}" for k in range(20)]}, f)
    cls = torchvision.datasets.CIFAR100
    monkeypatch.setattr(cls, "train_list", [["train", _md5(folder / "train")]])
    monkeypatch.setattr(cls, "test_list", [["test", _md5(folder / "test")]])
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": _md5(folder / "meta")})
    return out


def test_cifar100_from_disk(tmp_path, monkeypatch):
    written = _make_cifar100(tmp_path, monkeypatch)
    b = load_dataset(DatasetConfig(name="cifar100", root=str(tmp_path)))
    assert b.input_shape == (3, 32, 32) and b.num_classes == 100
    assert (len(b.train), len(b.test)) == (12, 6)
    x, y = _tensors(b.train)
    assert x.shape == (12, 3, 32, 32) and y.tolist() == written["train"][1] and max(y.tolist()) > 90
    mean = torch.tensor((0.5071, 0.4865, 0.4409)).view(3, 1, 1)
    std = torch.tensor((0.2673, 0.2564, 0.2762)).view(3, 1, 1)
    xt, _ = _tensors(b.test)
    pixels = ((xt[0] * std + mean) * 255).round().to(torch.uint8)
    assert torch.equal(pixels, torch.from_numpy(written["test"][0][0].reshape(3, 32, 32)))


def _make_imagefolder(root, classes=("ants", "bees"), per_class=3, size=(40, 30)):
    """Write small RGB PNGs as <root>/{train,val}/<class>/*.png (an ImageFolder tree)."""
    from PIL import Image

    rng = np.random.default_rng(2)
    for split in ("train", "val"):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for k in range(per_class):
                pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / c / f"{k}.png")


def test_imagefolder_from_disk(tmp_path):
    _make_imagefolder(tmp_path)
    b = load_dataset(DatasetConfig(name="imagefolder", root=str(tmp_path)))
    assert b.input_shape == (3, 224, 224) and b.num_classes == 2
    assert (len(b.train), len(b.test)) == (6, 6)
    x, y = _tensors(b.train)
    assert x.shape == (6, 3, 224, 224) and x.dtype == torch.float32
    assert sorted(y.tolist()) == [0, 0, 0, 1, 1, 1]
    _, yt = _tensors(b.test)
    assert yt.tolist() == [0, 0, 0, 1, 1, 1]  # val keeps ImageFolder's order
    # Train order is a fixed shuffle, so a train_size prefix is not all one class.
    small = load_dataset(DatasetConfig(name="imagefolder", root=str(tmp_path), train_size=3))
    assert len(set(_tensors(small.train)[1].tolist())) == 2


def test_imagefolder_augment_switch(tmp_path):
    _make_imagefolder(tmp_path)
    torch.manual_seed(0)
    for augment in (False, True):
        b = load_dataset(DatasetConfig(name="imagefolder", root=str(tmp_path), augment=augment))
        reads = [b.train[0][0] for _ in range(4)]
        assert all(r.shape == (3, 224, 224) for r in reads)
        assert any(not torch.equal(reads[0], r) for r in reads[1:]) == augment
        assert torch.equal(b.test[0][0], b.test[0][0])  # val is never augmented


def test_imagefolder_missing_explains_layout(tmp_path):
    with pytest.raises(DatasetMissingError) as info:
        load_dataset(DatasetConfig(name="imagefolder", root=str(tmp_path / "hymenoptera_data")))
    message = str(info.value)
    assert str(tmp_path / "hymenoptera_data") in message and "<root>/train/<class>/*.jpg" in message
    assert "<root>/val/<class>/*.jpg" in message and "no download" in message


def test_imagefolder_missing_val_and_empty_class(tmp_path):
    _make_imagefolder(tmp_path)
    for f in (tmp_path / "val" / "bees").iterdir():
        f.unlink()
    with pytest.raises(DatasetMissingError, match="val"):
        load_dataset(DatasetConfig(name="imagefolder", root=str(tmp_path)))


def test_imagefolder_class_mismatch(tmp_path):
    _make_imagefolder(tmp_path)
    (tmp_path / "val" / "bees").rename(tmp_path / "val" / "wasps")
    with pytest.raises(ValueError, match="different class folders.*bees.*wasps"):
        load_dataset(DatasetConfig(name="imagefolder", root=str(tmp_path)))


# --- augmentation and normalisation switches ------------------------------------------------


def test_cifar10_augment_switch(tmp_path, monkeypatch):
    _make_cifar10(tmp_path, monkeypatch)
    torch.manual_seed(0)
    reads = {}
    for augment in (False, True):
        b = load_dataset(DatasetConfig(name="cifar10", root=str(tmp_path), augment=augment))
        reads[augment] = [b.train[3][0] for _ in range(5)]
        test_reads = [b.test[0][0] for _ in range(3)]
        assert all(torch.equal(test_reads[0], r) for r in test_reads)  # test split: never augmented
    assert all(torch.equal(reads[False][0], r) for r in reads[False])
    assert any(not torch.equal(reads[True][0], r) for r in reads[True][1:])


def test_normalize_false_gives_unit_range(tmp_path, monkeypatch):
    _make_cifar10(tmp_path, monkeypatch)
    b = load_dataset(DatasetConfig(name="cifar10", root=str(tmp_path), normalize=False))
    x, _ = _tensors(b.test)
    assert 0 <= x.min() and x.max() <= 1 and x.max() > 0.9
    xt, _ = _tensors(load_dataset(DatasetConfig(name="digits", normalize=False)).train)
    assert xt.min() == 0 and xt.max() == 1


# --- every registered dataset, from files written in its format ------------------------------


WRITERS = {
    "digits": lambda root, mp: None,
    "synthetic": lambda root, mp: None,
    "mnist": lambda root, mp: _make_mnist(root),
    "fashion_mnist": lambda root, mp: _make_mnist(root, folder="FashionMNIST"),
    "cifar10": _make_cifar10,
    "cifar100": _make_cifar100,
    "imagefolder": lambda root, mp: _make_imagefolder(root),
}


def test_every_dataset_has_a_writer():
    assert set(WRITERS) == set(DATASETS), "add an on-disk writer for the new dataset to WRITERS"


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_every_dataset_loads_with_every_switch(name, tmp_path, monkeypatch):
    WRITERS[name](tmp_path, monkeypatch)
    for augment in (False, True):
        for normalize in (False, True):
            b = load_dataset(DatasetConfig(name=name, root=str(tmp_path), augment=augment, normalize=normalize))
            for ds in (b.train, b.test):
                x, y = ds[len(ds) - 1]
                assert x.dtype == torch.float32 and tuple(x.shape) == b.input_shape
                assert 0 <= int(y) < b.num_classes
            x0 = b.test[0][0]
            assert torch.equal(x0, b.test[0][0])
            if not normalize and name != "synthetic":  # synthetic is Gaussian, not pixels
                assert 0 <= x0.min() and x0.max() <= 1


# --- `sweep data download`, offline -------------------------------------------------------------


def test_download_command_nothing_to_download(tmp_path):
    result = CliRunner().invoke(data, ["download", "digits", "synthetic", "--root", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "digits: nothing to download" in result.output and "synthetic: nothing to download" in result.output


def test_download_command_refuses_imagefolder(tmp_path):
    result = CliRunner().invoke(data, ["download", "imagefolder", "--root", str(tmp_path)])
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1 and "imagefolder has no download" in result.stderr


def test_download_command_unknown_name_fetches_nothing(tmp_path):
    result = CliRunner().invoke(data, ["download", "digits", "mnits", "--root", str(tmp_path)])
    assert result.exit_code == 2 and "unknown dataset(s) mnits" in result.stderr
    assert "digits:" not in result.output


def test_download_command_with_files_present_is_offline(tmp_path, monkeypatch):
    # torchvision's download() returns at once when the files are there (MNIST: present;
    # CIFAR: md5s match), so this runs the real command with the network switched off.
    _make_mnist(tmp_path)
    _make_cifar10(tmp_path, monkeypatch)
    result = CliRunner().invoke(data, ["download", "mnist", "cifar10", "--root", str(tmp_path)])
    assert result.exit_code == 0, result.output + result.stderr
    assert f"mnist: {tmp_path / 'MNIST'}" in result.output
    assert f"cifar10: {tmp_path / 'cifar-10-batches-py'}" in result.output
    # ...and what it fetched is what a compute node then reads with dataset.download false.
    assert len(load_dataset(DatasetConfig(name="mnist", root=str(tmp_path))).train) == 20


@pytest.mark.parametrize("name", ["mnist", "cifar100"])
def test_download_command_without_network_fails_in_one_line(tmp_path, name):
    result = CliRunner().invoke(data, ["download", name, "--root", str(tmp_path)])
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith(f"error: could not download {name} into {tmp_path}")
    assert "network disabled in tests" in result.stderr


def test_download_function_rejects_unknown_and_imagefolder(tmp_path):
    with pytest.raises(ValueError, match="known: cifar10"):
        download("nope", str(tmp_path))
    with pytest.raises(ValueError, match="no download"):
        download("imagefolder", str(tmp_path))


def test_missing_torchvision_dataset_names_the_download_command(tmp_path):
    with pytest.raises(DatasetMissingError, match=re.escape(f"sweep data download cifar100 --root {tmp_path}")):
        load_dataset(DatasetConfig(name="cifar100", root=str(tmp_path)))
