"""Data layer: sources (sample, torchvision CIFAR, ImageFolder), cache, statistics, loader."""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import tarfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors import safe_open
from torchvision import datasets

from surgeon.data import DATA_SOURCES, ImageData, Loader, load_data, sources
from surgeon.data import loader as loader_mod
from surgeon.errors import DataError

CIFAR10_CLASSES = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
]


@pytest.fixture(autouse=True)
def _no_home_cache(tmp_path, monkeypatch):
    """Never touch ~/.cache: the default cache dir points into the test's tmp_path."""
    monkeypatch.setenv("SURGEON_CACHE", str(tmp_path / "default-cache"))


@pytest.fixture(scope="module")
def sample_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("sample-cache")


@pytest.fixture(scope="module")
def sample(sample_cache) -> ImageData:
    return load_data("sample", cache_dir=sample_cache)


def forbid(monkeypatch, name: str) -> None:
    """Make sources.<name> fail, to prove a load is served from the cache."""

    def boom(*args, **kwargs):
        raise AssertionError(f"{name} called on a cache hit")

    monkeypatch.setattr(sources, name, boom)


# --- the embedded sample ---------------------------------------------------------------------


def test_sample_shapes_and_balance(sample):
    assert sample.source == "sample"
    assert sample.classes == CIFAR10_CLASSES and sample.num_classes == 10
    assert sample.train_x.shape == (5000, 3, 32, 32) and sample.test_x.shape == (1000, 3, 32, 32)
    assert sample.train_x.dtype == torch.uint8 and sample.train_x.is_contiguous()
    assert sample.train_y.dtype == torch.int64 and sample.test_y.dtype == torch.int64
    assert sample.train_y.bincount().tolist() == [500] * 10
    assert sample.test_y.bincount().tolist() == [100] * 10
    assert len(sample.mean) == len(sample.std) == 3
    assert all(0.3 < m < 0.6 for m in sample.mean) and all(0.15 < s < 0.35 for s in sample.std)
    assert "train=5000" in repr(sample)


def test_sample_tar_provenance():
    """The first 500 train / 100 test files by name per class, sorted, reproducible headers."""
    with tarfile.open(sources.SAMPLE_TAR, "r:gz") as tar:
        members = tar.getmembers()
    names = [m.name for m in members]
    assert names == sorted(names) and len(names) == 6000
    assert len({(m.mtime, m.uid, m.gid, m.uname) for m in members}) == 1
    for split, count in (("train", 500), ("test", 100)):
        for cls in CIFAR10_CLASSES:
            got = [n.rsplit("/", 1)[1] for n in names if n.startswith(f"{split}/{cls}/")]
            assert got == [f"{i:04d}.jpg" for i in range(count)]


def test_sample_cache_hit_does_not_decode(sample, sample_cache, monkeypatch):
    forbid(monkeypatch, "decode_image")
    forbid(monkeypatch, "decode_sample")
    again = load_data("sample", cache_dir=sample_cache)
    for name in ("train_x", "train_y", "test_x", "test_y"):
        assert torch.equal(getattr(again, name), getattr(sample, name))
    assert again.classes == sample.classes
    assert again.mean == pytest.approx(sample.mean) and again.std == pytest.approx(sample.std)
    files = os.listdir(sample_cache)
    assert files == ["sample.safetensors"]  # no temp files left behind
    with safe_open(str(sample_cache / files[0]), framework="pt") as f:
        assert set(f.keys()) == {"train_x", "train_y", "test_x", "test_y"}
        assert "fingerprint" in f.metadata()["surgeon"]


def test_limits_are_balanced_and_deterministic(sample, sample_cache):
    a = load_data("sample", cache_dir=sample_cache, limit_train=105, limit_test=20)
    b = load_data("sample", cache_dir=sample_cache, limit_train=105, limit_test=20)
    assert len(a.train_y) == 105 and len(a.test_y) == 20
    assert sorted(a.train_y.bincount().tolist()) == [10] * 5 + [11] * 5
    assert a.test_y.bincount().tolist() == [2] * 10
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.train_y, b.train_y)
    # statistics follow the kept train split
    assert a.mean == pytest.approx(sources.channel_stats(a.train_x)[0])
    # the first samples of each class are kept, in dataset order
    keep = sources.balanced_subset(sample.train_y, 105)
    assert torch.equal(keep, torch.sort(keep).values)
    assert torch.equal(a.train_x, sample.train_x[keep])
    with pytest.raises(DataError):
        load_data("sample", cache_dir=sample_cache, limit_train=0)


