"""The training loop: in-memory batches on the device, augmentation from the per-epoch generator, amp,
channels_last and torch.compile, all exercised on the CPU (the GPU runs the same code)."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn
from torch.nn.utils import prune
from torch.utils.data import DataLoader, Subset, TensorDataset

from jobs.batches import Augment, ImageTensors, TensorBatches, apply, draw
from jobs.config import DatasetConfig, TrainConfig
from jobs.data import load_dataset
from jobs.measure import evaluate
from jobs.models import build_model
from jobs.config import ModelConfig
from jobs.train import autocast_dtype, make_loader, memory_format, train
from test_data import _make_cifar10, _make_imagefolder

CPU = torch.device("cpu")
CIFAR_AUG = Augment(padding=4, flip=True, fill=(-1.0, -2.0, -3.0))


def _images(n=40, c=3, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, size, size, generator=g), torch.arange(n) % 10


def _epoch(loader):
    return [(x.clone(), y.clone()) for x, y in loader]


def _small_cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                         nn.Linear(16, 10))


def test_every_sample_once_per_epoch_and_short_last_batch():
    x = torch.arange(103, dtype=torch.float32).view(-1, 1, 1, 1)
    loader = make_loader(TensorDataset(x, torch.arange(103)), 16, shuffle=True, seed=3)
    assert isinstance(loader, TensorBatches) and len(loader) == 7
    for _ in range(2):
        batches = _epoch(loader)
        assert [len(y) for _, y in batches] == [16] * 6 + [7]
        labels = torch.cat([y for _, y in batches])
        assert sorted(labels.tolist()) == list(range(103)) and labels.tolist() != list(range(103))
        assert all(torch.equal(xb.flatten(), yb.float()) for xb, yb in batches)  # inputs travel with labels


def test_same_batches_as_the_dataloader_it_replaces():
    # Without augmentation, trials finished before this loop existed keep their numbers.
    x, y = _images(70)
    ours = make_loader(TensorDataset(x, y), 16, shuffle=True, seed=5)
    theirs = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(5))
    for epoch in range(3):
        if epoch == 2:  # reseeded as train() does, after two epochs without
            ours.generator.manual_seed(11)
            theirs.generator.manual_seed(11)
        for (a, la), (b, lb) in zip(_epoch(ours), _epoch(theirs), strict=True):
            assert torch.equal(a, b) and torch.equal(la, lb)


def test_seed_fixes_order_and_augmentation():
    x, _ = _images()
    ds = ImageTensors(x, torch.arange(len(x)), CIFAR_AUG)  # labels name the samples

    def run(seed):
        loader = make_loader(ds, 8, shuffle=True, seed=0)
        loader.generator.manual_seed(seed)
        xs, ys = zip(*_epoch(loader))
        xs, ys = torch.cat(xs), torch.cat(ys)
        return xs[ys.argsort()], ys  # augmented samples in sample order, and the order

    a, b = run(1), run(1)
    torch.manual_seed(123)  # the global RNG plays no part
    c = run(1)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and torch.equal(a[0], c[0])
    other = run(2)
    assert not torch.equal(a[1], other[1])
    changed = [not torch.equal(p, q) for p, q in zip(a[0], other[0])]
    assert sum(changed) > len(x) // 2  # the same sample is cropped/flipped differently
    assert a[0].shape == x.shape and not torch.equal(a[0], x)


def test_batched_augmentation_is_torchvision_crop_then_flip():
    from torchvision.transforms import functional as F

    x, _ = _images(6)
    offsets, flips = draw(CIFAR_AUG, 6, torch.Generator().manual_seed(0))
    flips[:3] = torch.tensor([True, False, True])  # both cases present
    out = apply(x, CIFAR_AUG, offsets, flips)
    for i in range(6):
        padded = torch.stack([F.pad(x[i, c:c + 1], [4], fill=CIFAR_AUG.fill[c]) for c in range(3)])[:, 0]
        expected = F.crop(padded, int(offsets[i, 0]), int(offsets[i, 1]), 32, 32)
        expected = F.hflip(expected) if flips[i] else expected
        assert torch.equal(out[i], expected), i
    assert ((offsets >= 0) & (offsets <= 8)).all() and len(set(offsets.flatten().tolist())) > 3


def test_cifar_split_in_memory_matches_torchvision_and_test_is_never_augmented(tmp_path, monkeypatch):
    from torchvision import datasets, transforms as T

    _make_cifar10(tmp_path, monkeypatch)
    b = load_dataset(DatasetConfig(name="cifar10", root=str(tmp_path), augment=True, train_size=12))
    assert isinstance(b.train, Subset) and b.train.dataset.augment.flip and b.test.augment is None
    assert b.train.dataset.augment.padding == 4
    # Normalised once up front, to the same floats as the ToTensor + Normalize pipeline per sample.
    reference = datasets.CIFAR10(str(tmp_path), train=False, transform=T.Compose(
        [T.ToTensor(), T.Normalize((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))]))
    assert all(torch.equal(b.test.tensors[0][i], reference[i][0]) for i in range(len(reference)))
    # The padding is black in normalised units, as torchvision padded before normalising.
    assert b.train.dataset.augment.fill == pytest.approx([-0.4914 / 0.2470, -0.4822 / 0.2435, -0.4465 / 0.2616])
    test = _epoch(make_loader(b.test, 4, shuffle=False))
    assert torch.equal(torch.cat([x for x, _ in test]), b.test.tensors[0])
    train_loader = make_loader(b.train, 4, shuffle=True, seed=0)
    assert isinstance(train_loader, TensorBatches) and len(train_loader.labels) == 12
    assert train_loader.augment is not None


def test_imagefolder_keeps_a_dataloader_with_workers(tmp_path):
    _make_imagefolder(tmp_path)
    b = load_dataset(DatasetConfig(name="imagefolder", root=str(tmp_path)))
    loader = make_loader(b.train, 2, shuffle=True, seed=0, workers=0)
    assert isinstance(loader, DataLoader) and loader.num_workers == 0
    assert sorted(torch.cat([y for _, y in loader]).tolist()) == [0, 0, 0, 1, 1, 1]
    threads = torch.get_num_threads()
    assert make_loader(b.test, 2, shuffle=False).num_workers == max(0, threads - 1)


def test_training_on_the_batcher_learns_digits(one_thread):
    data = load_dataset(DatasetConfig(name="digits"))
    torch.manual_seed(0)
    model = build_model(ModelConfig(), data.input_shape, data.num_classes)
    loader = make_loader(data.train, 64, shuffle=True, seed=0, device=CPU)
    train(model, loader, TrainConfig(epochs=2), CPU, epoch_seed=lambda e: 100 + e)
    assert evaluate(model, make_loader(data.test, 256, shuffle=False, device=CPU), CPU)["accuracy"] > 0.85


def test_resumed_epoch_sees_the_same_augmented_batches(one_thread):
    x, y = _images(48)
    cfg = TrainConfig(epochs=2, batch_size=16)
    saved = {}

    def run(start_epoch=0, model=None, optimizer_state=None):
        model = model or _small_cnn()
        loader = make_loader(ImageTensors(x, y, CIFAR_AUG), 16, shuffle=True, seed=0)
        torch.manual_seed(99 + start_epoch)  # a resumed process's global RNG is elsewhere
        train(model, loader, cfg, CPU, start_epoch=start_epoch, optimizer_state=optimizer_state,
              epoch_seed=lambda e: 7 + e,
              on_epoch=lambda e, loss, opt, s: saved.setdefault(e, (
                  copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()))))
        return model

    whole = run()
    first_state, optimizer_state = saved[0]
    resumed = _small_cnn()
    resumed.load_state_dict(first_state)
    resumed = run(1, resumed, optimizer_state)
    for (k, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k


def test_amp_dtype_follows_the_device(monkeypatch):
    gpu = torch.device("cuda")
    assert autocast_dtype(TrainConfig(), CPU) is None
    assert autocast_dtype(TrainConfig(amp="none"), gpu) is None
    assert autocast_dtype(TrainConfig(amp="bf16"), CPU) is torch.bfloat16
    for supported, dtype in ((True, torch.bfloat16), (False, torch.float16)):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: supported)
        assert autocast_dtype(TrainConfig(), gpu) is dtype
    cnn, mlp = _small_cnn(), nn.Sequential(nn.Flatten(), nn.Linear(3, 2))
    assert memory_format(TrainConfig(), cnn, gpu) == torch.channels_last
    assert memory_format(TrainConfig(), mlp, gpu) == torch.contiguous_format
    assert memory_format(TrainConfig(), cnn, CPU) == torch.contiguous_format
    assert memory_format(TrainConfig(channels_last="never"), cnn, gpu) == torch.contiguous_format


def _pruned_cnn():
    model = _small_cnn()
    prune.l1_unstructured(model[0], "weight", 0.5)
    prune.l1_unstructured(model[4], "weight", 0.5)
    return model


def _record_inputs(model):
    seen = []
    model[0].register_forward_hook(lambda m, args, out: seen.append(
        (out.dtype, args[0].is_contiguous(memory_format=torch.channels_last))))
    return seen


@pytest.mark.parametrize("amp,dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_amp_and_channels_last_train_pruned_models_on_cpu(one_thread, amp, dtype):
    x, y = _images(32)
    reference = _pruned_cnn()
    train(reference, make_loader(TensorDataset(x, y), 16, shuffle=True), TrainConfig(epochs=1), CPU)
    model = _pruned_cnn()
    seen = _record_inputs(model)
    states = []
    train(model, make_loader(TensorDataset(x, y), 16, shuffle=True), TrainConfig(epochs=1, amp=amp,
          channels_last="always"), CPU, on_epoch=lambda e, loss, opt, s: states.append(opt.state_dict()))
    assert seen == [(dtype, True)] * 2  # autocast and channels-last inputs reached the conv
    assert ("grad_scaler" in states[0]) == (amp == "fp16")  # the loss scale is checkpointed with fp16
    for m in (model[0], model[4]):
        assert torch.count_nonzero(m.weight[m.weight_mask == 0]) == 0
        assert m.weight_orig.is_contiguous()  # the model leaves in the format it came in
    # Trained, and close to the float32 contiguous run (low precision, not a different computation).
    assert not torch.equal(model[4].weight_orig, _pruned_cnn()[4].weight_orig)
    torch.testing.assert_close(model[4].weight_orig, reference[4].weight_orig, atol=2e-2, rtol=0)


def test_fake_quantized_models_train_in_float32(one_thread):
    from torch.ao.quantization import get_default_qat_qconfig_mapping
    from torch.ao.quantization.quantize_fx import prepare_qat_fx

    x, y = _images(16)
    prepared = prepare_qat_fx(_small_cnn().train(), get_default_qat_qconfig_mapping("x86"), (x[:1],))
    dtypes = []
    prepared.register_forward_hook(lambda m, args, out: dtypes.append(out.dtype))
    train(prepared, make_loader(TensorDataset(x, y), 8, shuffle=True),
          TrainConfig(epochs=1, amp="bf16", channels_last="always"), CPU)
    assert dtypes == [torch.float32] * 2


@pytest.mark.slow
def test_compile_trains_like_eager_and_keeps_masks_across_levels(one_thread):
    x, y = _images(16)
    cfg = TrainConfig(epochs=1, lr=0.1)
    results = []
    for compiled in (False, True):
        model = _small_cnn()
        for level in range(2):  # pruning between levels adds hooks after the first compilation
            prune.l1_unstructured(model[0], "weight", 0.5)
            train(model, make_loader(TensorDataset(x, y), 8, shuffle=True, seed=level),
                  dataclasses.replace(cfg, compile=compiled), CPU)
        assert torch.count_nonzero(model[0].weight_orig * model[0].weight_mask) == 4 * 3 * 9 // 4
        results.append(model.state_dict())
    for key, value in results[0].items():
        torch.testing.assert_close(results[1][key], value, atol=1e-5, rtol=1e-4, msg=key)
