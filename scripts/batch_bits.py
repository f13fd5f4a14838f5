"""Do inversion batches of different sizes give the same bits? The question behind the latent
cache's batch regime (``utils.core.batching.batch_regime``).

    python -m scripts.batch_bits --config digits.yml --device cpu

Inverts the same 8 random images of the config's size at batch 1, 2, 3, 4 and 8 (``Editor.invert``'s
loop: a lone remainder as a pair), and prints, per batch size, the largest difference of the first
image's z and h from its latents at batch 2. Zero at every size of 2 or more means one cache entry
serves them all on this machine; the batch-1 row shows what a batch of one changes.
"""
from __future__ import annotations

import argparse

import torch

from runners.engine import Engine, EngineOptions, load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="digits.yml")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--n_inv_step", type=int, default=10)
    args = parser.parse_args()
    model = load_model(args.config, device=torch.device(args.device))
    x = torch.rand(8, *model.shapes["z"], generator=torch.Generator().manual_seed(0)) * 2 - 1
    with Engine(model, EngineOptions(show_progress=False)).session(model.config.edit.t_0, args.n_inv_step) as editor:
        reference, _ = editor.invert(x[:2], batch_size=2)
        inverted = {b: editor.invert(x[:b], batch_size=b)[0] for b in (1, 2, 3, 4, 8)}
    print(f"{args.config} on {args.device} ({torch.__version__}): max |difference| from batch 2, first image")
    for batch_size, latents in inverted.items():
        dz = float((latents.z[0] - reference.z[0]).abs().max())
        dh = float((latents.h[0] - reference.h[0]).abs().max())
        print(f"batch {batch_size}: z {dz:.3g}  h {dh:.3g}")


if __name__ == "__main__":
    main()
