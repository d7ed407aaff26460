"""FSDP2 with fused_optim: every parameter sharded on dim 0 across ranks, the fused optimizer
stepping each rank's shards. Runs on CPU with gloo (or on GPUs with nccl):

    torchrun --nproc-per-node 2 examples/fsdp2.py [adamw|adafactor|hf-adafactor|smmf]
"""

import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
from torch.distributed.fsdp import fully_shard

import fused_optim
import fused_optim.transformers

OPTIMIZERS = {
    "adamw": lambda params: fused_optim.AdamW(params, lr=1e-3, weight_decay=0.1, max_grad_norm=1.0),
    "adafactor": lambda params: fused_optim.Adafactor(params, lr=1e-2, max_grad_norm=1.0),
    "hf-adafactor": lambda params: fused_optim.transformers.Adafactor(params, max_grad_norm=1.0),
    "smmf": lambda params: fused_optim.SMMF(params, lr=1e-3, decay_rate=-0.8, max_grad_norm=1.0),
}


def main() -> None:
    name = sys.argv[1] if len(sys.argv) > 1 else "adamw"
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank()
    device = torch.device("cuda", rank % torch.cuda.device_count()) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    torch.manual_seed(0)  # the same initial model on every rank

    model = nn.Sequential(nn.Linear(64, 257), nn.GELU(), nn.Linear(257, 10)).to(device)
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)  # 257 rows: uneven shards are fine
    fully_shard(model)
    opt = OPTIMIZERS[name](model.parameters())

    for step in range(20):
        x = torch.randn(32, 64, device=device)
        y = x[:, :10].argmax(dim=1)  # a learnable target
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()  # local shards, fused; the clip norm is one all-reduce of a scalar
        opt.zero_grad()
        if rank == 0 and step % 5 == 0:
            print(f"step {step:2d}  loss {loss.item():.4f}  grad norm {opt.last_grad_norm.item():.4f}")

    # The whole optimizer state on every rank, loadable into a one-process optimizer.
    full = get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True))
    if rank == 0:
        first = next(iter(full["state"].values()))
        print("state of the first param:", {k: tuple(v.shape) for k, v in first.items()})
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
