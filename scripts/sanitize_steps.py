"""One step of every fused optimizer, small and quick, for compute-sanitizer (memcheck,
racecheck, synccheck) over the CUDA kernels:

    compute-sanitizer --tool memcheck python3 scripts/sanitize_steps.py [--backend cuda]

Each optimizer takes two steps (state creation, then a step on that state) over params of every
kind its kernels treat apart (0-d, 1-D, matrices, a batch of matrices, an empty tensor), in two
param groups of different dtypes (float32 and bfloat16), with and without max_grad_norm (and
amsgrad for the Adams). `--backend cpu` runs the same on the CPU, to check the script itself."""

import argparse

import torch

import fused_optim
from fused_optim import transformers as hf

SHAPES = [(), (7,), (33, 17), (2, 3, 40), (0,), (300, 5)]


def optimizers(backend: str) -> dict:
    return {
        "AdamW": lambda ps, **kw: fused_optim.AdamW(ps, lr=1e-3, backend=backend, **kw),
        "AdamW-amsgrad": lambda ps, **kw: fused_optim.AdamW(ps, lr=1e-3, amsgrad=True, backend=backend, **kw),
        "Adam": lambda ps, **kw: fused_optim.Adam(ps, lr=1e-3, weight_decay=0.01, backend=backend, **kw),
        "AdaXW": lambda ps, **kw: fused_optim.AdaXW(ps, lr=1e-3, backend=backend, **kw),
        "Adafactor": lambda ps, **kw: fused_optim.Adafactor(ps, weight_decay=0.01, backend=backend, **kw),
        "HFAdafactor": lambda ps, **kw: hf.Adafactor(ps, beta1=0.9, weight_decay=0.01, backend=backend, **kw),
        "SMMF": lambda ps, **kw: fused_optim.SMMF(ps, lr=1e-3, backend=backend, **kw),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", default="cuda", choices=["cuda", "triton", "cpu"])
    args = ap.parse_args()
    device = "cpu" if args.backend == "cpu" else "cuda"
    torch.manual_seed(0)
    for name, make in optimizers(args.backend).items():
        for clip in (None, 1.0):
            groups = [
                {"params": [torch.nn.Parameter(torch.randn(s, device=device, dtype=dtype)) for s in SHAPES]}
                for dtype in (torch.float32, torch.bfloat16)
            ]
            opt = make(groups, max_grad_norm=clip)
            for _ in range(2):
                for group in groups:
                    for p in group["params"]:
                        p.grad = torch.randn_like(p)
                opt.step()
            if device == "cuda":
                torch.cuda.synchronize()
            finite = all(torch.isfinite(p).all() for g in groups for p in g["params"])
            print(f"{name:14s} clip={clip}: {'ok' if finite else 'NON-FINITE PARAMS'}", flush=True)


if __name__ == "__main__":
    main()
