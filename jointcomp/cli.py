"""The command line: `python -m jointcomp {train,compress,export,export-c,export-onnx,inspect,evaluate,decompress}`."""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys

import torch
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from . import distributed
from .allocator import keep_freed_blocks
from .codec import CheckpointError, Report, inspect_file, load_compressed
from .budget_modes import BUDGET_MODES, budget_modes_help
from .data import DATASETS, DESCRIPTION_KEYS, load_dataset, model_description
from .deploy.c import export_c, flash_report
from .deploy.onnx import export_onnx
from .methods import METHODS, AdmmConfig
from .models import dense_epochs, fitting_checkpoints, load_start, save_weights
from .trainer import STARTS, EngineConfig, Engine, accuracy, first_batch_stable_lr, train_dense
from .records import EpochRecord, FinalRecord, Record, StartRecord
from .rundir import DENSE_FILE, RunDir, write_json


def _data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="digits",
                   help=f"data set: {', '.join(DATASETS)} (an ImageFolder layout with train/ and val/; default digits)")
    p.add_argument("--data-dir", help="folder with the data set's files")
    p.add_argument("--download", action="store_true", help="download the data set if missing (needs internet)")


def _train_args(p: argparse.ArgumentParser, out_required: bool) -> None:
    defaults = EngineConfig()
    p.add_argument("--model", default="mlp", help="mlp, lenet5, resnet20, torchvision:<name> or module:factory")
    _data_args(p)
    p.add_argument("--lr", type=float, default=defaults.lr,
                   help=f"peak learning rate (default {defaults.lr}; compress lowers it to what the sharpness of the "
                        "starting model allows, unless --lr is given)")
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--optimizer", choices=("sgd", "adam"), default=defaults.optimizer)
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--device", default=defaults.device, help="auto (CUDA if present), cpu or cuda")
    p.add_argument("--out", required=out_required, help="run folder to write")


class _ExplicitOnly(argparse.ArgumentParser):
    """The same command line with no defaults: parsing it gives only the options it names
    (its subparsers are of this class too)."""

    def add_argument(self, *args, **kwargs):
        return super().add_argument(*args, **{**kwargs, "default": argparse.SUPPRESS})


def parser(cls: type[argparse.ArgumentParser] = argparse.ArgumentParser) -> argparse.ArgumentParser:
    root = cls(prog="python -m jointcomp", description=__doc__)
    sub = root.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="dense training (no compression)")
    _train_args(train, out_required=True)
    train.add_argument("--epochs", type=int, default=None, help="default: per model")
    train.add_argument("--pretrained", help="weights to start from (fine-tuning; any file --pretrained of compress takes); "
                                            "the rate is then lowered to what their sharpness allows, unless --lr is given")

    comp = sub.add_parser("compress", help="prune + quantize jointly to a target size")
    _train_args(comp, out_required=False)
    comp.add_argument("--target", default="50x", help="e.g. 50x, 12KB, 96000b, 0.2%% (default 50x)")
    comp.add_argument("--epochs", type=int, default=EngineConfig.epochs)
    comp.add_argument("--dense-epochs", type=int, default=None, help="dense pre-training when no --pretrained")
    comp.add_argument("--pretrained", help="dense weights (.safetensors/.pt) or a `train` run folder")
    comp.add_argument("--rho", type=float, default=AdmmConfig.rho,
                      help=f"admm's penalty: how hard the weights are pulled towards their projection (default {AdmmConfig.rho})")
    comp.add_argument("--method", choices=tuple(METHODS), default=EngineConfig.method,
                      help="admm (jointcomp, trained), posttrain (jointcomp without training, from --calibration "
                           "inputs: a minute) or a baseline, for comparisons (default admm)")
    comp.add_argument("--calibration", type=int, default=EngineConfig.calibration,
                      help=f"training inputs posttrain and a calibrated start see (default {EngineConfig.calibration})")
    comp.add_argument("--start", choices=STARTS, default=EngineConfig.start,
                      help="where a training method starts: the dense weights, or the post-training result at the "
                           "target (calibrated, from --calibration inputs; see README) (default dense)")
    comp.add_argument("--retrain", type=float, default=EngineConfig.retrain,
                      help="fraction of the epochs (every method), before the final phase, with masks and bitwidths fixed and "
                           f"the kept weights trained through their quantization (default {EngineConfig.retrain})")
    comp.add_argument("--finetune", type=float, default=EngineConfig.finetune,
                      help="fraction of the epochs (every method) trained at the end in the deployed shape "
                           f"(default {EngineConfig.finetune})")
    comp.add_argument("--distill", type=float, default=EngineConfig.distill,
                      help=f"weight of distillation from the dense starting model, 0 = off (default {EngineConfig.distill})")
    comp.add_argument("--exclude", action="append", default=[], help="weight name glob to leave out")
    comp.add_argument("--budget-mode", choices=tuple(BUDGET_MODES), default=EngineConfig.budget_mode,
                      help=budget_modes_help())
    comp.add_argument("--resume", metavar="DIR",
                      help="continue an interrupted run in DIR; with it, only --lr, --rho, --epochs, --target and "
                           "--device may be given, to change what made it fail (recorded in its history)")
    for p in (train, comp):
        p.add_argument("--overwrite", action="store_true", help="start over in an --out folder that holds a run")

    export = sub.add_parser("export", help="write a run's compressed model as a .jcz file")
    export.add_argument("run_dir")
    export.add_argument("--out", required=True)

    export_c = sub.add_parser("export-c", help="a .jcz as portable C99 (model.h, model.c) whose flash holds the "
                                               "packed weights")
    export_c.add_argument("file")
    export_c.add_argument("--out", required=True, help="folder to write model.h and model.c into")
    export_onnx = sub.add_parser(
        "export-onnx", help="a .jcz as an .onnx file for standard runtimes",
        description="ONNX stores every weight densely as float32: the .onnx file is about the dense model's size. "
                    "It runs the compressed network's exact weights in standard runtimes; the .jcz and export-c "
                    "are what is small.")
    export_onnx.add_argument("file")
    export_onnx.add_argument("--out", required=True, help="the .onnx file to write")
    for p in (export_c, export_onnx):
        p.add_argument("--input-shape", help="one input's shape, e.g. 1,28,28 (default: the file's)")

    insp = sub.add_parser("inspect", help="per-layer byte breakdown of a .jcz file, and its C export's flash and RAM")
    insp.add_argument("file")

    ev = sub.add_parser("evaluate", help="accuracy of a .jcz model on a data set")
    ev.add_argument("file")
    _data_args(ev)
    ev.add_argument("--allow-import", action="store_true", help="let the file name a module:factory to import")

    dec = sub.add_parser("decompress", help="a .jcz as a plain dense .safetensors state dict")
    dec.add_argument("file")
    dec.add_argument("--out", required=True)
    for p in (dec, export_c, export_onnx, insp):
        p.add_argument("--allow-import", action="store_true", help="let the file name a module:factory to import")
    return root