def test_default_cache_dir_from_env(tmp_path):
    make_folder(tmp_path / "imgs", per_split={"train": 1, "test": 1})
    load_data(str(tmp_path / "imgs"))
    (cached,) = os.listdir(tmp_path / "default-cache")
    assert cached.startswith("folder-") and cached.endswith(".safetensors")


def test_cache_problems_are_not_fatal(tmp_path, monkeypatch):
    make_folder(tmp_path / "imgs", per_split={"train": 1, "test": 1})
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.warns(UserWarning, match="could not write data cache"):
        data = load_data(str(tmp_path / "imgs"), cache_dir=blocker)
    assert data.train_x.shape == (2, 3, 6, 8)
    # a truncated cache file is a miss, then rewritten
    load_data(str(tmp_path / "imgs"), cache_dir=tmp_path / "cache")
    (path,) = (tmp_path / "cache").iterdir()
    path.write_bytes(path.read_bytes()[:100])
    assert torch.equal(
        load_data(str(tmp_path / "imgs"), cache_dir=tmp_path / "cache").train_x, data.train_x
    )
    with monkeypatch.context() as m:
        forbid(m, "decode_image")
        load_data(str(tmp_path / "imgs"), cache_dir=tmp_path / "cache")


# --- statistics ------------------------------------------------------------------------------


def test_channel_stats_hand_computed():
    x = torch.zeros(2, 3, 1, 2, dtype=torch.uint8)
    x[:, 0] = torch.tensor([[[0, 255]], [[255, 0]]])  # mean 1/2, std 1/2
    x[:, 1] = 51  # 51/255 = 0.2, std 0
    x[1, 2, 0, 1] = 255  # one of four pixels: mean 1/4, std sqrt(1/4 * 3/4)
    mean, std = sources.channel_stats(x)
    assert mean == pytest.approx((0.5, 0.2, 0.25), abs=1e-12)
    assert std == pytest.approx((0.5, 0.0, 0.75**0.5 / 2), abs=1e-12)


