"""Image datasets as uint8 tensors: the embedded sample, torchvision CIFAR, ImageFolder folders.

Every source is decoded once into a safetensors cache keyed by a cheap fingerprint of its files;
later loads read the cache only. Nothing is pickled or `torch.load`-ed by this module.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import re
import tarfile
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from surgeon.errors import DataError
from surgeon.rundir import follow_umask

SAMPLE_TAR = Path(__file__).parent / "sample" / "cifar10-sample.tar.gz"
log = logging.getLogger(__name__)  # the CLI shows INFO lines on stderr
CACHE_VERSION = 1  # bump when the cache layout or decoding changes
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
SPLITS = ("train", "test")


@dataclass
class ImageData:
    """A train/test image classification dataset held as uint8 NCHW tensors."""

    train_x: torch.Tensor  # (N, 3, H, W) uint8, contiguous
    train_y: torch.Tensor  # (N,) int64
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: list[str]
    mean: tuple[float, ...]  # per channel, [0, 1] units, train split only
    std: tuple[float, ...]
    source: str  # "sample", "cifar10", "cifar100" or "folder:/abs/path"
    # a hold-out of the training split for model selection (empty when there is none)
    val_x: torch.Tensor | None = None
    val_y: torch.Tensor | None = None
    val_seed: int | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def has_val(self) -> bool:
        return self.val_y is not None and len(self.val_y) > 0

    def __repr__(self) -> str:
        shape = tuple(self.train_x.shape[1:])
        return (
            f"ImageData(source={self.source!r}, train={len(self.train_y)}, "
            f"test={len(self.test_y)}, val={len(self.val_y) if self.has_val else 0}, "
            f"image={shape}, classes={self.num_classes})"
        )


@dataclass
class Decoded:
    """Tensors and class names straight from a source, before limits.

    mean/std of the full train split are filled in once and kept in the cache metadata.
    """

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: list[str]
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()


@dataclass
class Plan:
    """A resolved source: its public name, cache file stem, fingerprint and decoder."""

    name: str
    cache_key: str
    fingerprint: str
    decode: Callable[[], Decoded]


# --- decoding helpers --------------------------------------------------------------------------


def decode_image(data: bytes, name: str) -> np.ndarray:
    """Decode one encoded image into an (H, W, 3) uint8 array; `name` is used in errors."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            return np.asarray(img.convert("RGB"))
    except UnidentifiedImageError:
        reason = "not an image format Pillow can read"
    except Exception as e:  # PIL raises many types for damaged files
        text = re.sub(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "the file", str(e))
        reason = " ".join(text.split())[:200] or type(e).__name__
    raise DataError(f"cannot decode image {name}: {reason}", hint="remove or re-encode the file")