def _progress(records, total_steps: int) -> FinalRecord | None:
    """Drive a run with a progress bar and one line per epoch; return the final record."""
    final = None
    quiet = not distributed.is_main()  # under torchrun only rank 0 talks
    with tqdm(total=total_steps or None, unit="step", dynamic_ncols=True, mininterval=1.0, delay=0.5,
              disable=quiet) as bar, logging_redirect_tqdm([logging.getLogger("jointcomp")]):  # notes above the bar
        for record in records:
            if isinstance(record, StartRecord):
                bar.total = (record.total_epochs + record.dense_epochs) * record.steps_per_epoch
            elif record.kind == "step":
                bar.update(1)
            elif isinstance(record, EpochRecord):
                bar.n = record.step
                line = f"epoch {record.epoch + 1} [{record.phase}] accuracy {record.accuracy:.4f}"
                if record.phase != "dense":
                    line += f"  size {record.size_bits:.0f} bits ({record.ratio:.1f}x)"
                if record.note:
                    line += f"\n  {record.note}"
                if not quiet:
                    tqdm.write(line)
            elif isinstance(record, FinalRecord):
                final = record
    return final


RESUME_OVERRIDES = ("lr", "rho", "epochs", "target", "device")
METHOD_SETTINGS = sorted({name for method in METHODS.values() for name in method.Config.__dataclass_fields__})  # options


def explicit_options(argv: list[str]) -> set[str]:
    """The options a command line gives explicitly (argparse fills the rest with defaults)."""
    return set(vars(parser(_ExplicitOnly).parse_args(argv))) - {"command"}


