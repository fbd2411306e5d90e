"""Data sets: in-memory tensors by name (digits, bundled and the default; Fashion-MNIST,
MNIST, CIFAR-10; an image folder as "folder:PATH"), or any DataLoaders as `Loaders`.

A data set may carry its training augmentation (`Dataset.augment`, e.g. CIFAR's `CropFlip`),
which the trainer applies to each training batch on its device. Nothing is downloaded unless
the caller asks for it (`download=True`).
"""
from __future__ import annotations

import glob
import gzip
import hashlib
import io
import logging
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

from .rundir import atomic_write

log = logging.getLogger("jointcomp")

DATASETS = ("digits", "fashion-mnist", "mnist", "cifar10", "folder:PATH")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
_IDX_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "val": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_HOW_TO_GET = {
    "fashion-mnist": "install it with `apt-get install dataset-fashion-mnist`",
    "mnist": "download it once with --download (needs internet)",
    "cifar10": "download it once with --download (needs internet)",
}
CIFAR10_ARCHIVE, CIFAR10_FOLDER = "cifar10-jpeg.tar.gz", "cifar10-jpeg"  # train/<class>/*.jpg and test/<class>/*.jpg
CIFAR10_MEAN, CIFAR10_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # what the published checkpoints were trained with
MAX_IMAGE_BYTES = 1 << 20  # a member of an image archive larger than this is refused (a 32x32 JPEG is ~1 KB)


@dataclass(frozen=True)
class CropFlip:
    """Training augmentation as CIFAR practice has it: pad `pad` pixels of `fill` (per channel;
    the normalised value of black, so the pad is zero before normalisation), crop back to the
    original size at a random offset, and flip half of the images left to right. Works on a
    batch on its own device; `generator` (on the CPU) makes it repeatable."""

    pad: int = 4
    fill: tuple[float, ...] = (0.0,)

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        n, c, h, w = x.shape
        fill = torch.tensor(self.fill, dtype=x.dtype, device=x.device).expand(c).view(1, c, 1, 1)
        padded = fill.expand(n, c, h + 2 * self.pad, w + 2 * self.pad).clone()
        padded[:, :, self.pad : self.pad + h, self.pad : self.pad + w] = x
        dy, dx = (torch.randint(2 * self.pad + 1, (2, n), generator=generator)).to(x.device)
        flip = (torch.rand(n, generator=generator) < 0.5).to(x.device)
        cols = dx[:, None] + torch.arange(w, device=x.device)
        cols = torch.where(flip[:, None], cols.flip(1), cols)
        rows = dy[:, None] + torch.arange(h, device=x.device)
        batch = torch.arange(n, device=x.device)[:, None, None]
        return padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()


@dataclass
class Dataset:
    """A classification data set held in memory, already normalised."""

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    num_classes: int
    augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None  # of training batches

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train_x.shape[1:])


@dataclass
class Loaders:
    """A classification data set as iterables of (x, y) batches, e.g. torch DataLoaders
    (a DistributedSampler's epoch is set by the trainer)."""

    name: str
    train: Iterable
    val: Iterable
    num_classes: int
    input_shape: tuple[int, ...]


DESCRIPTION_KEYS = ("model", "data", "input_shape", "num_classes")  # a .jcz header's: enough to rebuild the model


def model_description(model_name: str, data: Dataset, data_dir: str | None = None) -> dict:
    """How run folders and files name a model and its data, so that both rebuild by name."""
    return {"model": model_name, "data": data.name, "data_dir": data_dir, "input_shape": list(data.input_shape),
            "num_classes": data.num_classes}


def load_dataset(name: str, data_dir: str | os.PathLike | None = None, download: bool = False) -> Dataset:
    """Load a data set by name; a missing one raises FileNotFoundError saying how to get it."""
    if name.startswith("folder:"):
        return _folder(Path(name.removeprefix("folder:")))
    if name == "digits":
        return _digits()
    if name in ("fashion-mnist", "mnist"):
        return _idx(name, _find_dir(name, data_dir), download)
    if name == "cifar10":
        return _cifar10(data_dir, download)
    raise ValueError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")


def available(data_dir: str | os.PathLike | None = None) -> list[str]:
    """The data sets that can be loaded here without downloading anything."""
    found = ["digits"]
    for name in ("fashion-mnist", "mnist"):
        root = _find_dir(name, data_dir)
        if all((root / f).is_file() for pair in _IDX_FILES.values() for f in pair):
            found.append(name)
    if _cifar10_source(data_dir) is not None:
        found.append("cifar10")
    return found


