"""A user's GPT through the Python API: compression without training at 8x and 16x.

A small character-level GPT (four pre-norm transformer blocks, 96 channels, its token embedding
tied to its output head: 0.46 M weights) is trained here on text this bench writes itself: the
source of the Python standard library of the interpreter running it (the same text wherever the
same Python runs; nothing to download or ship). Then, as a user would in their own code:

    comp = jointcomp.Compressor(model, "8x", method="posttrain")
    comp.calibrate(sequences)      # 512 training sequences, drawn by the seed
    comp.finish(); comp.convert_()

and the validation loss (mean cross-entropy per character, nats) of the compressed model against
the dense one's, two calibration seeds. Rows go to bench/results/gpt.jsonl.

    python bench/gpt.py            # trains once (cached in bench/.cache/gpt), then compresses
"""
from __future__ import annotations

import argparse
import sysconfig
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from common import CACHE, commit, machine, store_rows
import jointcomp
from jointcomp.models import load_weights, save_weights

TEXT_CHARS = 2_000_000  # of the standard library's source, file by file in name order
CONTEXT = 64  # characters a sequence holds
WIDTH, BLOCKS, HEADS = 96, 4, 4
CALIBRATION = 512  # sequences, as the CLI's --calibration default
VALIDATION_SEQUENCES = 2048


def stdlib_text() -> str:
    """The first TEXT_CHARS characters of the standard library's .py files, ASCII (others become '?')."""
    parts, total = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        parts.append(text)
        total += len(text)
        if total >= TEXT_CHARS:
            break
    text = "".join(parts)[:TEXT_CHARS]
    return "".join(c if c == "\n" or 32 <= ord(c) < 127 else "?" for c in text)


class Block(nn.Module):
    """Pre-norm causal self-attention, then a 4x MLP, each added to the residual stream."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.up, self.down = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attended.transpose(1, 2).reshape(b, t, c))
        return x + self.down(F.gelu(self.up(self.norm2(x))))


class CharGPT(nn.Module):
    """Token and position embeddings, BLOCKS blocks, a final norm; the head reads out with the
    token embedding's own weights (tied: one tensor, compressed once)."""

    def __init__(self, vocabulary: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocabulary, WIDTH)
        self.position = nn.Parameter(torch.zeros(CONTEXT, WIDTH))
        self.blocks = nn.Sequential(*(Block(WIDTH, HEADS) for _ in range(BLOCKS)))
        self.norm = nn.LayerNorm(WIDTH)
        self.head = nn.Linear(WIDTH, vocabulary, bias=False)
        self.head.weight = self.embed.weight
        nn.init.normal_(self.embed.weight, std=0.02)  # GPT-2's: unit-variance rows read out as logits of size ~10

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.position[: tokens.shape[1]]
        return self.head(self.norm(self.blocks(x)))


def sequences(data: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """`count` random windows of CONTEXT + 1 characters of `data`."""
    starts = torch.randint(len(data) - CONTEXT - 1, (count,), generator=generator)
    return torch.stack([data[s:s + CONTEXT + 1] for s in starts.tolist()])


@torch.no_grad()
def validation_loss(model: nn.Module, windows: torch.Tensor) -> float:
    """Mean cross-entropy per predicted character (nats) over `windows`."""
    model.eval()
    losses = [F.cross_entropy(model(w[:, :-1]).flatten(0, 1), w[:, 1:].flatten(), reduction="sum")
              for w in windows.split(256)]
    return float(sum(losses)) / windows[:, 1:].numel()


def train(model: nn.Module, data: torch.Tensor, steps: int, seed: int) -> None:
    """AdamW with a cosine rate, batches of 64 random windows."""
    generator = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.05)
    model.train()
    for step in range(steps):
        w = sequences(data, 64, generator)
        loss = F.cross_entropy(model(w[:, :-1]).flatten(0, 1), w[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
        if step % 500 == 0:
            print(f"  step {step}: training loss {loss.item():.3f}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--targets", nargs="+", default=["8x", "16x"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="calibration draws")
    p.add_argument("--steps", type=int, default=3000, help="the dense model's training steps")
    args = p.parse_args()
    text = stdlib_text()
    alphabet = sorted(set(text))
    index = {c: i for i, c in enumerate(alphabet)}
    data = torch.tensor([index[c] for c in text], dtype=torch.long)
    split = int(0.9 * len(data))
    train_data, val_data = data[:split], data[split:]
    val = sequences(val_data, VALIDATION_SEQUENCES, torch.Generator().manual_seed(1234))

    weights = CACHE / "gpt" / f"chargpt-{args.steps}steps.safetensors"
    torch.manual_seed(0)
    dense = CharGPT(len(alphabet))
    count = sum(p.numel() for p in dense.parameters())
    tic = time.perf_counter()
    if weights.is_file():
        load_weights(dense, weights)
    else:
        print(f"training the dense GPT ({count:,} weights, {len(alphabet)} characters, {args.steps} steps)")
        train(dense, train_data, args.steps, seed=0)
        weights.parent.mkdir(parents=True, exist_ok=True)
        save_weights(dense, weights)
    dense_loss = validation_loss(dense, val)
    print(f"dense: {count:,} weights, validation loss {dense_loss:.4f} nats per character "
          f"({time.perf_counter() - tic:.0f} s); machine: {machine()}\n")
    print("| target | seed | validation loss | against dense | ratio | .jcz bytes | seconds |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    for target in args.targets:
        for seed in args.seeds:
            model = CharGPT(len(alphabet))
            model.load_state_dict(dense.state_dict())
            calibration = sequences(train_data, CALIBRATION, torch.Generator().manual_seed(seed))[:, :-1]
            tic = time.perf_counter()
            comp = jointcomp.Compressor(model, target, method="posttrain")
            comp.calibrate(list(calibration.split(64)))
            final = comp.finish()
            comp.convert_()
            path = CACHE / "gpt" / f"chargpt-{target}-seed{seed}.jcz"
            file_bytes = comp.export(str(path))
            seconds = time.perf_counter() - tic
            loss = validation_loss(model, val)
            print(f"| {target} | {seed} | {loss:.4f} | {100 * (loss / dense_loss - 1):+.1f} % | {final.ratio:.1f}x | "
                  f"{file_bytes:,} | {seconds:.0f} |", flush=True)
            rows.append({"network": "chargpt", "data": "python-stdlib-text", "method": "posttrain", "target": target,
                         "budget_mode": "paper", "seed": seed, "validation_loss": loss, "dense_validation_loss": dense_loss,
                         "ratio": final.ratio, "paper_bits": final.size_bits, "file_bytes": file_bytes, "epochs": 0, "minutes": seconds / 60,
                         "command": "python bench/gpt.py", "commit": commit(), "machine": machine()})
    store_rows("gpt", rows)


if __name__ == "__main__":
    main()