def cmd_train(args: argparse.Namespace, explicit: set[str]) -> int:
    if args.epochs is not None and args.epochs < 1:
        raise ValueError(f"--epochs must be at least 1, got {args.epochs}")
    out = RunDir(args.out, overwrite=args.overwrite).path  # checked before any training
    model, data = load_start(args.model, args.data, data_dir=args.data_dir, download=args.download, seed=args.seed,
                             pretrained=args.pretrained)
    config = EngineConfig(lr=args.lr, batch_size=args.batch_size, optimizer=args.optimizer, seed=args.seed, device=args.device)
    if args.pretrained:
        if "lr" not in explicit:
            lr, _ = first_batch_stable_lr(model, data, config, config.lr, torch.device("cpu"),
                                          lambda m, x, y: torch.nn.functional.cross_entropy(m(x), y))
            if lr < config.lr:
                print(f"learning rate {config.lr:g} -> {lr:.3g}: what the sharpness of the pretrained weights allows")
                config = dataclasses.replace(config, lr=lr)
    epochs = args.epochs if args.epochs is not None else dense_epochs(args.model)
    last: Record | None = None
    with tqdm(total=epochs, unit="epoch") as bar:
        for record in train_dense(model, data, config, epochs):
            if isinstance(record, EpochRecord):
                last = record
                bar.update(1)
                bar.set_postfix(accuracy=f"{record.accuracy:.4f}")
    save_weights(model, out / DENSE_FILE)
    accuracy = last.accuracy if isinstance(last, EpochRecord) else float("nan")
    write_json(out / "summary.json", {"model": args.model, "data": args.data, "epochs": epochs, "accuracy": accuracy})
    print(f"dense accuracy {accuracy:.4f}; weights in {out / DENSE_FILE}")
    return 0


def _engine_for_run(run_dir: str, overrides: dict | None = None) -> Engine:
    """An engine set up to continue (or export) the run saved in `run_dir`, with some
    training settings changed (`overrides`, keys from RESUME_OVERRIDES)."""
    saved = RunDir(run_dir, resume=True).read_config()
    overrides = dict(overrides or {})
    try:
        config = EngineConfig.from_dict(saved["compress"])
        settings = {**config.settings, **{k: overrides.pop(k) for k in METHOD_SETTINGS if k in overrides}}
        config = dataclasses.replace(config, settings=settings, **overrides)
    except (KeyError, TypeError) as err:
        raise ValueError(f"{run_dir}/config.json is not a jointcomp run's config ({err}); start a new run") from None
    model, data = load_start(saved["model"], saved["data"], data_dir=saved.get("data_dir"), seed=config.seed)
    meta = {k: saved.get(k) for k in (*DESCRIPTION_KEYS, "data_dir")}
    return Engine(model, data, config, run_dir=run_dir, resume=True, meta=meta)


def _settings(args: argparse.Namespace, explicit: set[str]) -> dict:
    """The chosen method's own settings from the command line; a setting of another method given
    explicitly goes along, to be refused in one line."""
    own = METHODS[args.method].Config.__dataclass_fields__
    return {name: getattr(args, name) for name in METHOD_SETTINGS if name in own or name in explicit}


def _mention_a_published_start(model: torch.nn.Module, name: str, epochs: int) -> None:
    """Say so where a run is about to train `model` from scratch while a published checkpoint
    ($JOINTCOMP_MODELS) fits it: a CIFAR ResNet's 30 dense epochs are over an hour on a CPU."""
    for path in fitting_checkpoints(model, name)[:1]:
        logging.getLogger("jointcomp").info("training %s dense for %d epochs first; the published %s fits it: "
                                            "--pretrained %s starts from it instead", name, epochs, path.name, path)


def cmd_compress(args: argparse.Namespace, explicit: set[str]) -> int:
    if args.resume:
        fixed = explicit - {"resume", *RESUME_OVERRIDES}
        if fixed:
            names = ", ".join("--" + k.replace("_", "-") for k in sorted(fixed))
            raise ValueError(f"{names} cannot change when resuming; only --{', --'.join(RESUME_OVERRIDES)} can")
        overrides = {k: getattr(args, k) for k in RESUME_OVERRIDES if k in explicit}
        if "lr" in overrides:
            overrides["auto_lr"] = False
        engine = _engine_for_run(args.resume, overrides)
    else:
        if not args.out:
            raise ValueError("compress needs --out DIR (or --resume DIR)")
        pre_epochs = 0 if args.pretrained else (
            args.dense_epochs if args.dense_epochs is not None else dense_epochs(args.model)
        )
        config = EngineConfig(
            target=args.target, epochs=args.epochs, dense_epochs=pre_epochs, batch_size=args.batch_size,
            lr=args.lr, auto_lr="lr" not in explicit, optimizer=args.optimizer, settings=_settings(args, explicit),
            exclude=tuple(args.exclude),
            method=args.method, retrain=args.retrain, finetune=args.finetune, distill=args.distill,
            budget_mode=args.budget_mode, seed=args.seed, device=args.device, calibration=args.calibration, start=args.start,
        )
        model, data = load_start(args.model, args.data, data_dir=args.data_dir, download=args.download, seed=config.seed,
                                 pretrained=args.pretrained)
        engine = Engine(model, data, config, run_dir=args.out, meta=model_description(args.model, data, args.data_dir),
                        overwrite=args.overwrite)
        if pre_epochs:
            _mention_a_published_start(model, args.model, pre_epochs)
    final = _progress(engine, 0)
    if final is None:
        return 1
    if distributed.is_main():
        print(json.dumps({"accuracy": final.accuracy, "dense_accuracy": final.dense_accuracy,
                          "size_bits": final.size_bits, "target_bits": final.target_bits,
                          "ratio": round(final.ratio, 2), "file_bytes": final.file_bytes, "bops": final.bops,
                          "bops_ratio": round(final.bops_ratio, 2)}))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    engine = _engine_for_run(args.run_dir)
    engine.restore()
    print(f"wrote {args.out}: {engine.export(args.out)} bytes")
    return 0


