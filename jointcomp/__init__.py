"""jointcomp: prune and quantize a network jointly to a target size (ADMM + knapsacks)."""
from .budget import LayerBounds, parse_target
from .codec import CheckpointError, inspect, load_compressed, save_compressed
from .data import Dataset, load_dataset
from .engine import CompressConfig, Engine
from .models import build_model
from .records import EpochRecord, FinalRecord, LayerRecord, StartRecord, StepRecord

__all__ = [
    "CheckpointError", "inspect", "load_compressed", "save_compressed", "CompressConfig", "Dataset", "Engine", "EpochRecord", "FinalRecord", "LayerBounds",
    "LayerRecord", "StartRecord", "StepRecord", "build_model", "load_dataset", "parse_target",
]
