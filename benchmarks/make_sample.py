"""Build the embedded CIFAR-10 sample from the CIFAR-10 JPEG tar.

Usage: python benchmarks/make_sample.py SOURCE.tar.gz [OUT.tar.gz]

Copies the original JPEG bytes of the first 500 train and first 100 test files (by file name) of
every class into an ImageFolder-layout tar (`train/<class>/NNNN.jpg`, `test/<class>/NNNN.jpg`).
Members are sorted, owners and mtimes fixed and the gzip header carries no time or name, so
re-running the script yields identical bytes.
"""

from __future__ import annotations

import argparse
import gzip
import io
import tarfile
from pathlib import Path

PER_CLASS = {"train": 500, "test": 100}  # images per class in each split
MTIME = 1_700_000_000  # fixed member mtime (2023-11-14) so the output is reproducible
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "surgeon/data/sample/cifar10-sample.tar.gz"


def read_jpegs(source: Path) -> dict[tuple[str, str, str], bytes]:
    """Return {(split, class, file name): bytes} for every `<split>/<class>/<name>.jpg` member."""
    files: dict[tuple[str, str, str], bytes] = {}
    with tarfile.open(source, "r:gz") as tar:
        for member in tar:
            parts = Path(member.name).parts
            if not member.isfile() or len(parts) < 3 or parts[-3] not in PER_CLASS:
                continue
            if not parts[-1].lower().endswith(".jpg"):
                continue
            fileobj = tar.extractfile(member)
            assert fileobj is not None
            files[(parts[-3], parts[-2], parts[-1])] = fileobj.read()
    return files


def select(files: dict[tuple[str, str, str], bytes]) -> list[tuple[str, bytes]]:
    """Pick the first PER_CLASS[split] names of each class, as sorted (archive name, bytes)."""
    chosen: list[tuple[str, bytes]] = []
    for split, count in PER_CLASS.items():
        classes = sorted({c for s, c, _ in files if s == split})
        for cls in classes:
            names = sorted(n for s, c, n in files if s == split and c == cls)
            if len(names) < count:
                raise SystemExit(f"{split}/{cls} has {len(names)} images, need {count}")
            chosen += [(f"{split}/{cls}/{n}", files[(split, cls, n)]) for n in names[:count]]
    return sorted(chosen)


def write_tar(members: list[tuple[str, bytes]], out: Path) -> None:
    """Write a reproducible gzip'd ustar archive (fixed mtimes, owners, gzip header)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with (
        open(out, "wb") as raw,
        gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9) as gz,
        tarfile.open(fileobj=gz, mode="w", format=tarfile.USTAR_FORMAT) as tar,
    ):
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), MTIME, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="CIFAR-10 JPEG tar (cifar10-jpg.tar.gz)")
    parser.add_argument("out", type=Path, nargs="?", default=DEFAULT_OUT, help="output tar.gz")
    args = parser.parse_args()
    members = select(read_jpegs(args.source))
    write_tar(members, args.out)
    print(f"wrote {len(members)} images to {args.out} ({args.out.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