def _input_shape(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        shape = ()
    if not shape or min(shape) < 1:
        raise ValueError(f"--input-shape {text!r} is not a shape; give positive sizes such as 1,28,28")
    return shape


def cmd_export_c(args: argparse.Namespace) -> int:
    export = export_c(args.file, args.out, input_shape=_input_shape(args.input_shape), allow_import=args.allow_import)
    print(f"wrote {args.out}/model.h and {args.out}/model.c: flash {export.flash_bytes} B (const data: packed "
          f"weights, codebooks, biases), RAM {export.ram_bytes} B (activations)")
    return 0


def cmd_export_onnx(args: argparse.Namespace) -> int:
    size = export_onnx(args.file, args.out, input_shape=_input_shape(args.input_shape), allow_import=args.allow_import)
    print(f"wrote {args.out}: {size} bytes (ONNX holds the weights densely, as float32)")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    print(format_report(inspect_file(args.file)))
    try:
        export = flash_report(args.file, allow_import=args.allow_import)
        print(f"C export (export-c): flash {export.flash_bytes} B const data, RAM {export.ram_bytes} B activations")
    except (ValueError, CheckpointError) as err:
        print(f"C export (export-c): not available ({' '.join(str(err).split())})")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    model = load_compressed(args.file, allow_import=args.allow_import)
    data = load_dataset(args.data, args.data_dir, args.download)
    try:
        acc = accuracy(model, data)
    except RuntimeError as err:
        raise ValueError(f"this model does not take {args.data} inputs ({str(err).splitlines()[0]})") from None
    print(f"accuracy {acc:.4f} on {args.data} ({len(data.val_y)} validation examples)")
    return 0


def cmd_decompress(args: argparse.Namespace) -> int:
    save_weights(load_compressed(args.file, allow_import=args.allow_import), args.out)
    print(f"wrote {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(argv)
    keep_freed_blocks()
    log = logging.getLogger("jointcomp")  # notes such as an adapted first layer, one line each
    if not log.handlers:
        log.addHandler(logging.StreamHandler())
        log.setLevel(logging.INFO)
    commands = {"train": lambda a: cmd_train(a, explicit_options(argv)), "compress": lambda a: cmd_compress(a, explicit_options(argv)),
                "export": cmd_export, "export-c": cmd_export_c, "export-onnx": cmd_export_onnx, "inspect": cmd_inspect,
                "evaluate": cmd_evaluate, "decompress": cmd_decompress}
    finished = False
    try:
        code = commands[args.command](args)
        finished = True
        return code
    except (ValueError, OSError, FloatingPointError, CheckpointError) as err:
        print("error: " + " ".join(str(err).split()), file=sys.stderr)  # always one line
        return 2
    except torch.distributed.DistError as err:
        print(f"error: another process of this torchrun failed ({' '.join(str(err).split())[:200]}); the run "
              "folder keeps its last good epoch: continue with the same torchrun command and --resume DIR",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; continue with --resume DIR", file=sys.stderr)
        return 130
    finally:
        distributed.leave(finished)


def format_report(report: Report) -> str:
    """The `inspect` table: one line per compressed layer, then labelled totals."""
    lines = [f"{'layer':<24}{'shape':<18}{'nnz':>9}{'bits':>5}{'codes B':>9}{'positions B':>13} {'(encoding)':<14}{'codebook B':>11}"]
    for r in report.layers:
        shape = "x".join(map(str, r.shape))
        lines.append(f"{r.name:<24}{shape:<18}{r.nnz:>9}{r.bits:>5}{r.codes_bytes:>9}{r.positions_bytes:>13} "
                     f"{'(' + r.positions_encoding + ')':<14}{r.codebook_bytes:>11}")
    lines += [
        f"other parameters and buffers: {report.dense_bytes} B",
        f"header: {report.header_bytes} B",
        f"file size: {report.file_bytes} B",
        f"dense fp32 size: {report.fp32_bytes} B",
        f"ratio on file bytes: {report.file_ratio:.1f}x",
        f"paper-accounting size: {report.paper_bits} bits = sum of bits x non-zeros "
        f"(ratio {report.paper_ratio:.1f}x against fp32 of the compressed weights)",
    ]
    return "\n".join(lines)