def stack_images(arrays: list[np.ndarray], names: list[str]) -> torch.Tensor:
    """Stack (H, W, 3) arrays of one shared size into an (N, 3, H, W) uint8 tensor."""
    if not arrays:
        return torch.empty(0, 3, 0, 0, dtype=torch.uint8)
    size = arrays[0].shape
    for arr, name in zip(arrays, names, strict=True):
        if arr.shape != size:
            raise DataError(
                f"image {name} is {arr.shape[1]}x{arr.shape[0]}, expected "
                f"{size[1]}x{size[0]} (the size of {names[0]})",
                hint="resize all images of a folder dataset to one size",
            )
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def labelled(items: Iterable[tuple[str, int, bytes]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode (name, label, bytes) items into (x uint8 NCHW, y int64)."""
    items = list(items)
    names = [n for n, _, _ in items]
    x = stack_images([decode_image(data, n) for n, _, data in items], names)
    y = torch.tensor([label for _, label, _ in items], dtype=torch.int64)
    return x, y


def digest(obj: object) -> str:
    """A short stable hash of a JSON-serialisable object."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:32]


# --- the embedded sample -----------------------------------------------------------------------


def sample_plan(root: Path | None, download: bool) -> Plan:
    """The class-balanced CIFAR-10 sample shipped inside the package (root is ignored)."""
    if not SAMPLE_TAR.is_file():
        raise DataError(
            f"the embedded sample {SAMPLE_TAR} is missing",
            hint="reinstall fx-surgeon or run benchmarks/make_sample.py cifar10-jpg.tar.gz",
        )
    stat = SAMPLE_TAR.stat()
    fingerprint = digest(["sample", stat.st_size, stat.st_mtime_ns])
    return Plan("sample", "sample", fingerprint, decode_sample)


def decode_sample() -> Decoded:
    """Read `train/<class>/*.jpg` and `test/<class>/*.jpg` straight from the sample tar."""
    files: dict[tuple[str, str, str], bytes] = {}
    with tarfile.open(SAMPLE_TAR, "r:gz") as tar:
        for member in tar:
            parts = member.name.split("/")
            if member.isfile() and len(parts) == 3 and parts[0] in SPLITS:
                fileobj = tar.extractfile(member)
                assert fileobj is not None
                files[(parts[0], parts[1], parts[2])] = fileobj.read()
    classes = sorted({c for _, c, _ in files})
    index = {c: i for i, c in enumerate(classes)}
    out = []
    for split in SPLITS:
        keys = sorted(k for k in files if k[0] == split)
        out += labelled(("/".join(k), index[k[1]], files[k]) for k in keys)
    return Decoded(*out, classes=classes)


# --- torchvision CIFAR ---------------------------------------------------------------------------


def torchvision_plan(name: str) -> Callable[[Path | None, bool], Plan]:
    """A resolver for torchvision's CIFAR10 / CIFAR100 kept under `root` (default ./data)."""

    def plan(root: Path | None, download: bool) -> Plan:
        from torchvision import datasets

        cls = {"cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100}[name]
        root = Path(root if root is not None else "data").expanduser().resolve()
        folder = root / cls.base_folder
        files = [f for f, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
        if not all((folder / f).is_file() for f in files):
            if not download:
                raise DataError(
                    f"{name} not found in {root} (expected {folder})",
                    hint="pass --download to fetch it, --data-root DIR to point at an existing "
                    "copy, or use an ImageFolder path or 'sample' as the data source",
                )
            try:
                cls(str(root), train=False, download=True)
            except Exception as e:
                raise DataError(
                    f"could not download {name} into {root}: {e}",
                    hint="check the network, or copy the dataset there and use --data-root DIR",
                ) from e
        sizes = [(f, (folder / f).stat().st_size) for f in files]
        fingerprint = digest([name, sizes])
        key = f"{name}-{digest(str(root))[:12]}"
        return Plan(name, key, fingerprint, lambda: decode_torchvision(cls, name, root))

    return plan


def decode_torchvision(cls: type, name: str, root: Path) -> Decoded:
    """Use the dataset's own `.data` (N, H, W, 3) and `.targets`, no per-image loop."""
    out = []
    for train in (True, False):
        try:
            ds = cls(str(root), train=train, download=False)
        except Exception as e:
            raise DataError(
                f"{name} files in {root} are corrupted or unreadable: {e}",
                hint=f"delete {root / cls.base_folder} and run again with --download",
            ) from e
        x = torch.from_numpy(np.asarray(ds.data, dtype=np.uint8)).permute(0, 3, 1, 2)
        out += [x.contiguous(), torch.as_tensor(ds.targets, dtype=torch.int64)]
    return Decoded(*out, classes=list(ds.classes))


# --- ImageFolder folders -------------------------------------------------------------------------


def image_entries(folder: Path) -> list[os.DirEntry]:
    """The image files of one class folder, sorted by name (hidden and other files skipped)."""
    with os.scandir(folder) as it:
        entries = [
            e
            for e in it
            if e.is_file()
            and not e.name.startswith(".")
            and os.path.splitext(e.name)[1].lower() in IMG_EXTENSIONS
        ]
    return sorted(entries, key=lambda e: e.name)


def folder_files(root: Path) -> tuple[list[str], dict[str, list[tuple[str, os.DirEntry]]]]:
    """Validate `root/{train,test}/<class>/*`; return (classes, {split: [(class, entry)]})."""
    hint = "a folder dataset needs ROOT/train/<class>/*.png and ROOT/test/<class>/*.png"
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist", hint=hint)
    per_split: dict[str, dict[str, list[os.DirEntry]]] = {}
    for split in SPLITS:
        split_dir = root / split
        if not split_dir.is_dir():
            raise DataError(f"data folder {root} has no {split}/ folder", hint=hint)
        classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
        if not classes:
            raise DataError(f"{split_dir} has no class folders", hint=hint)
        per_split[split] = {}
        for cls in classes:
            entries = image_entries(split_dir / cls)
            if not entries:
                raise DataError(
                    f"class folder {split_dir / cls} has no images",
                    hint=f"add images ({', '.join(IMG_EXTENSIONS)}) or remove the folder",
                )
            per_split[split][cls] = entries
    train, test = (sorted(per_split[s]) for s in SPLITS)
    if train != test:
        only = sorted(set(train) ^ set(test))
        raise DataError(
            f"train/ and test/ of {root} have different classes (only in one: {only})",
            hint="give both splits the same class folders",
        )
    return train, {s: [(c, e) for c in train for e in per_split[s][c]] for s in SPLITS}


def folder_plan(path: Path) -> Plan:
    """An ImageFolder-layout dataset at `path`, fingerprinted by names, sizes and mtimes."""
    root = path.expanduser().resolve()
    classes, entries = folder_files(root)
    stats = []
    for split, split_entries in entries.items():
        for cls, e in split_entries:
            st = e.stat()
            stats.append((f"{split}/{cls}/{e.name}", st.st_size, st.st_mtime_ns))
    fingerprint = digest(["folder", sorted(stats)])
    key = f"folder-{digest(str(root))[:12]}"
    files = {s: [(c, e.path) for c, e in split_entries] for s, split_entries in entries.items()}
    return Plan(f"folder:{root}", key, fingerprint, lambda: decode_folder(classes, files))


def decode_folder(classes: list[str], files: dict[str, list[tuple[str, str]]]) -> Decoded:
    """Decode every (class, path) of both splits; labels follow the sorted class list."""
    index = {c: i for i, c in enumerate(classes)}
    out = []
    for split in SPLITS:
        out += labelled((path, index[c], Path(path).read_bytes()) for c, path in files[split])
    if out[0].shape[1:] != out[2].shape[1:]:
        raise DataError(
            f"test image {files['test'][0][1]} is {out[2].shape[3]}x{out[2].shape[2]}, "
            f"train images are {out[0].shape[3]}x{out[0].shape[2]}",
            hint="resize all images of a folder dataset to one size",
        )
    return Decoded(*out, classes=classes)


# name -> resolver(root, download) -> Plan; any other source string is an ImageFolder path.
DATA_SOURCES: dict[str, Callable[[Path | None, bool], Plan]] = {
    "sample": sample_plan,  # 5000/1000 CIFAR-10 JPEGs shipped with the package, offline
    "cifar10": torchvision_plan("cifar10"),  # torchvision.datasets.CIFAR10 under --data-root
    "cifar100": torchvision_plan("cifar100"),  # torchvision.datasets.CIFAR100 under --data-root
}


def resolve(source: str, root: Path | None, download: bool) -> Plan:
    """Turn a source string into a Plan: a registered name, else an existing folder."""
    if source in DATA_SOURCES:
        return DATA_SOURCES[source](root, download)
    path = Path(source).expanduser()
    if path.exists() or os.sep in source or source.startswith((".", "~")):
        return folder_plan(path)
    raise DataError(
        f"unknown data source {source!r}",
        hint=f"use one of {', '.join(DATA_SOURCES)} or a path to an ImageFolder-layout folder",
    )


# --- cache ---------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """`$SURGEON_CACHE`, else `~/.cache/fx-surgeon`."""
    return Path(os.environ.get("SURGEON_CACHE") or "~/.cache/fx-surgeon").expanduser()


def read_cache(path: Path, fingerprint: str) -> Decoded | None:
    """Return the cached tensors if `path` holds this fingerprint, else None."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("surgeon", "{}"))
        if meta.get("fingerprint") != fingerprint or meta.get("version") != CACHE_VERSION:
            return None
        t = load_file(str(path))
        stats = tuple(meta["mean"]), tuple(meta["std"])
        return Decoded(
            t["train_x"], t["train_y"], t["test_x"], t["test_y"], meta["classes"], *stats
        )
    except Exception:  # a truncated, foreign or older file is just a miss
        return None


def write_cache(path: Path, fingerprint: str, data: Decoded) -> None:
    """Atomically write `data` to `path` (temp file in the same folder, fsync, os.replace)."""
    tensors = {k: getattr(data, k).contiguous() for k in ("train_x", "train_y", "test_x", "test_y")}
    meta = {
        "fingerprint": fingerprint,
        "version": CACHE_VERSION,
        "classes": data.classes,
        "mean": data.mean,
        "std": data.std,
    }
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        save_file(tensors, tmp, metadata={"surgeon": json.dumps(meta)})
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        follow_umask(tmp)  # mkstemp creates 0600
        os.replace(tmp, path)
    except Exception as e:  # the cache is an optimisation: never fail a load over it
        warnings.warn(f"could not write data cache {path}: {e}", stacklevel=3)
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


# --- limits and statistics -----------------------------------------------------------------------


def balanced_subset(y: torch.Tensor, limit: int | None) -> torch.Tensor | None:
    """Indices of a deterministic class-balanced subset of `limit` samples (None: keep all).

    Classes are visited round-robin, each contributing its samples in dataset order, so every
    class gets `limit // C` or one more (as far as it has samples); indices come back sorted.
    """
    if limit is None or limit >= len(y):
        return None
    if limit < 1:
        raise DataError(f"limit must be a positive number of images, got {limit}", hint="use >= 1")
    order = torch.sort(y, stable=True).indices
    counts = torch.bincount(y)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(len(y)) - starts[y[order]]  # position of each sample within its class
    key = rank * (int(y.max()) + 1) + y[order]
    picked = order[torch.sort(key, stable=True).indices[:limit]]
    return torch.sort(picked).values


def val_split(y: torch.Tensor, size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(keep, val)``: sorted indices of a class-balanced, seeded hold-out of ``size`` samples
    and of the rest. Each class gives ``size // C`` samples (the first ``size % C`` classes one
    more), drawn by a permutation seeded with ``seed``; the same ``(y, size, seed)`` always gives
    the same split."""
    classes = int(y.max()) + 1 if len(y) else 0
    counts = torch.bincount(y, minlength=classes)
    if not 0 < size < len(y):
        raise DataError(
            f"--val-size {size} must be between 1 and {len(y) - 1} (the training split)",
            hint="hold out fewer images",
        )
    want = [size // classes + (1 if c < size % classes else 0) for c in range(classes)]
    short = [c for c in range(classes) if want[c] >= counts[c]]
    if short:
        raise DataError(
            f"--val-size {size} takes {want[short[0]]} images of class {short[0]}, which has "
            f"{int(counts[short[0]])}",
            hint="hold out fewer images (every class keeps at least one for training)",
        )
    g = torch.Generator().manual_seed(seed)
    picked = []
    for c in range(classes):
        members = torch.nonzero(y == c).flatten()
        picked.append(members[torch.randperm(len(members), generator=g)[: want[c]]])
    val = torch.sort(torch.cat(picked)).values
    mask = torch.ones(len(y), dtype=torch.bool)
    mask[val] = False
    return torch.nonzero(mask).flatten(), val


def channel_stats(
    x: torch.Tensor, chunk_pixels: int = 1 << 24
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std of uint8 NCHW images, in [0, 1] units.

    Counts each channel's 256 values exactly (bincount over chunks of images), then takes the
    moments in float64: exact, fast, and memory-bounded for large datasets.
    """
    n, c = x.shape[0], x.shape[1]
    if n == 0 or x.numel() == 0:
        raise DataError("the train split is empty", hint="check the data source and limit_train")
    counts = torch.zeros(c, 256, dtype=torch.int64)
    step = max(1, chunk_pixels // (x[0, 0].numel()))
    for part in x.split(step):
        for ch in range(c):
            counts[ch] += torch.bincount(part[:, ch].reshape(-1), minlength=256)
    values = torch.arange(256, dtype=torch.float64) / 255
    total = counts.sum(1).double()
    mean = (counts.double() * values).sum(1) / total
    var = ((counts.double() * (values - mean[:, None]) ** 2).sum(1) / total).clamp_min(0)
    return tuple(mean.tolist()), tuple(var.sqrt().tolist())


# --- entry point ---------------------------------------------------------------------------------


DECODE_NOTE_AFTER_S = 2.0  # a decode still running after this long says what it is doing


@contextlib.contextmanager
def _note_if_slow(message: str) -> Iterator[None]:
    """Log ``message`` (INFO) if the block is still running after
    :data:`DECODE_NOTE_AFTER_S`: the first decode of the CIFAR-10 JPEG copy is half a minute
    of silence otherwise, while a fast decode (or one that fails at once) prints nothing."""
    if DECODE_NOTE_AFTER_S <= 0:
        log.info(message)
        yield
        return
    timer = threading.Timer(DECODE_NOTE_AFTER_S, log.info, args=(message,))
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def load_data(
    source: str = "sample",
    root: str | Path | None = None,
    download: bool = False,
    cache_dir: str | Path | None = None,
    limit_train: int | None = None,
    limit_test: int | None = None,
    val_size: int = 0,
    val_seed: int = 0,
) -> ImageData:
    """Load a dataset by name ("sample", "cifar10", "cifar100") or ImageFolder path.

    `root` is where torchvision datasets live (default ./data); the decoded tensors are cached in
    `cache_dir` (default `$SURGEON_CACHE` or ~/.cache/fx-surgeon). `limit_train`/`limit_test`
    keep a deterministic class-balanced subset. mean/std come from the (kept) train split.
    `val_size` holds out that many training images (class-balanced, seeded by `val_seed`)
    before `limit_train` is applied to the rest, so the subset never overlaps the hold-out.
    """
    plan = resolve(source, Path(root) if root is not None else None, download)
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    path = cache / f"{plan.cache_key}.safetensors"
    data = read_cache(path, plan.fingerprint)
    if data is None:
        with _note_if_slow(f"decoding {plan.name} once into {path}; later loads read this cache"):
            data = plan.decode()
        data.mean, data.std = channel_stats(data.train_x)
        write_cache(path, plan.fingerprint, data)
    train_x, train_y, test_x, test_y = data.train_x, data.train_y, data.test_x, data.test_y
    val_x = val_y = None
    if val_size:
        rest, held = val_split(train_y, val_size, val_seed)
        val_x, val_y = train_x[held], train_y[held]
        train_x, train_y = train_x[rest], train_y[rest]
    if (keep := balanced_subset(train_y, limit_train)) is not None:
        train_x, train_y = train_x[keep], train_y[keep]
    if (keep := balanced_subset(test_y, limit_test)) is not None:
        test_x, test_y = test_x[keep], test_y[keep]
    subset = limit_train is not None or val_size
    mean, std = channel_stats(train_x) if subset else (data.mean, data.std)
    return ImageData(
        train_x, train_y, test_x, test_y, list(data.classes), mean, std, plan.name,
        val_x, val_y, val_seed if val_size else None,
    )  # fmt: skip