def test_channel_stats_match_float64_over_chunks():
    x = torch.randint(
        0, 256, (37, 3, 5, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    mean, std = sources.channel_stats(x, chunk_pixels=60)  # several chunks of 3 images
    ref = x.double() / 255
    assert mean == pytest.approx(ref.mean(dim=(0, 2, 3)).tolist(), abs=1e-12)
    assert std == pytest.approx(ref.std(dim=(0, 2, 3), unbiased=False).tolist(), abs=1e-12)


# --- torchvision CIFAR on-disk formats ------------------------------------------------------


def write_pickle(path, obj) -> str:
    """Write a CIFAR batch file as the python version of the dataset does; return its md5."""
    path.write_bytes(pickle.dumps(obj, protocol=2))
    return hashlib.md5(path.read_bytes()).hexdigest()


def cifar_rows(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 3072), dtype=np.uint8)


@pytest.fixture
def cifar10_root(tmp_path, monkeypatch):
    """A tiny CIFAR-10 in torchvision's layout; the expected md5s are those of these files."""
    folder = tmp_path / "data" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    train_list = []
    for i in range(1, 6):
        rows, labels = cifar_rows(4, i), [(i + j) % 10 for j in range(4)]
        md5 = write_pickle(folder / f"data_batch_{i}", {"data": rows, "labels": labels})
        train_list.append([f"data_batch_{i}", md5])
    test_rows = cifar_rows(3, 99)
    md5 = write_pickle(folder / "test_batch", {"data": test_rows, "labels": [1, 2, 3]})
    meta_md5 = write_pickle(folder / "batches.meta", {"label_names": CIFAR10_CLASSES})
    monkeypatch.setattr(datasets.CIFAR10, "train_list", train_list)
    monkeypatch.setattr(datasets.CIFAR10, "test_list", [["test_batch", md5]])
    meta = {"filename": "batches.meta", "key": "label_names", "md5": meta_md5}
    monkeypatch.setattr(datasets.CIFAR10, "meta", meta)
    train_rows = np.concatenate([cifar_rows(4, i) for i in range(1, 6)])
    return tmp_path / "data", train_rows, test_rows


def test_cifar10_through_torchvision(cifar10_root, tmp_path, monkeypatch):
    root, train_rows, test_rows = cifar10_root
    data = load_data("cifar10", root=root, cache_dir=tmp_path / "cache")
    assert data.source == "cifar10" and data.classes == CIFAR10_CLASSES
    assert data.train_x.shape == (20, 3, 32, 32) and data.test_x.shape == (3, 3, 32, 32)
    assert data.train_x.dtype == torch.uint8 and data.train_x.is_contiguous()
    assert torch.equal(data.train_x, torch.from_numpy(train_rows).view(20, 3, 32, 32))
    assert torch.equal(data.test_x, torch.from_numpy(test_rows).view(3, 3, 32, 32))
    assert data.train_y.tolist()[:4] == [1, 2, 3, 4] and data.test_y.tolist() == [1, 2, 3]
    ref = torch.from_numpy(train_rows).double().view(20, 3, 1024) / 255
    assert data.mean == pytest.approx(ref.mean(dim=(0, 2)).tolist())
    # second load: cache only, torchvision is not asked to read the batches again
    forbid(monkeypatch, "decode_torchvision")
    again = load_data("cifar10", root=root, cache_dir=tmp_path / "cache")
    assert torch.equal(again.train_x, data.train_x) and again.classes == data.classes


def test_cifar100_through_torchvision(tmp_path, monkeypatch):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    names = [f"class{i:03d}" for i in range(100)]
    train_rows, test_rows = cifar_rows(6, 1), cifar_rows(2, 2)
    fine, coarse = [5, 99, 0, 42, 42, 7], [1, 19, 0, 8, 8, 1]
    train_md5 = write_pickle(
        folder / "train", {"data": train_rows, "fine_labels": fine, "coarse_labels": coarse}
    )
    test_md5 = write_pickle(
        folder / "test", {"data": test_rows, "fine_labels": [3, 4], "coarse_labels": [0, 0]}
    )
    meta_md5 = write_pickle(
        folder / "meta", {"fine_label_names": names, "coarse_label_names": ["c"] * 20}
    )
    monkeypatch.setattr(datasets.CIFAR100, "train_list", [["train", train_md5]])
    monkeypatch.setattr(datasets.CIFAR100, "test_list", [["test", test_md5]])
    meta = {"filename": "meta", "key": "fine_label_names", "md5": meta_md5}
    monkeypatch.setattr(datasets.CIFAR100, "meta", meta)
    data = load_data("cifar100", root=tmp_path, cache_dir=tmp_path / "cache")
    assert data.source == "cifar100" and data.classes == names and data.num_classes == 100
    assert data.train_y.tolist() == fine and data.test_y.tolist() == [3, 4]
    assert torch.equal(data.train_x, torch.from_numpy(train_rows).view(6, 3, 32, 32))


def test_cifar10_missing_without_download(tmp_path):
    with pytest.raises(DataError) as err:
        load_data("cifar10", root=tmp_path / "empty", cache_dir=tmp_path / "cache")
    assert str(tmp_path / "empty") in err.value.message
    assert "--download" in err.value.hint and "--data-root" in err.value.hint


def test_cifar10_corrupted_files(cifar10_root, tmp_path):
    root, _, _ = cifar10_root
    (root / "cifar-10-batches-py" / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(DataError) as err:
        load_data("cifar10", root=root, cache_dir=tmp_path / "cache")
    assert "--download" in err.value.hint


# --- ImageFolder folders ---------------------------------------------------------------------


def write_png(path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def make_folder(root, size=(6, 8), classes=("dog", "cat"), per_split=None) -> dict:
    """Write ROOT/{train,test}/<class>/<i>.png with random pixels; return {relpath: array}."""
    rng = np.random.default_rng(0)
    per_split = per_split or {"train": 3, "test": 2}
    written = {}
    for split, count in per_split.items():
        for cls in classes:
            for i in range(count):
                array = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
                write_png(root / split / cls / f"{i}.png", array)
                written[f"{split}/{cls}/{i}.png"] = array
    return written


def test_folder_source(tmp_path, monkeypatch):
    root = tmp_path / "imgs"
    written = make_folder(root)
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    (root / "train" / "cat" / ".hidden.png").write_bytes(b"junk")
    data = load_data(str(root), cache_dir=tmp_path / "cache")
    assert data.source == f"folder:{root.resolve()}"
    assert data.classes == ["cat", "dog"]  # sorted, like torchvision's ImageFolder
    assert data.train_x.shape == (6, 3, 6, 8) and data.test_x.shape == (4, 3, 6, 8)
    assert data.train_y.tolist() == [0, 0, 0, 1, 1, 1] and data.test_y.tolist() == [0, 0, 1, 1]
    expected = torch.from_numpy(written["train/dog/1.png"]).permute(2, 0, 1)
    assert torch.equal(data.train_x[4], expected)
    # cache hit without decoding; a changed file changes the fingerprint and re-decodes
    with monkeypatch.context() as m:
        forbid(m, "decode_image")
        again = load_data(str(root), cache_dir=tmp_path / "cache")
    assert torch.equal(again.train_x, data.train_x)
    write_png(root / "train" / "dog" / "1.png", np.zeros((6, 8, 3), dtype=np.uint8))
    changed = load_data(str(root), cache_dir=tmp_path / "cache")
    assert changed.train_x[4].sum() == 0


@pytest.mark.parametrize(
    ("case", "needle"),
    [
        ("missing folder", "does not exist"),
        ("missing test split", "no test/"),
        ("unknown name", "unknown data source"),
        ("mixed sizes", "train/dog/2.png"),
        ("mixed split sizes", "test image"),
        ("class mismatch", "different classes"),
        ("empty class", "has no images"),
        ("no classes", "no class folders"),
        ("undecodable", "cannot decode"),
    ],
)
def test_source_errors(case, needle, tmp_path):
    root = tmp_path / "imgs"
    source = str(root)
    if case == "missing folder":
        source = str(tmp_path / "nope")
    elif case == "missing test split":
        make_folder(root, per_split={"train": 1})
    elif case == "unknown name":
        source = "imagenet"
    elif case == "mixed sizes":
        make_folder(root)
        write_png(root / "train" / "dog" / "2.png", np.zeros((7, 8, 3), dtype=np.uint8))
    elif case == "mixed split sizes":
        make_folder(root, per_split={"train": 1})
        make_folder(root, size=(4, 4), per_split={"test": 1})
    elif case == "class mismatch":
        make_folder(root, per_split={"train": 1})
        make_folder(root, classes=("cat", "eel"), per_split={"test": 1})
    elif case == "empty class":
        make_folder(root, per_split={"train": 1, "test": 1})
        (root / "test" / "emu").mkdir()
        (root / "train" / "emu").mkdir()
    elif case == "no classes":
        (root / "train").mkdir(parents=True)
        (root / "test").mkdir()
    elif case == "undecodable":
        make_folder(root, per_split={"train": 1, "test": 1})
        (root / "test" / "cat" / "9.png").write_bytes(b"not a png")
    with pytest.raises(DataError) as err:
        load_data(source, cache_dir=tmp_path / "cache")
    assert needle in err.value.message
    assert err.value.hint
    if case == "unknown name":
        assert all(name in err.value.hint for name in DATA_SOURCES)


# --- loader ----------------------------------------------------------------------------------


def images(n: int, h: int = 6, w: int = 5, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, h, w), dtype=torch.uint8, generator=g)


def make_loader(n: int = 10, batch_size: int = 3, **kw) -> Loader:
    """Labels are the sample ids, so batches reveal which samples they hold."""
    kw.setdefault("mean", (0.0, 0.0, 0.0))
    kw.setdefault("std", (1.0, 1.0, 1.0))
    return Loader(images(n), torch.arange(n), batch_size, **kw)


def ids(loader, start: int = 0) -> list[list[int]]:
    return [yb.tolist() for _, yb in loader.iter_from(start)]


def test_loader_batch_counts():
    assert len(make_loader(10, 3)) == 4 and len(make_loader(10, 3, drop_last=True)) == 3
    assert len(make_loader(10, 3, world_size=2, rank=1)) == 2  # 5 samples per rank
    assert len(make_loader(10, 3, world_size=3, drop_last=True)) == 1
    assert [len(b) for b in ids(make_loader(10, 3))] == [3, 3, 3, 1]
    assert [len(b) for b in ids(make_loader(10, 3, drop_last=True))] == [3, 3, 3]


def test_eval_loader_keeps_order_and_values():
    x = images(7)
    loader = Loader(x, torch.arange(7), 4, mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 2.0))
    batches = list(loader)
    assert [yb.tolist() for _, yb in batches] == [[0, 1, 2, 3], [4, 5, 6]]
    xb, yb = batches[1]
    assert xb.dtype == torch.float32 and yb.dtype == torch.int64 and xb.shape == (3, 3, 6, 5)
    ref = (x[4:].double() / 255 - torch.tensor([0.5, 0.25, 0.0]).view(1, 3, 1, 1)) / torch.tensor(
        [0.5, 0.25, 2.0]
    ).view(1, 3, 1, 1)
    assert torch.allclose(xb.double(), ref, atol=1e-5)
    # known pixels: 0 and 255 map to -mean/std and (1-mean)/std
    x0 = torch.tensor([0, 255], dtype=torch.uint8).view(2, 1, 1, 1).expand(2, 3, 1, 1)
    out, _ = next(
        iter(Loader(x0.contiguous(), torch.zeros(2), 2, mean=(0.5,) * 3, std=(0.25,) * 3))
    )
    assert out[:, :, 0, 0].tolist() == [[-2.0] * 3, [2.0] * 3]


def test_loader_dtype_and_channels_last():
    loader = make_loader(8, 4, dtype=torch.bfloat16, channels_last=True, augment=True)
    xb, _ = next(iter(loader))
    assert xb.dtype == torch.bfloat16
    assert xb.is_contiguous(memory_format=torch.channels_last)
    plain, _ = next(iter(make_loader(8, 4, augment=True)))
    assert torch.allclose(xb.float(), plain, atol=1e-2)


def test_every_sample_once_per_epoch():
    loader = make_loader(23, 5, shuffle=True, augment=True)
    seen = []
    for epoch in range(3):
        loader.set_epoch(epoch)
        order = sum(ids(loader), [])
        assert sorted(order) == list(range(23))
        seen.append(order)
    assert seen[0] != seen[1] != seen[2]  # a new order every epoch
    assert seen[0] != list(range(23))


def test_loader_determinism():
    a = make_loader(30, 4, shuffle=True, augment=True, seed=7)
    b = make_loader(30, 4, shuffle=True, augment=True, seed=7)
    a.set_epoch(3)
    b.set_epoch(3)
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    again = [xb for xb, _ in a]  # iterating twice without set_epoch repeats the epoch
    assert all(torch.equal(p, q) for p, q in zip(again, [xb for xb, _ in b], strict=True))
    other = make_loader(30, 4, shuffle=True, augment=True, seed=8)
    other.set_epoch(3)
    assert ids(other) != ids(a)


def test_iter_from_equals_tail_and_skips_work(monkeypatch):
    loader = make_loader(40, 6, shuffle=True, augment=True, seed=1)
    loader.set_epoch(2)
    full = list(loader)
    calls = []
    real = loader_mod.crop_flip
    monkeypatch.setattr(loader_mod, "crop_flip", lambda *a: calls.append(1) or real(*a))
    for k in (0, 3, len(full) - 1, len(full), len(full) + 2):
        calls.clear()
        tail = list(loader.iter_from(k))
        assert len(tail) == max(0, len(full) - k) == len(calls)
        for (xa, ya), (xb, yb) in zip(full[k:], tail, strict=True):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
    with pytest.raises(DataError):
        loader.iter_from(-1)


def test_augmentation_is_crop_of_padded_image_and_flip():
    n, pad = 64, 2
    x = images(n, 6, 5)
    loader = Loader(x, torch.arange(n), 16, mean=(0,) * 3, std=(1,) * 3, augment=True, pad=pad)
    _, offsets, flips = loader.epoch_plan()
    assert offsets.min() == 0 and offsets.max() == 2 * pad
    assert 0 < int(flips.sum()) < n  # some flipped, some not
    out = torch.cat([xb for xb, _ in loader]) * 255
    for i in range(n):
        padded = F.pad(x[i], (pad, pad, pad, pad))
        oy, ox = offsets[i].tolist()
        crop = padded[:, oy : oy + 6, ox : ox + 5]
        if flips[i]:
            crop = crop.flip(-1)
        assert torch.allclose(out[i], crop.float(), atol=1e-3), i


def test_distributed_shards_partition_the_permutation():
    whole = make_loader(21, 4, shuffle=True, seed=3)
    perm = sum(ids(whole), [])
    r0 = sum(ids(make_loader(21, 4, shuffle=True, seed=3, rank=0, world_size=2)), [])
    r1 = sum(ids(make_loader(21, 4, shuffle=True, seed=3, rank=1, world_size=2)), [])
    assert r0 == perm[:20:2] and r1 == perm[1:20:2]
    assert not set(r0) & set(r1) and len(r0) == len(r1) == 10
    # world_size=1 is the plain loader
    single = make_loader(21, 4, shuffle=True, seed=3, rank=0, world_size=1)
    assert ids(single) == ids(whole)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 60),
    batch_size=st.integers(1, 17),
    world_size=st.integers(1, 5),
    drop_last=st.booleans(),
    seed=st.integers(0, 2**32),
)
def test_shards_disjoint_and_cover_kept_samples(n, batch_size, world_size, drop_last, seed):
    kw = dict(shuffle=True, seed=seed, drop_last=drop_last)
    perm = sum(ids(make_loader(n, n, **kw)), [])
    kept = n // world_size * world_size
    shards = []
    for rank in range(world_size):
        loader = make_loader(n, batch_size, rank=rank, world_size=world_size, **kw)
        batches = ids(loader)
        assert len(batches) == len(loader)
        assert all(len(b) == batch_size for b in batches[: len(batches) - 1])
        shard = loader.epoch_plan()[0].tolist()
        assert len(shard) == n // world_size
        flat = sum(batches, [])
        assert flat == (shard[: len(shard) // batch_size * batch_size] if drop_last else shard)
        shards.append(shard)
    union = [i for s in shards for i in s]
    assert len(union) == len(set(union)) == kept
    assert sorted(union) == sorted(perm[:kept])


def test_loader_rejects_bad_arguments():
    x, y = images(4), torch.arange(4)
    stats = dict(mean=(0,) * 3, std=(1,) * 3)
    with pytest.raises(DataError):
        Loader(x.float(), y, 2, **stats)
    with pytest.raises(DataError):
        Loader(x, y[:3], 2, **stats)
    with pytest.raises(DataError):
        Loader(x, y, 0, **stats)
    with pytest.raises(DataError):
        Loader(x, y, 2, rank=2, world_size=2, **stats)
    with pytest.raises(DataError):
        Loader(x, y, 2, mean=(0,), std=(1,))
    with pytest.raises(DataError):
        Loader(x, y, 2, mean=(0,) * 3, std=(1, 0, 1))


def test_loader_on_sample(sample):
    loader = Loader(
        sample.train_x,
        sample.train_y,
        512,
        mean=sample.mean,
        std=sample.std,
        shuffle=True,
        augment=True,
        drop_last=True,
    )
    assert len(loader) == 9
    xb, yb = next(iter(loader))
    assert xb.shape == (512, 3, 32, 32) and yb.shape == (512,)
    assert abs(float(xb.mean())) < 0.3  # roughly normalised (padding pulls it down a little)


def test_a_slow_first_decode_says_so_once(tmp_path, caplog, monkeypatch):
    """The first load of a dataset decodes it (the CIFAR-10 JPEG copy takes about half a
    minute): a decode slower than DECODE_NOTE_AFTER_S (here 0) logs one INFO line naming the
    cache; a cache hit says nothing."""
    monkeypatch.setattr(sources, "DECODE_NOTE_AFTER_S", 0.0)
    root = tmp_path / "tiny"
    for split in ("train", "test"):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            for i in range(2):
                png = torch.randint(0, 255, (3, 8, 8), dtype=torch.uint8)
                torchvision.io.write_png(png, str(root / split / c / f"{i}.png"))
    with caplog.at_level(logging.INFO, logger="surgeon.data.sources"):
        load_data(str(root), cache_dir=tmp_path / "cache")
        first = [r.getMessage() for r in caplog.records]
        caplog.clear()
        load_data(str(root), cache_dir=tmp_path / "cache")
    assert len(first) == 1 and first[0].startswith("decoding ")
    assert str(tmp_path / "cache") in first[0]
    assert not caplog.records


def test_the_note_comes_only_for_a_slow_block(caplog, monkeypatch):
    import time

    monkeypatch.setattr(sources, "DECODE_NOTE_AFTER_S", 0.05)
    with caplog.at_level(logging.INFO, logger="surgeon.data.sources"):
        with sources._note_if_slow("slow"):
            time.sleep(0.5)
        monkeypatch.setattr(sources, "DECODE_NOTE_AFTER_S", 0.3)
        with sources._note_if_slow("fast"):
            pass
        time.sleep(0.6)  # the cancelled timer never fires
    assert [r.getMessage() for r in caplog.records] == ["slow"]
