"""Peak memory of a router-training step on a DiT-XL/2-shaped model, with and without activation checkpointing.

    python benchmarks/train_memory.py            # writes results/train_memory.md

The model is diffusers' ``DiTTransformer2DModel`` in the DiT-XL/2 shape (28 blocks, hidden 1152, 16 heads,
32x32x4 latents in 2x2 patches: 256 tokens) with random weights; it is made elastic and its routers train on a
tiny recorded-like dataset. Each configuration runs in a fresh process: the process's peak resident set size is
reset (``/proc/self/clear_refs``, Linux) after the first training step (which also builds the FLOP table and
Adam's state) and read (``VmHWM``) after the second, so the number is one steady-state training step: the base's
weights, the routers' optimizer state, the batch and what autograd keeps for backward. ``tracemalloc`` does not
see torch's allocations, hence RSS; glibc runs with a fixed mmap threshold so that freed tensors leave the
resident set (otherwise the first step's activations would stay resident and hide the second's).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def measure(layers: int, batch: int, checkpointing: bool, autocast: str | None) -> dict:
    """One configuration, in this process: bytes of the model, resident bytes before the measured step, and the
    peak during it."""
    import torch
    from diffusers import DiTTransformer2DModel

    import elastic_compile as ec
    from elastic_compile.train import TrajectoryDataset, train_routers

    torch.manual_seed(0)
    model = DiTTransformer2DModel(num_attention_heads=16, attention_head_dim=72, in_channels=4, num_layers=layers,
                                  sample_size=32, patch_size=2, num_embeds_ada_norm=1000).eval()
    example = dict(hidden_states=torch.randn(1, 4, 32, 32), timestep=torch.tensor([500]),
                   class_labels=torch.tensor([1]), return_dict=False)
    ec.transform(model, ec.ElasticConfig(width_buckets=(0.5, 1.0)), example_inputs=example)
    g = torch.Generator().manual_seed(0)
    rows = 2 * batch
    data = TrajectoryDataset({"hidden_states": torch.randn(rows, 4, 32, 32, generator=g),
                              "timestep": torch.randint(0, 1000, (rows,), generator=g),
                              "class_labels": torch.randint(0, 1000, (rows,), generator=g)}, {"return_dict": False})
    marks = {}

    def log(entry):
        if entry.step == 1:
            marks["before"] = _status("VmRSS")
            Path("/proc/self/clear_refs").write_text("5")   # peak RSS := current RSS
            marks["t"] = time.time()
    train_routers(model, data, steps=2, batch_size=batch, log_every=1, progress=False, log=log,
                  activation_checkpointing=checkpointing, autocast=autocast)
    peak = _status("VmHWM")
    parameters = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"layers": layers, "batch": batch, "checkpointing": checkpointing, "autocast": autocast,
            "parameters_bytes": parameters, "rss_before_step": marks["before"], "peak_rss_step": peak,
            "step_seconds": time.time() - marks["t"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--autocast", action="store_true", help="also measure bf16 autocast (slow without bf16 "
                                                                "hardware)")
    parser.add_argument("--one", help=argparse.SUPPRESS)   # internal: JSON of one configuration to run here
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(**json.loads(args.one))))
        return
    configs = [dict(checkpointing=False, autocast=None), dict(checkpointing=True, autocast=None)]
    if args.autocast:
        configs += [dict(checkpointing=False, autocast="bf16"), dict(checkpointing=True, autocast="bf16")]
    results = []
    for config in configs:
        one = json.dumps({"layers": args.layers, "batch": args.batch, **config})
        # a fixed mmap threshold: glibc returns freed tensors to the OS, so RSS before the step is what is live
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
        out = subprocess.run([sys.executable, __file__, "--one", one], capture_output=True, text=True, check=True,
                             env=env)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(results[-1], flush=True)
    write(results)


def write(results: list[dict]) -> None:
    gib = 2 ** 30
    lines = ["# Peak memory of one router-training step (DiT-XL/2 shape, CPU)", "",
             f"`python benchmarks/train_memory.py` on {platform.processor() or platform.machine()}, "
             f"{results[0]['layers']} blocks, hidden 1152, 256 tokens, global batch {results[0]['batch']}, random "
             "weights, routers with widths (0.5, 1.0) and skips; one steady-state step (the second) in a fresh "
             "process: peak resident memory (VmHWM after a reset), and what autograd and the step add on top of "
             "what the process held before it.", "",
             "| activation checkpointing | base autocast | base weights | resident before the step | peak in the "
             "step | step adds | step time |", "|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {'yes' if r['checkpointing'] else 'no'} | {r['autocast'] or 'off (fp32)'} | "
                     f"{r['parameters_bytes'] / gib:.2f} GiB | {r['rss_before_step'] / gib:.2f} GiB | "
                     f"{r['peak_rss_step'] / gib:.2f} GiB | {(r['peak_rss_step'] - r['rss_before_step']) / gib:.2f} "
                     f"GiB | {r['step_seconds']:.0f} s |")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "train_memory.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "train_memory.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
