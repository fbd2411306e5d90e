"""Streamlit widgets of the Compress and Sweep pages: choices, the cached dense model, the
log-scale target slider. Pages consume only records and the public jointcomp API."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import streamlit as st

from jointcomp import EngineConfig
from jointcomp.methods import METHODS, AdmmConfig
from jointcomp.budget_modes import BUDGET_MODES, MEASURED_MODES, budget_modes_help, format_amount
from jointcomp.data import Dataset, available, cache_dir, load_dataset
from jointcomp.models import CHECKPOINT_SUFFIXES, dense_epochs, fitting_checkpoints, load_start
from jointcomp.rundir import atomic_write
from jointcomp.trainer import STARTS, accuracy
from jointcomp.app.runner import WhatIfs, prepare, what_ifs

PAGES = {"pages/0_Compress.py": "Compress", "pages/1_Sweep.py": "Sweep", "pages/2_Inspect.py": "Inspect",
         "pages/3_Runs.py": "Runs"}  # the app's pages, in menu order; the first is the default
FOLDER = "image folder…"
MODELS_FOR = {"digits": ["mlp", "resnet20"], "fashion-mnist": ["lenet5", "mlp", "resnet20"], "mnist": ["lenet5", "mlp", "resnet20"],
              "cifar10": ["resnet20", "resnet32", "resnet44", "resnet56", "mlp"]}
TRAIN_HERE, UPLOAD = "train a dense model here", "upload a checkpoint…"
RATIOS = [m * 10**e for e in range(4) for m in (1, 1.5, 2, 3, 5, 7) if 2 <= m * 10**e <= 3000]
RATIOS = [int(r) for r in RATIOS]  # a log scale of round ratios: 2x, 3x, 5x, 7x, 10x, 15x ... 3000x


@dataclass
class Choices:
    model: str
    data: str
    dense_epochs: int
    config: EngineConfig
    checkpoint: str | None = None  # dense weights to start from, instead of training here


def page_menu() -> None:
    """The page menu at the top of the sidebar, drawn by every page. Streamlit's own menu is hidden
    (app.py, .streamlit/config.toml): on a server's first visit straight to a page's address it runs
    that page from pages/ without app.py, and its menu then lists 'app' beside the four pages."""
    for path, title in PAGES.items():
        st.sidebar.page_link(path, label=title)


def sidebar(with_method: bool = True) -> Choices:
    """Model, data and training settings; advanced options folded away."""
    keep_choices()
    sb = st.sidebar
    sb.header("Network and data")
    data = sb.selectbox("Data set", [*available(), FOLDER], key="data",
                        help="Fashion-MNIST appears once installed: apt-get install dataset-fashion-mnist")
    if data == FOLDER:
        path = sb.text_input("Image folder", key="folder", placeholder="/path/with/train/and/val",
                             help="torchvision's ImageFolder layout: train/<class>/*.png and val/<class>/*.png, one image size")
        data = f"folder:{path.strip()}"
    model = sb.selectbox("Model", MODELS_FOR.get(data, ["mlp", "lenet5"]), key=f"model_{data}")
    shared = published_starts(model, data)
    start = sb.selectbox("Start from", [*shared, TRAIN_HERE, UPLOAD], key=f"start_{model}_{data}",
                         help="a published checkpoint ($JOINTCOMP_MODELS) where one fits, a dense model trained here, "
                              "or your own file (.pt, .pth, .th, .safetensors)")
    checkpoint = shared.get(start)
    if start == UPLOAD:
        upload = sb.file_uploader("Checkpoint", type=[s.lstrip(".") for s in CHECKPOINT_SUFFIXES], key="checkpoint")
        if upload is not None:  # kept for this model, so the other pages start from it too
            st.session_state[f"uploaded_{model}"] = str(saved_upload(upload.name, upload.getvalue()))
        checkpoint = st.session_state.get(f"uploaded_{model}")
    sb.header("Training")
    epochs = sb.slider("Compression epochs", 1, 200, 15, key="epochs")
    lr = sb.select_slider("Learning rate", ["auto", 0.005, 0.01, 0.02, 0.05, 0.1], value="auto", key="lr",
                          help=f"auto: {EngineConfig.lr}, lowered to what the sharpness of the dense model allows")
    method, budget_mode = "admm", "paper"
    with sb.expander("Advanced"):
        pre_epochs = st.number_input("Dense pre-training epochs", 1, 200, dense_epochs(model), key=f"dense_{model}")
        begin = st.radio("Training starts from", STARTS, STARTS.index(EngineConfig.start), key="begin", horizontal=True,
                         help="dense: the weights as they are; calibrated: the weights the network keeps compressed "
                              "without training to the target (the what-if's answer), the ones it prunes as trained, "
                              "so training can still revise which to keep")
        batch = st.select_slider("Batch size", [32, 64, 128, 256], value=64, key="batch")
        seed = st.number_input("Seed", 0, 10_000, 0, key="seed")
        if with_method:
            method = st.selectbox("Method", list(METHODS), key="method",
                                  help="admm is jointcomp (trained), posttrain jointcomp without training; uniform "
                                       "and sequential are baselines")
            budget_mode = st.selectbox("Budget counts", list(BUDGET_MODES), key="budget_mode",
                                       help=budget_modes_help())
        settings = method_settings(method)
        retrain = st.slider("Retraining (fraction of the epochs)", 0.0, 0.6, EngineConfig.retrain, 0.1, key="retrain",
                            help="every method then fixes masks and bitwidths and trains the kept weights through their "
                                 "quantization, before the final phase")
        finetune = st.slider("Final phase (fraction of the epochs)", 0.0, 0.9, EngineConfig.finetune, 0.1, key="finetune",
                             help="every method trains the last part of the run in exactly the shape that ships")
        distill = st.slider("Distillation from the dense model", 0.0, 1.0, EngineConfig.distill, 0.1, key="distill",
                            help="weight of the dense model's soft targets in the loss (0 = off), for every method")
    config = EngineConfig(epochs=epochs, settings=settings, lr=EngineConfig.lr if lr == "auto" else lr, auto_lr=lr == "auto", batch_size=batch, seed=int(seed), method=method,
                            budget_mode=budget_mode if METHODS[method].measured_budgets or budget_mode not in MEASURED_MODES else "paper", retrain=retrain, finetune=finetune, distill=distill,
                            start=begin)
    return Choices(model, data, int(pre_epochs), config, checkpoint)


def method_settings(method: str) -> dict:
    """The widgets of the method's own settings (its Config's fields), and what they hold."""
    if METHODS[method].Config is AdmmConfig:
        return {"rho": st.select_slider("ρ (admm's penalty)", [0.1, 0.3, 0.5, 1.0, 2.0, 5.0, 10.0], value=AdmmConfig.rho,
                                        key="rho", help="how hard the weights are pulled towards their projection")}
    return {}


KEPT = ("data", "folder", "model_", "start_", "epochs", "rho", "lr", "dense_", "begin", "batch", "seed", "method", "budget_mode",
        "retrain", "finetune", "distill")  # the sidebar's widget keys (or their prefixes) that follow the user


def keep_choices() -> None:
    """Keep the sidebar's choices when the user moves to another page: Streamlit forgets the value
    of a widget that a page run does not draw (and a run cut short by the move may not draw it), so
    every choice is also kept under a key of its own, which Streamlit never forgets, and given back."""
    kept = st.session_state.setdefault("kept_choices", {})
    for key in list(st.session_state.keys()):
        if isinstance(key, str) and key.startswith(KEPT):
            kept[key] = st.session_state[key]
    for key, value in kept.items():
        st.session_state[key] = value


@st.cache_data(show_spinner=False)
def published_starts(model: str, data: str) -> dict[str, str]:
    """The published checkpoints ($JOINTCOMP_MODELS) whose weights fit `model` on `data`, path by file
    name (`fitting_checkpoints`). The first is the default start: picking CIFAR-10 on two CPU cores
    must not begin by training a ResNet for an hour."""
    try:
        built, _ = load_start(model, data, loaded=data_set(data))
    except (ValueError, OSError):  # a data set that cannot be read: said where it is picked
        return {}
    return {path.name: str(path) for path in fitting_checkpoints(built, model)}


def saved_upload(name: str, content: bytes) -> Path:
    """An uploaded checkpoint as a file (named by its content, so a re-upload is the same start)."""
    path = cache_dir() / "uploads" / f"{hashlib.sha256(content).hexdigest()[:16]}{Path(name).suffix}"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, content)
    return path


@st.cache_resource(show_spinner=False)
def data_set(data: str) -> Dataset:
    """The data set `data`, loaded once per server and shared by every start on it (read-only): a
    CIFAR-10 is 0.7 GB and a second of loading."""
    return load_dataset(data)


@st.cache_resource(show_spinner=False)
def dense_model(model: str, data: str, dense_epochs: int, seed: int, checkpoint: str | None = None):
    """The dense starting point of every run with these choices (read-only) and its validation
    accuracy where training measured it: trained once per server with a progress bar, or loaded
    from `checkpoint` and not scored here (`whole_set_accuracy`: a ResNet-56's score on all 10,000
    CIFAR-10 images is 14 s, and its what-ifs are scored on fewer)."""
    bar = st.progress(0.0, text=f"loading {data}…")
    try:
        return prepare(model, data, dense_epochs, seed, progress=lambda done, text: bar.progress(done, text=text),
                       checkpoint=checkpoint, score=False, loaded=data_set(data))
    finally:  # gone with a bad start's error too, not left above it
        bar.empty()


@st.cache_data(show_spinner="scoring the dense network on the whole validation set…")
def _dense_accuracy(model: str, data: str, dense_epochs: int, seed: int, checkpoint: str | None = None) -> float:
    net, dataset, score = dense_model(model, data, dense_epochs, seed, checkpoint)
    return score if score is not None else accuracy(net, dataset)


@st.cache_resource(show_spinner=False, max_entries=2)
def _what_ifs(model: str, data: str, dense_epochs: int, seed: int, checkpoint: str | None, budget_mode: str,
              calibration: int) -> WhatIfs:
    net, dataset, score = dense_model(model, data, dense_epochs, seed, checkpoint)
    config = EngineConfig(seed=seed, budget_mode=budget_mode, calibration=calibration)
    what = "calibrating the what-ifs (once per server)"  # the calibration's own reports say on how many inputs
    bar = st.progress(0.0, text=what)
    try:
        return what_ifs(net, dataset, config, model, score, lambda done, text: bar.progress(done, text=f"{what}: {text}"))
    finally:
        bar.empty()


def whatif_preview(choices: Choices) -> WhatIfs:
    """The what-ifs of the dense start of these choices (`jointcomp.app.runner.what_ifs`), calibrated
    once per server and shared by its sessions: a page reload or a second visitor does not wait for
    a ResNet-56's calibration again (the two most recent are kept). One that cannot be calibrated (an
    image folder of fewer training images than a calibration needs) is one error line, and the page
    stops there."""
    try:
        return _what_ifs(*_start(choices), choices.config.budget_mode, choices.config.calibration)
    except ValueError as err:
        st.error(f"No what-if for this start: {err}")
        st.stop()


def start_or_stop(choices: Choices):
    """The dense start of these choices (model, data, its accuracy where training measured it); a
    bad choice (a missing data set, a checkpoint that does not fit) is one error line, and the page
    stops there."""
    try:
        return dense_model(*_start(choices))
    except (ValueError, FileNotFoundError) as err:
        st.error(str(err))
        st.stop()


def whole_set_accuracy(choices: Choices) -> float:
    """The dense start's accuracy on the whole validation set (scored once per server)."""
    return _dense_accuracy(*_start(choices))


def _start(choices: Choices) -> tuple:
    return choices.model, choices.data, choices.dense_epochs, choices.config.seed, choices.checkpoint


def target_slider(dense_bits: float, budget_mode: str = "paper", key: str = "target_ratio") -> int:
    """Target as a compression ratio on a log scale, showing the equivalent amount of the budget mode."""
    return st.select_slider(
        "Target size", RATIOS, value=50, key=key,
        format_func=lambda r: f"{r}x  ({format_amount(dense_bits / r, budget_mode)})",
        help="Compression ratio against the dense model (fp32 weights; 32 x 32-bit operations in the bops budget "
             "mode); what it means is shown beside it.",
    )
