"""Streamlit widgets shared by app.py and the pages: choices, the cached dense model, the
log-scale target slider. Pages consume only records and the public jointcomp API."""
from __future__ import annotations

from dataclasses import dataclass

import streamlit as st

from jointcomp import CompressConfig
from jointcomp.methods import METHODS
from jointcomp.budget import format_bits
from jointcomp.compressor import BUDGET_MODES, BUDGET_MODES_HELP
from jointcomp.data import available
from jointcomp.models import dense_epochs
from jointcomp.runner import prepare

FOLDER = "image folder…"
MODELS_FOR = {"digits": ["mlp"], "fashion-mnist": ["lenet5", "mlp"], "mnist": ["lenet5", "mlp"], "cifar10": ["resnet20", "mlp"]}
RATIOS = [m * 10**e for e in range(4) for m in (1, 1.5, 2, 3, 5, 7) if 2 <= m * 10**e <= 3000]
RATIOS = [int(r) for r in RATIOS]  # a log scale of round ratios: 2x, 3x, 5x, 7x, 10x, 15x ... 3000x


@dataclass
class Choices:
    model: str
    data: str
    dense_epochs: int
    config: CompressConfig


def sidebar(with_method: bool = True) -> Choices:
    """Model, data and training settings; advanced options folded away."""
    sb = st.sidebar
    sb.header("Network and data")
    data = sb.selectbox("Data set", [*available(), FOLDER], key="data",
                        help="Fashion-MNIST appears once installed: apt-get install dataset-fashion-mnist")
    if data == FOLDER:
        path = sb.text_input("Image folder", key="folder", placeholder="/path/with/train/and/val",
                             help="torchvision's ImageFolder layout: train/<class>/*.png and val/<class>/*.png, one image size")
        data = f"folder:{path.strip()}"
    model = sb.selectbox("Model", MODELS_FOR.get(data, ["mlp", "lenet5"]), key=f"model_{data}")
    sb.header("Training")
    epochs = sb.slider("Compression epochs", 1, 200, 15, key="epochs")
    rho = sb.select_slider("ρ (ADMM penalty)", [0.1, 0.3, 0.5, 1.0, 2.0, 5.0, 10.0], value=2.0, key="rho")
    lr = sb.select_slider("Learning rate", ["auto", 0.005, 0.01, 0.02, 0.05, 0.1], value="auto", key="lr",
                          help=f"auto: {CompressConfig.lr}, lowered to what the sharpness of the dense model allows")
    method, budget_mode = "admm", "paper"
    with sb.expander("Advanced"):
        pre_epochs = st.number_input("Dense pre-training epochs", 1, 200, dense_epochs(model), key=f"dense_{model}")
        batch = st.select_slider("Batch size", [32, 64, 128, 256], value=64, key="batch")
        seed = st.number_input("Seed", 0, 10_000, 0, key="seed")
        if with_method:
            method = st.selectbox("Method", list(METHODS), key="method",
                                  help="admm is jointcomp; the others are baselines")
            budget_mode = st.selectbox("Budget counts", list(BUDGET_MODES), key="budget_mode",
                                       help=BUDGET_MODES_HELP)
        retrain = st.slider("Retraining (fraction of the epochs)", 0.0, 0.6, CompressConfig.retrain, 0.1, key="retrain",
                            help="every method then fixes masks and bitwidths and trains the kept weights through their "
                                 "quantization, before the final phase")
        finetune = st.slider("Final phase (fraction of the epochs)", 0.0, 0.9, CompressConfig.finetune, 0.1, key="finetune",
                             help="every method trains the last part of the run in exactly the shape that ships")
        distill = st.slider("Distillation from the dense model", 0.0, 1.0, CompressConfig.distill, 0.1, key="distill",
                            help="weight of the dense model's soft targets in the loss (0 = off), for every method")
    config = CompressConfig(epochs=epochs, rho=rho, lr=CompressConfig.lr if lr == "auto" else lr, auto_lr=lr == "auto", batch_size=batch, seed=int(seed), method=method,
                            budget_mode=budget_mode if method == "admm" else "paper", retrain=retrain, finetune=finetune, distill=distill)
    return Choices(model, data, int(pre_epochs), config)


@st.cache_resource(show_spinner=False)
def dense_model(model: str, data: str, dense_epochs: int, seed: int):
    """The dense-trained starting point of every run with these choices (read-only), with a
    progress bar while it trains (once per server)."""
    bar = st.progress(0.0, text=f"loading {data}…")
    result = prepare(model, data, dense_epochs, seed, progress=lambda done, text: bar.progress(done, text=text))
    bar.empty()
    return result


def target_slider(dense_bits: float, key: str = "target_ratio") -> int:
    """Target as a compression ratio on a log scale, showing the equivalent size."""
    return st.select_slider(
        "Target size", RATIOS, value=50, key=key,
        format_func=lambda r: f"{r}x  ({format_bits(dense_bits / r)})",
        help="Compression ratio against the fp32 weights; the size it means is shown beside it.",
    )