def _find_dir(name: str, data_dir: str | os.PathLike | None) -> Path:
    """--data-dir if given; else the first of $JOINTCOMP_DATA/<name>, /usr/share/datasets/<name>."""
    if data_dir:
        return Path(data_dir)
    candidates = []
    if os.environ.get("JOINTCOMP_DATA"):
        candidates.append(Path(os.environ["JOINTCOMP_DATA"]) / name)
    candidates.append(Path("/usr/share/datasets") / name)
    for path in candidates:
        if path.is_dir():
            return path
    return candidates[0]


def _normalise(train_x: torch.Tensor, val_x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale both splits by the training split's per-channel mean and std."""
    dims = [0] + list(range(2, train_x.dim()))
    mean = train_x.mean(dims, keepdim=True)
    std = train_x.std(dims, keepdim=True).clamp(min=1e-6)
    return (train_x - mean) / std, (val_x - mean) / std


def _digits() -> Dataset:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(bunch.target, dtype=torch.long)
    train_idx, val_idx = train_test_split(
        torch.arange(len(y)).numpy(), test_size=0.2, random_state=0, stratify=y.numpy()
    )
    train_x, val_x = _normalise(x[train_idx], x[val_idx])
    return Dataset("digits", train_x, y[train_idx], val_x, y[val_idx], 10)


def _read_idx(path: Path) -> torch.Tensor:
    """Read one IDX .gz file (the MNIST format) into a uint8 tensor."""
    try:
        raw = gzip.open(path, "rb").read()
    except (OSError, EOFError) as err:
        raise ValueError(f"{path} is not a readable gzip IDX file ({err}); re-download it") from err
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file; re-download it")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    expected = offset + int(torch.Size(dims).numel())
    if len(raw) != expected:
        raise ValueError(f"{path} holds {len(raw)} bytes, expected {expected}; re-download it")
    return torch.frombuffer(bytearray(raw[offset:]), dtype=torch.uint8).view(*dims)


def _idx(name: str, root: Path, download: bool) -> Dataset:
    missing = [f for pair in _IDX_FILES.values() for f in pair if not (root / f).is_file()]
    if missing and download:
        import torchvision

        cls = torchvision.datasets.FashionMNIST if name == "fashion-mnist" else torchvision.datasets.MNIST
        ds = cls(str(root), train=True, download=True)
        root = Path(ds.raw_folder)
        missing = [f for pair in _IDX_FILES.values() for f in pair if not (root / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{name} not found in {root} (missing {missing[0]}); {_HOW_TO_GET[name]}, "
            "or point --data-dir / $JOINTCOMP_DATA at a folder with the IDX .gz files"
        )
    split = {}
    for part, (images, labels) in _IDX_FILES.items():
        x = _read_idx(root / images).float().unsqueeze(1) / 255.0
        y = _read_idx(root / labels).long()
        if len(x) != len(y):
            raise ValueError(f"{root}: {images} and {labels} disagree on the number of examples")
        split[part] = (x, y)
    train_x, val_x = _normalise(split["train"][0], split["val"][0])
    return Dataset(name, train_x, split["train"][1], val_x, split["val"][1], 10)


def _cifar10_source(data_dir: str | os.PathLike | None) -> Path | None:
    """Where CIFAR-10 is: the JPEG archive, its unpacked folder, or torchvision's
    cifar-10-batches-py, in --data-dir, else $JOINTCOMP_DATA (or its cifar10/), else
    /usr/share/datasets/cifar10."""
    env = os.environ.get("JOINTCOMP_DATA")
    roots = [Path(data_dir)] if data_dir else [*([Path(env), Path(env) / "cifar10"] if env else []),
                                              Path("/usr/share/datasets/cifar10")]
    for root in roots:
        for name in (CIFAR10_ARCHIVE, CIFAR10_FOLDER, "cifar-10-batches-py"):
            if (root / name).exists():
                return root / name
    return None


def _cifar10(data_dir: str | os.PathLike | None, download: bool) -> Dataset:
    source = _cifar10_source(data_dir)
    if source is None and download:
        import torchvision

        root = Path(data_dir or os.environ.get("JOINTCOMP_DATA") or "data") / "cifar10"
        torchvision.datasets.CIFAR10(str(root), train=True, download=True)
        torchvision.datasets.CIFAR10(str(root), train=False, download=True)
        source = root / "cifar-10-batches-py"
    if source is None:
        where = data_dir or os.environ.get("JOINTCOMP_DATA") or "/usr/share/datasets/cifar10"
        raise FileNotFoundError(
            f"cifar10 not found in {where} (no {CIFAR10_ARCHIVE}, {CIFAR10_FOLDER}/ or cifar-10-batches-py/); "
            f"{_HOW_TO_GET['cifar10']}, or point --data-dir / $JOINTCOMP_DATA at a folder holding one of them")
    if source.name == "cifar-10-batches-py":
        import torchvision

        splits = [torchvision.datasets.CIFAR10(str(source.parent), train=t) for t in (True, False)]
        (tx, ty), (vx, vy) = [(torch.tensor(d.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(d.targets))
                              for d in splits]
    else:
        tx, ty, vx, vy = _cached_images(source)
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    norm = lambda x: (x.float() / 255.0 - mean) / std  # noqa: E731
    fill = tuple(((0.0 - torch.tensor(CIFAR10_MEAN)) / torch.tensor(CIFAR10_STD)).tolist())
    return Dataset("cifar10", norm(tx), ty.long(), norm(vx), vy.long(), 10, augment=CropFlip(4, fill))


def cache_dir() -> Path:
    """Where decoded data sets are kept: $JOINTCOMP_CACHE, else ~/.cache/jointcomp."""
    return Path(os.environ.get("JOINTCOMP_CACHE") or Path.home() / ".cache" / "jointcomp")


def _cached_images(source: Path) -> tuple[torch.Tensor, ...]:
    """The train and test images (uint8, N x C x H x W) and labels of an ImageFolder-style
    archive or folder, decoded once and kept as a safetensors file in `cache_dir()`: one file per
    source path, holding the size and time of the source it was decoded from, and decoded again
    (replaced, not kept beside) when the source changes; earlier versions' files of it are removed.
    A cache that cannot be written only costs the decoding."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save

    stat = source.stat()
    made_from = f"{stat.st_size} bytes, modified {stat.st_mtime_ns} ns"
    key = hashlib.sha256(str(source.resolve()).encode()).hexdigest()[:16]
    cached = cache_dir() / f"{source.name.split('.')[0]}-{key}.safetensors"
    _remove_earlier_caches(cached)
    if cached.is_file():
        try:
            with safe_open(str(cached), "pt") as f:
                current = (f.metadata() or {}).get("source") == made_from
            if current:
                t = load_file(str(cached))
                return t["train_x"], t["train_y"], t["test_x"], t["test_y"]
        except Exception:  # damaged or foreign: decode again
            log.info("%s: unreadable cache, decoding %s again", cached, source)
    members = _archive_images(source) if source.is_file() else _folder_images(source)
    split = _decode(members, source)
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(cached, save(split, metadata={"source": made_from}))
    except OSError as err:
        log.info("cannot cache the decoded images in %s (%s); set $JOINTCOMP_CACHE", cached.parent, err)
    return split["train_x"], split["train_y"], split["test_x"], split["test_y"]


def _remove_earlier_caches(kept: Path) -> None:
    """Delete the decoded-image files that jointcomp versions before one file per source wrote
    beside `kept` (named as it is, with a key of the source's path, size and time, and no "source"
    in their metadata): nothing reads them any more, and a CIFAR-10 one is 184 MB. Files with that
    metadata are other sources' caches, and stay; so does anything that cannot be read."""
    from safetensors import safe_open

    stem = glob.escape(kept.name.rsplit("-", 1)[0])
    for path in kept.parent.glob(f"{stem}-{'[0-9a-f]' * 16}.safetensors"):
        if path == kept:
            continue
        try:
            with safe_open(str(path), "pt") as f:
                earlier = "source" not in (f.metadata() or {})
            if earlier:
                size = path.stat().st_size
                path.unlink()
                log.info("removed %s (%.0f MB): images decoded by an earlier jointcomp, which this one does not read",
                         path, size / 1e6)
        except Exception:  # unreadable or gone: not this function's to judge
            continue


_MEMBER = re.compile(r"(?:^|/)(train|test|val)/([^/]+)/[^/]+$")


def _archive_images(path: Path) -> Iterator[tuple[str, str, bytes]]:
    """(split, class, bytes) of every image in a .tar(.gz) laid out as */split/class/file."""
    try:
        with tarfile.open(path) as tar:
            for member in tar:
                match = _MEMBER.search(member.name)
                if not member.isfile() or not match or not member.name.lower().endswith(IMAGE_SUFFIXES):
                    continue
                if member.size > MAX_IMAGE_BYTES:
                    raise ValueError(f"{path}: {member.name} is {member.size} bytes, too large for an image")
                yield match.group(1), match.group(2), tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError) as err:
        raise ValueError(f"{path} is not a readable image archive ({err}); download it again") from None


def _folder_images(root: Path) -> Iterator[tuple[str, str, bytes]]:
    for path in sorted(root.glob("*/*/*")):
        match = _MEMBER.search(path.relative_to(root).as_posix())
        if match and path.suffix.lower() in IMAGE_SUFFIXES and path.stat().st_size <= MAX_IMAGE_BYTES:
            yield match.group(1), match.group(2), path.read_bytes()


def _decode(members: Iterable[tuple[str, str, bytes]], source: Path) -> dict[str, torch.Tensor]:
    import numpy as np
    from PIL import Image

    images: dict[str, list] = {"train": [], "test": []}
    for split, label, data in members:
        try:
            with Image.open(io.BytesIO(data)) as img:
                images["train" if split == "train" else "test"].append((label, np.asarray(img.convert("RGB"))))
        except OSError as err:
            raise ValueError(f"{source}: an image of class {label!r} cannot be decoded ({err})") from None
    classes = sorted({label for part in images.values() for label, _ in part})
    if not images["train"] or not images["test"] or len(classes) < 2:
        raise ValueError(f"{source} needs train/<class>/ and test/<class>/ images of at least two classes")
    index = {c: i for i, c in enumerate(classes)}
    out = {}
    for part, found in images.items():
        out[f"{part}_x"] = torch.from_numpy(np.stack([a for _, a in found])).permute(0, 3, 1, 2).contiguous()
        out[f"{part}_y"] = torch.tensor([index[label] for label, _ in found], dtype=torch.uint8)
    return out


def _folder(root: Path) -> Dataset:
    """An image folder in torchvision's ImageFolder layout, `train/<class>/*.png` and
    `val/<class>/*.png` (or `test/`), read into memory: grey if every image is, else RGB;
    all images must have one size."""
    import numpy as np
    from PIL import Image

    val = "val" if (root / "val").is_dir() else "test"
    if not (root / "train").is_dir() or not (root / val).is_dir():
        raise FileNotFoundError(f"{root} needs train/ and val/ (or test/) folders with one sub-folder of images per class")
    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    if len(classes) < 2:
        raise ValueError(f"{root}/train needs at least two class folders, found {len(classes)}")
    files = {part: [(f, y) for y, c in enumerate(classes) for f in sorted((root / part / c).glob("*"))
                    if f.suffix.lower() in IMAGE_SUFFIXES] for part in ("train", val)}
    for part, found in files.items():
        if not found:
            raise FileNotFoundError(f"{root}/{part} holds no images in its class folders ({', '.join(classes)})")
    images = {}
    for part, found in files.items():
        arrays = []
        for path, _ in found:
            try:
                with Image.open(path) as img:
                    arrays.append(img.convert("RGB") if img.mode not in ("L", "1") else img.convert("L"))
            except OSError as err:
                raise ValueError(f"{path} is not a readable image ({err}); remove or replace it") from None
        images[part] = arrays
    every = images["train"] + images[val]
    mode = "L" if all(img.mode == "L" for img in every) else "RGB"
    size = every[0].size
    odd = next(((img, f) for img, (f, _) in zip(every, files["train"] + files[val]) if img.size != size), None)
    if odd:
        raise ValueError(f"{odd[1]} is {odd[0].size[0]}x{odd[0].size[1]} but the first image is {size[0]}x{size[1]}; "
                         "resize the images to one size")

    def tensors(part: str) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.tensor(np.stack([np.asarray(img.convert(mode), dtype=np.float32) for img in images[part]])) / 255.0
        x = x.unsqueeze(1) if mode == "L" else x.permute(0, 3, 1, 2)
        return x, torch.tensor([y for _, y in files[part]], dtype=torch.long)

    (tx, ty), (vx, vy) = tensors("train"), tensors(val)
    tx, vx = _normalise(tx, vx)
    return Dataset(f"folder:{root}", tx, ty, vx, vy, len(classes))
