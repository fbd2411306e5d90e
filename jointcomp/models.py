"""Built-in networks, torchvision models and users' own factories, by name.

Names: "mlp", "lenet5" (Caffe LeNet-5 of the paper's experiments), "resnet20", "resnet32",
"resnet44", "resnet56" (He et al.'s CIFAR ResNets with parameter-free "option A" shortcuts and
the module names of the published CIFAR-10 checkpoints, so those load as they are),
"torchvision:<name>", or "package.module:factory".
"""
from __future__ import annotations

import copy
import importlib
import inspect
import logging
import math
import os
import pickle
from pathlib import Path

import torch
from torch import nn

from .data import Dataset, load_dataset
from .rundir import DENSE_FILE, atomic_write

RESNET_DEPTHS = {"resnet20": 20, "resnet32": 32, "resnet44": 44, "resnet56": 56}
BUILTIN = ("mlp", "lenet5", *RESNET_DEPTHS)
_DENSE_EPOCHS = {"mlp": 20, "lenet5": 10, **{name: 30 for name in RESNET_DEPTHS}}


def dense_epochs(name: str) -> int:
    """Epochs of dense training from scratch for a model by name (CLI and app alike)."""
    return _DENSE_EPOCHS.get(name, 10)
log = logging.getLogger("jointcomp")


def mlp(input_shape: tuple[int, ...], num_classes: int, hidden: tuple[int, ...] = (256, 128)) -> nn.Module:
    """A small fully connected network (the digits default)."""
    sizes = [math.prod(input_shape), *hidden]
    layers: list[nn.Module] = [nn.Flatten()]
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    layers.append(nn.Linear(sizes[-1], num_classes))
    return nn.Sequential(*layers)


