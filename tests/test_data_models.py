import gzip
import struct

import pytest
import torch

from jointcomp import build_model, load_dataset


def write_idx(path, array: torch.Tensor) -> None:
    header = bytes([0, 0, 0x08, array.dim()]) + b"".join(struct.pack(">I", d) for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.to(torch.uint8).numpy().tobytes())


def make_idx_folder(root, n_train=30, n_val=10):
    g = torch.Generator().manual_seed(0)
    write_idx(root / "train-images-idx3-ubyte.gz", torch.randint(0, 256, (n_train, 28, 28), generator=g))
    write_idx(root / "train-labels-idx1-ubyte.gz", torch.randint(0, 10, (n_train,), generator=g))
    write_idx(root / "t10k-images-idx3-ubyte.gz", torch.randint(0, 256, (n_val, 28, 28), generator=g))
    write_idx(root / "t10k-labels-idx1-ubyte.gz", torch.randint(0, 10, (n_val,), generator=g))


def test_digits_split_is_deterministic_and_disjoint(digits):
    again = load_dataset("digits")
    assert torch.equal(digits.train_x, again.train_x) and torch.equal(digits.val_y, again.val_y)
    assert len(digits.train_y) + len(digits.val_y) == 1797
    assert digits.input_shape == (1, 8, 8) and digits.num_classes == 10


def test_idx_files_from_a_folder(tmp_path):
    make_idx_folder(tmp_path)
    data = load_dataset("mnist", data_dir=tmp_path)
    assert data.train_x.shape == (30, 1, 28, 28) and data.val_x.shape == (10, 1, 28, 28)
    assert abs(float(data.train_x.mean())) < 1e-4  # normalised by the training split


def test_missing_data_set_says_how_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist", data_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="--download"):
        load_dataset("mnist", data_dir=tmp_path)


def test_corrupt_idx_file_is_reported(tmp_path):
    make_idx_folder(tmp_path)
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(b"not a gzip file")
    with pytest.raises(ValueError, match="re-download"):
        load_dataset("mnist", data_dir=tmp_path)


def test_unknown_names():
    with pytest.raises(ValueError, match="unknown data set"):
        load_dataset("imagenet")
    with pytest.raises(ValueError, match="unknown model"):
        build_model("vgg99", (1, 8, 8), 10)
    with pytest.raises(ValueError, match="cannot load model factory"):
        build_model("no_such_module:make", (1, 8, 8), 10)


def test_lenet5_is_the_papers_and_needs_28x28():
    model = build_model("lenet5", (1, 28, 28), 10)
    weights = sum(m.weight.numel() for m in model.modules() if hasattr(m, "weight") and m.weight is not None)
    assert weights == 430_500
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    with pytest.raises(ValueError, match="28x28"):
        build_model("lenet5", (1, 8, 8), 10)


def test_resnet20_and_torchvision_and_user_factory():
    assert build_model("resnet20", (3, 32, 32), 10)(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    assert build_model("torchvision:resnet18", (3, 32, 32), 7)(torch.zeros(2, 3, 32, 32)).shape == (2, 7)
    model = build_model("jointcomp.models:mlp", (1, 8, 8), 10)
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 10)


def test_tied_weights_save_and_load_as_one_tensor(tmp_path):
    """A model whose head reads out with its embedding's tensor (a GPT's) saves to safetensors, which
    refuses shared memory, and loads back with the two still one tensor."""
    from jointcomp.models import load_weights, save_weights

    def tied() -> torch.nn.Module:
        model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10, bias=False))
        model[1].weight = model[0].weight
        return model

    torch.manual_seed(0)
    model = tied()
    save_weights(model, tmp_path / "tied.safetensors")
    loaded = load_weights(tied(), tmp_path / "tied.safetensors")
    assert loaded[1].weight is loaded[0].weight
    assert torch.equal(loaded[0].weight, model[0].weight)
