"""A deterministic batch loader over uint8 image tensors kept on the device.

Each epoch's order, crop offsets and flips are drawn up front from one generator seeded by
(seed, epoch), so a batch is a pure function of (seed, epoch, batch index) and a run can resume
mid-epoch with `iter_from(k)`. Batches are built with tensor ops only: gather, crop, flip, scale.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F

from surgeon.errors import DataError

ORDERS = ("reshuffle", "fixed", "replacement")


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """A CPU generator whose seed is a hash of (seed, epoch): same on every device and rank."""
    key = hashlib.sha256(f"fx-surgeon:{seed}:{epoch}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(key[:8], "little") >> 1)


def crop_flip(
    x: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor, pad: int
) -> torch.Tensor:
    """Random-crop (B, C, H, W) images from their zero-padded copies and flip some horizontally.

    offsets: (B, 2) int64 (row, col) in [0, 2 * pad]; flips: (B,) bool. One pad and one gather.
    """
    b, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad)) if pad else x
    wp = w + 2 * pad
    cols = torch.arange(w, device=x.device)
    cols = torch.where(flips[:, None], w - 1 - cols, cols) + offsets[:, 1:2]  # (B, W)
    rows = torch.arange(h, device=x.device) + offsets[:, 0:1]  # (B, H)
    flat = (rows[:, :, None] * wp + cols[:, None, :]).view(b, 1, h * w).expand(b, c, h * w)
    return padded.reshape(b, c, -1).gather(2, flat).view(b, c, h, w)


class Loader:
    """Batches of normalised images from uint8 (N, C, H, W) tensors, sharded over ranks."""

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        batch_size: int,
        *,
        mean: Sequence[float],
        std: Sequence[float],
        shuffle: bool = False,
        augment: bool = False,
        drop_last: bool = False,
        seed: int = 0,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        channels_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        pad: int = 4,
        order: str = "reshuffle",
    ) -> None:
        if x.dtype != torch.uint8 or x.dim() != 4:
            raise DataError(
                f"images must be uint8 (N, C, H, W), got {x.dtype} {tuple(x.shape)}",
                hint="pass ImageData.train_x / test_x",
            )
        if y.shape != (len(x),):
            raise DataError(
                f"labels {tuple(y.shape)} do not match {len(x)} images", hint="pass (N,) labels"
            )
        if batch_size < 1:
            raise DataError(f"batch size must be >= 1, got {batch_size}", hint="use e.g. 512")
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is outside world size {world_size}", hint="check ranks")
        if len(mean) != x.shape[1] or len(std) != x.shape[1]:
            raise DataError(
                f"mean/std have {len(mean)}/{len(std)} entries for {x.shape[1]} channels",
                hint="use ImageData.mean / ImageData.std",
            )
        if min(std) <= 0:
            raise DataError(f"std must be positive, got {tuple(std)}", hint="check the dataset")
        if order not in ORDERS:
            raise DataError(f"unknown data order {order!r}", hint=f"use {', '.join(ORDERS)}")
        if pad < 0:
            raise DataError(f"pad must be >= 0, got {pad}", hint="use 4 for 32x32 images")
        self.device = torch.device(device)
        self.x = x.to(self.device).contiguous()  # moved once: the whole dataset stays here
        self.y = y.to(self.device, torch.int64)
        self.batch_size = batch_size
        self.shuffle, self.augment, self.drop_last = shuffle, augment, drop_last
        self.seed, self.epoch = seed, 0
        self.dtype, self.channels_last = dtype, channels_last
        self.rank, self.world_size, self.pad = rank, world_size, pad
        self.order = order  # with shuffle: reshuffle, fixed or replacement
        std_t = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        mean_t = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self.scale = 1.0 / (255.0 * std_t)  # (x / 255 - mean) / std == x * scale - shift
        self.shift = mean_t / std_t
        self.num_samples = len(x) // world_size  # per rank and epoch (tail dropped to share)

    def __len__(self) -> int:
        """Batches per epoch for this rank."""
        if self.drop_last:
            return self.num_samples // self.batch_size
        return math.ceil(self.num_samples / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order and augmentation the next iteration uses."""
        self.epoch = epoch

    def epoch_plan(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """This rank's sample indices for the epoch, and per-sample crop offsets and flips.

        Drawn on CPU in a fixed order (permutation, offsets, flips) from the (seed, epoch)
        generator. Offsets and flips are indexed by sample id, so sharding does not change them.
        """
        n = len(self.x)
        g = epoch_generator(self.seed, self.epoch)
        if not self.shuffle:
            perm = torch.arange(n)
        elif self.order == "fixed":  # epoch 0's permutation, every epoch
            perm = torch.randperm(n, generator=epoch_generator(self.seed, 0))
            torch.randperm(n, generator=g)  # same augmentation draws as reshuffle
        elif self.order == "replacement":  # n draws with replacement: no epoch boundary
            perm = torch.randint(0, n, (n,), generator=g)
        else:
            perm = torch.randperm(n, generator=g)
        indices = perm[: self.num_samples * self.world_size][self.rank :: self.world_size]
        offsets = flips = None
        if self.augment:
            offsets = torch.randint(0, 2 * self.pad + 1, (n, 2), generator=g)
            flips = torch.randint(0, 2, (n,), generator=g).bool()
        return indices, offsets, flips

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.iter_from(0)

    def iter_from(self, start_batch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The epoch's batches from `start_batch` on; earlier batches are skipped, not built."""
        if start_batch < 0:
            raise DataError(f"start batch must be >= 0, got {start_batch}", hint="resume at >= 0")
        indices, offsets, flips = self.epoch_plan()
        indices = indices.to(self.device)
        if offsets is not None and flips is not None:
            offsets, flips = offsets.to(self.device), flips.to(self.device)
        return self._batches(indices, offsets, flips, start_batch)

    def _batches(
        self,
        indices: torch.Tensor,
        offsets: torch.Tensor | None,
        flips: torch.Tensor | None,
        start_batch: int,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for b in range(start_batch, len(self)):
            idx = indices[b * self.batch_size : (b + 1) * self.batch_size]
            xb = self.x.index_select(0, idx)  # much faster than x[idx] on CPU
            if offsets is not None and flips is not None:
                xb = crop_flip(
                    xb, offsets.index_select(0, idx), flips.index_select(0, idx), self.pad
                )
            if self.channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            xb = xb.to(torch.float32).mul_(self.scale).sub_(self.shift).to(self.dtype)
            yield xb, self.y.index_select(0, idx)

    def __repr__(self) -> str:
        return (
            f"Loader(n={len(self.x)}, batch_size={self.batch_size}, batches={len(self)}, "
            f"shuffle={self.shuffle}, augment={self.augment}, drop_last={self.drop_last}, "
            f"rank={self.rank}/{self.world_size}, device={self.device}, dtype={self.dtype})"
        )