def lenet5(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Caffe LeNet-5: no ReLU after the convolutions; 430,500 weights on 28x28 input."""
    if tuple(input_shape[1:]) != (28, 28):
        raise ValueError(
            f"lenet5 needs 28x28 images, this data set has {input_shape}; "
            "use --data fashion-mnist or mnist, or --model mlp"
        )
    return nn.Sequential(
        nn.Conv2d(input_shape[0], 20, 5), nn.MaxPool2d(2),
        nn.Conv2d(20, 50, 5), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(800, 500), nn.ReLU(), nn.Linear(500, num_classes),
    )


class ShortcutA(nn.Module):
    """The parameter-free shortcut of He et al.'s CIFAR ResNets ("option A") where a block
    halves the map and widens it: the input subsampled by 2 in both spatial dimensions and
    zero-padded with `pad` channels on each side."""

    def __init__(self, pad: int) -> None:
        super().__init__()
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class BasicBlock(nn.Module):
    """conv3x3 (stride s) -> BN -> ReLU -> conv3x3 -> BN, plus the shortcut, then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = ShortcutA((cout - cin) // 2) if stride != 1 or cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 images (He et al. 2016, section 4.2): a 3x3 stem with 16
    channels, three stages of n blocks with 16, 32 and 64 channels (the first block of the
    second and third halves the map), global average pooling, one Linear layer. Module names
    are those of the published CIFAR-10 checkpoints (conv1, bn1, layer1.0.conv1, ..., linear)."""

    def __init__(self, depth: int, input_shape: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"a CIFAR ResNet has depth 6n+2 (20, 32, 44, 56, ...), not {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(input_shape[0], 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        stages, cin = [], 16
        for cout, stride in ((16, 1), (32, 2), (64, 2)):
            stages.append(nn.Sequential(*[BasicBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1) for i in range(n)]))
            cin = cout
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.linear = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.linear(self.flatten(self.pool(x)))


def resnet20(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    return CifarResNet(20, input_shape, num_classes)


def resnet32(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    return CifarResNet(32, input_shape, num_classes)


def resnet44(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    return CifarResNet(44, input_shape, num_classes)


def resnet56(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    return CifarResNet(56, input_shape, num_classes)


def check_model_name(name: str) -> str:
    """What kind of model a name is ("builtin", "torchvision" or "import"); ValueError for
    names that are neither a built-in, a torchvision classification model nor module:factory."""
    if name in BUILTIN:
        return "builtin"
    if name.startswith("torchvision:"):
        arch = name.split(":", 1)[1]
        if arch not in torchvision_classifiers():
            raise ValueError(
                f"{name!r} is not a torchvision classification model; "
                "see torchvision.models.list_models(module=torchvision.models)"
            )
        return "torchvision"
    module_name, _, attr = name.partition(":")
    if module_name and attr.isidentifier() and all(p.isidentifier() for p in module_name.split(".")):
        return "import"
    raise ValueError(
        f"unknown model {name!r}; choose {', '.join(BUILTIN)}, torchvision:<name> or package.module:factory"
    )


def torchvision_classifiers() -> list[str]:
    """torchvision's image classification models (no detection, segmentation or video:
    those build backbones with pretrained weights and take other inputs)."""
    import torchvision

    return torchvision.models.list_models(module=torchvision.models)


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Build a model by name for data of this shape and number of classes (no pretrained
    weights are ever fetched)."""
    kind = check_model_name(name)
    if kind == "builtin":
        return globals()[name](tuple(input_shape), num_classes)
    if kind == "torchvision":
        import torchvision

        model = torchvision.models.get_model(name.split(":", 1)[1], weights=None, num_classes=num_classes)
        return _adapt_input_channels(model, name, input_shape[0])
    return _user_factory(name, tuple(input_shape), num_classes)


def _adapt_input_channels(model: nn.Module, name: str, channels: int) -> nn.Module:
    """Give the first convolution `channels` inputs (torchvision's models expect RGB)."""
    path, first = next(((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)), (None, None))
    if first is None or first.in_channels == channels:
        return model
    if first.groups != 1:
        raise ValueError(f"{name} cannot take {channels}-channel images (its first convolution is grouped)")
    parent_name, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_name)
    setattr(parent, attr, nn.Conv2d(
        channels, first.out_channels, first.kernel_size, first.stride, first.padding,
        first.dilation, bias=first.bias is not None, padding_mode=first.padding_mode,
    ))
    log.info("%s: first convolution %s adapted from %d to %d input channels", name, path, first.in_channels, channels)
    return model


