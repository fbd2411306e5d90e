"""jointcomp: prune and quantize a network jointly to a target size (ADMM + knapsacks)."""
from .budget import LayerBounds, parse_target
from .budget_modes import BUDGET_MODES
from .codec import CheckpointError, inspect_file, load_compressed, save_compressed
from .compressor import Compressor, CompressorConfig
from .data import Dataset, Loaders, load_dataset
from .models import build_model
from .records import EpochRecord, FinalRecord, LayerRecord, StartRecord, StepRecord
from .trainer import EngineConfig, Engine

__all__ = [
    "BUDGET_MODES", "CheckpointError", "EngineConfig", "Compressor", "CompressorConfig", "Dataset", "Engine", "EpochRecord",
    "FinalRecord", "LayerBounds", "LayerRecord", "Loaders", "StartRecord", "StepRecord", "build_model", "inspect_file",
    "load_compressed", "load_dataset", "parse_target", "save_compressed",
]
