"""A user's own training loop under torchrun: DDP, a DistributedSampler and the Compressor.
Run by tests/test_distributed.py as `torchrun --nproc_per_node 2 tests/ddp_loop.py OUT`.
After every projection each process's projection V is gathered and compared on rank 0; a
target moved on rank 0 alone mid-run must reach every process. Rank 0 writes OUT (JSON)."""
import hashlib
import json
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import jointcomp


def fingerprint(tensors) -> str:
    digest = hashlib.sha256()
    for t in tensors:
        digest.update(t.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def main(out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    compress(out)
    jointcomp.distributed.leave()  # every rank waits for the others, then leaves the process group


def compress(out: str) -> None:
    rank = dist.get_rank()
    data = jointcomp.load_dataset("digits")
    torch.manual_seed(0)
    model = jointcomp.build_model("mlp", data.input_shape, data.num_classes)
    train = TensorDataset(data.train_x, data.train_y)
    sampler = DistributedSampler(train, shuffle=True, seed=0)
    loader = DataLoader(train, batch_size=32, sampler=sampler)
    ddp = DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
    for epoch in range(8):  # dense training first
        sampler.set_epoch(epoch)
        for x, y in loader:
            opt.zero_grad()
            nn.functional.cross_entropy(ddp(x), y).backward()
            opt.step()

    epochs = 4
    comp = jointcomp.Compressor(ddp, target="40x", steps=epochs * len(loader), project_every=len(loader) // 2)
    checks = []
    for epoch in range(epochs):
        sampler.set_epoch(100 + epoch)
        for x, y in loader:
            out_ = ddp(x)
            loss = comp.distill(x, out_, nn.functional.cross_entropy(out_, y))
            opt.zero_grad()
            loss.backward()
            opt.step()
            if epoch == 2 and comp.step_count == 2 * len(loader) and rank == 0:
                comp.set_target("80x")  # only rank 0 hears of it
            projected = comp.schedule.projects(comp.step_count)
            comp.step(lr=opt.param_groups[0]["lr"])
            if projected and comp.phase == "admm":
                seen = [None] * dist.get_world_size()
                dist.all_gather_object(seen, fingerprint(comp.method.V))
                checks.append(seen)
    final = comp.finish()
    alloc = comp.final
    seen = [None] * dist.get_world_size()
    dist.all_gather_object(seen, [fingerprint(alloc.masks + alloc.codebooks + alloc.codes), alloc.bits.tolist(),
                                  comp.target_bits])
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"projections": checks, "final": seen, "size_bits": final.size_bits,
                       "target_bits": final.target_bits, "dense_bits": comp.dense_bits}, f)


if __name__ == "__main__":
    main(sys.argv[1])