def _user_factory(name: str, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Call `module.path:factory`, passing input_shape / num_classes if it takes them."""
    module_name, _, attr = name.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except Exception as err:  # importing user code can raise anything
        raise ValueError(f"cannot load model factory {name!r}: {type(err).__name__}: {err}") from None
    if not callable(factory):
        raise ValueError(f"{name!r} is not a callable model factory")
    try:
        params = inspect.signature(factory).parameters
        kwargs = {k: v for k, v in (("input_shape", input_shape), ("num_classes", num_classes)) if k in params}
        model = factory(**kwargs)
    except Exception as err:
        raise ValueError(f"model factory {name!r} failed: {type(err).__name__}: {err}") from None
    if not isinstance(model, nn.Module):
        raise ValueError(f"model factory {name!r} returned {type(model).__name__}, not an nn.Module")
    return model


def save_weights(model: nn.Module, path: str | os.PathLike) -> None:
    """Save a model's state dict as safetensors, atomically. Tied weights (a GPT's embedding and head)
    are written under each name: safetensors refuses tensors that share memory."""
    from safetensors.torch import save

    state = {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}
    atomic_write(path, save(state))


CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".th", ".bin")


def published_checkpoints(model_name: str, folder: str | os.PathLike | None = None) -> list[Path]:
    """Checkpoint files for `model_name` in `folder` (default $JOINTCOMP_MODELS): those named
    "<model>-<anything>" with a checkpoint suffix, as the published CIFAR ResNets are."""
    folder = folder or os.environ.get("JOINTCOMP_MODELS")
    if not folder or not Path(folder).is_dir():
        return []
    return sorted(p for p in Path(folder).iterdir()
                  if p.is_file() and p.name.startswith(f"{model_name}-") and p.suffix in CHECKPOINT_SUFFIXES)


def fitting_checkpoints(model: nn.Module, model_name: str, folder: str | os.PathLike | None = None) -> list[Path]:
    """The `published_checkpoints` of `model_name` whose weights load into `model` as built for its
    data (the CIFAR ResNets fit CIFAR-10 only); `model` is not changed."""
    found = []
    for path in published_checkpoints(model_name, folder):
        try:
            load_weights(copy.deepcopy(model), path)
        except (ValueError, OSError):
            continue
        found.append(path)
    return found


OPTIONAL_BUFFERS = ("num_batches_tracked",)  # older checkpoints lack BatchNorm's step counter


def load_weights(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load dense weights into `model`: a `train` run folder, a .safetensors file, or a
    torch.save'd file (.pt, .pth, .th; read with weights_only=True, so nothing is unpickled
    but tensors) holding a state dict, or a dict with one under "state_dict" or "model" (as
    published checkpoints do). A "module." prefix (DataParallel's) is stripped. Keys that are
    missing or unexpected, or shapes that differ, are one ValueError naming the first few."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_dir():
        path = path / DENSE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no pretrained weights at {path}; pass a {'/'.join(CHECKPOINT_SUFFIXES)} file or a "
                                "`train` run folder")
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ValueError(
            f"{path} is not a plain state dict (it holds pickled objects); save it with "
            "torch.save(model.state_dict(), path) or as .safetensors"
        ) from None
    except (SafetensorError, RuntimeError, OSError, EOFError, ValueError, IndexError, KeyError, TypeError,
            AttributeError, UnicodeDecodeError) as err:  # a damaged or foreign file fails deep in torch's unpickler
        why = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ValueError(f"cannot read pretrained weights {path}: it is damaged or not a checkpoint ({why}); give a "
                         f"{'/'.join(CHECKPOINT_SUFFIXES)} file written by torch.save or safetensors") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a state dict (a dict of tensors, or one under 'state_dict' or 'model')")
    if all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.endswith(OPTIONAL_BUFFERS)]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} is {list(state[k].shape)} in the file but {list(own[k].shape)} in the model"
              for k in own if k in state and state[k].shape != own[k].shape]
    problems = [f"{what} {', '.join(keys[:3])}{f' (and {len(keys) - 3} more)' if len(keys) > 3 else ''}"
                for what, keys in (("missing", missing), ("unexpected", unexpected)) if keys] + shapes[:2]
    if problems:
        raise ValueError(f"{path} does not fit this model: {'; '.join(problems)}; was it trained with another --model?")
    broken = [k for k, v in state.items() if v.is_floating_point() and not bool(v.float().square().isfinite().all())]
    if broken:
        raise ValueError(f"{path} holds weights that are NaN, infinite or too large to square in float32 in "
                         f"{', '.join(broken[:3])}: the file is damaged, or was saved from a run that diverged; give a good "
                         "checkpoint")
    model.load_state_dict({**{k: v for k, v in own.items() if k not in state}, **state})
    return model


def load_start(model_name: str, data_name: str, *, data_dir: str | None = None, download: bool = False, seed: int = 0,
               pretrained: str | os.PathLike | None = None, loaded: Dataset | None = None) -> tuple[nn.Module, Dataset]:
    """The start of every run (the CLI's, the app's, the bench's): the data set (`loaded` where the
    caller holds it already: the app keeps one per server), the model built by name from `seed`, and
    its dense weights when `pretrained` is given. The one place a bad start (a data set that is
    missing, a checkpoint that is damaged or does not fit) is refused in one line."""
    data = loaded if loaded is not None else load_dataset(data_name, data_dir, download)
    torch.manual_seed(seed)
    model = build_model(model_name, data.input_shape, data.num_classes)
    if pretrained:
        load_weights(model, pretrained)
    return model, data
