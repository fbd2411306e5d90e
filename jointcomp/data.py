"""Data sets: in-memory tensors by name (digits, bundled and the default; Fashion-MNIST,
MNIST, CIFAR-10; an image folder as "folder:PATH"), or any DataLoaders as `Loaders`.

Nothing is downloaded unless the caller asks for it (`download=True`).
"""
from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch

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


@dataclass
class Dataset:
    """A classification data set held in memory, already normalised."""

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    num_classes: int

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


def load_dataset(name: str, data_dir: str | os.PathLike | None = None, download: bool = False) -> Dataset:
    """Load a data set by name; a missing one raises FileNotFoundError saying how to get it."""
    if name.startswith("folder:"):
        return _folder(Path(name.removeprefix("folder:")))
    if name == "digits":
        return _digits()
    if name in ("fashion-mnist", "mnist"):
        return _idx(name, _find_dir(name, data_dir), download)
    if name == "cifar10":
        return _cifar10(_find_dir(name, data_dir), download)
    raise ValueError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")


def available(data_dir: str | os.PathLike | None = None) -> list[str]:
    """The data sets that can be loaded here without downloading anything."""
    found = ["digits"]
    for name in ("fashion-mnist", "mnist"):
        root = _find_dir(name, data_dir)
        if all((root / f).is_file() for pair in _IDX_FILES.values() for f in pair):
            found.append(name)
    if (_find_dir("cifar10", data_dir) / "cifar-10-batches-py").is_dir():
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


def _cifar10(root: Path, download: bool) -> Dataset:
    import torchvision

    try:
        train = torchvision.datasets.CIFAR10(str(root), train=True, download=download)
        val = torchvision.datasets.CIFAR10(str(root), train=False, download=download)
    except RuntimeError as err:
        raise FileNotFoundError(
            f"cifar10 not found in {root}; {_HOW_TO_GET['cifar10']}, or point --data-dir at "
            "a folder holding cifar-10-batches-py"
        ) from err

    def tensors(ds) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.tensor(ds.data).permute(0, 3, 1, 2).float() / 255.0
        return x, torch.tensor(ds.targets, dtype=torch.long)

    (tx, ty), (vx, vy) = tensors(train), tensors(val)
    tx, vx = _normalise(tx, vx)
    return Dataset("cifar10", tx, ty, vx, vy, 10)


def _folder(root: Path) -> Dataset:
    """An image folder in torchvision's ImageFolder layout, `train/<class>/*.png` and
    `val/<class>/*.png`, read into memory: grey if every image is, else RGB; all images
    must have one size."""
    import numpy as np
    from PIL import Image

    if not (root / "train").is_dir() or not (root / "val").is_dir():
        raise FileNotFoundError(f"{root} needs train/ and val/ folders with one sub-folder of images per class")
    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    if len(classes) < 2:
        raise ValueError(f"{root}/train needs at least two class folders, found {len(classes)}")
    files = {part: [(f, y) for y, c in enumerate(classes) for f in sorted((root / part / c).glob("*"))
                    if f.suffix.lower() in IMAGE_SUFFIXES] for part in ("train", "val")}
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
    every = images["train"] + images["val"]
    mode = "L" if all(img.mode == "L" for img in every) else "RGB"
    size = every[0].size
    odd = next(((img, f) for img, (f, _) in zip(every, files["train"] + files["val"]) if img.size != size), None)
    if odd:
        raise ValueError(f"{odd[1]} is {odd[0].size[0]}x{odd[0].size[1]} but the first image is {size[0]}x{size[1]}; "
                         "resize the images to one size")

    def tensors(part: str) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.tensor(np.stack([np.asarray(img.convert(mode), dtype=np.float32) for img in images[part]])) / 255.0
        x = x.unsqueeze(1) if mode == "L" else x.permute(0, 3, 1, 2)
        return x, torch.tensor([y for _, y in files[part]], dtype=torch.long)

    (tx, ty), (vx, vy) = tensors("train"), tensors("val")
    tx, vx = _normalise(tx, vx)
    return Dataset(f"folder:{root}", tx, ty, vx, vy, len(classes))
