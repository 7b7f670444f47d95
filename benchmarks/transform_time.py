"""Wall-clock time of ``ec.transform`` on a DiT-XL/2-sized model (the cost a user pays once per model).

    python benchmarks/transform_time.py [--threads 2] [--verify/--no-verify]   # writes results/transform_time.md

The model is diffusers' ``DiTTransformer2DModel`` in the DiT-XL/2 shape (28 blocks, hidden 1152, 16 heads,
32x32x4 latents in 2x2 patches: 256 tokens, 1000 classes), random weights, batch 2 example inputs. The
transform is timed end to end (capture, analysis, neuron ordering with activation importance, rewrite,
numerical verification of every block) and its log says which stage took what. Building the model is not
timed. The host and its load (``os.getloadavg``) are recorded: on a shared machine the time is an upper bound.
"""
from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


class StageClock(logging.Handler):
    """Times between the transform's log lines (its stages announce themselves at INFO level)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.start = time.perf_counter()
        self.lines: list[tuple[float, str]] = []

    def emit(self, record):
        self.lines.append((time.perf_counter() - self.start, record.getMessage()[:140]))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-verify", action="store_true", help="skip the numerical check of every block")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from diffusers import DiTTransformer2DModel

    import elastic_compile as ec

    torch.manual_seed(0)
    model = DiTTransformer2DModel(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8,
                                  num_layers=28, sample_size=32, patch_size=2, num_embeds_ada_norm=1000).eval()
    inputs = dict(hidden_states=torch.randn(2, 4, 32, 32), timestep=torch.tensor([500.0, 500.0]),
                  class_labels=torch.tensor([3, 7]), return_dict=False)
    parameters = sum(p.numel() for p in model.parameters())
    clock = StageClock()
    logger = logging.getLogger("elastic_compile")
    logger.addHandler(clock)
    logger.setLevel(logging.INFO)
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    ec.transform(model, ec.ElasticConfig(verify=not args.no_verify), example_inputs=inputs)
    seconds = time.perf_counter() - started
    load_after = os.getloadavg()[0]
    blocks = len(ec.state.state_of(model).specs)
    lines = [
        "# Transform time on a DiT-XL/2-sized model", "",
        f"Command: `python benchmarks/transform_time.py --threads {args.threads}"
        f"{' --no-verify' if args.no_verify else ''}`; host: {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, torch {torch.__version__}; 1-minute load average {load_before:.1f} before, "
        f"{load_after:.1f} after (other work on the machine makes this an upper bound).", "",
        f"DiTTransformer2DModel, 28 blocks, hidden 1152, {parameters / 1e6:.0f}M parameters, batch 2 x 256 tokens: "
        f"**{seconds:.1f} s** for `ec.transform` ({blocks} blocks found, verification "
        f"{'off' if args.no_verify else 'on'}).", "", "Log (seconds since the start):", "", "```"]
    lines += [f"{t:7.1f}  {message}" for t, message in clock.lines]
    lines += ["```", ""]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "transform_time.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
