"""Train the project's reference model: a class-conditional diffusers DiT on 8x8 sklearn digits.

Flow matching with diffusers' ``FlowMatchEulerDiscreteScheduler``: x_t = (1 - sigma) x_0 + sigma * noise,
the model predicts the velocity noise - x_0 at timestep sigma * 1000 (the scheduler's own timestep table),
and sampling is the scheduler's Euler step. Classifier-free guidance: 10% of labels are replaced by the null
class 10 *per sample, for the whole model* (diffusers' built-in label dropout is switched off because it
draws an independent drop in every block's embedder; see ``disable_builtin_label_dropout``).

Reproducible: the same arguments and seed give the same weights (CPU, same thread count).

    PYTHONPATH=. python benchmarks/train_reference.py          # full run (~26 min uncontended), writes the package assets
    PYTHONPATH=. python benchmarks/train_reference.py --steps 300 --out /tmp/ref_trial   # trial run
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from elastic_compile.reference import ASSETS_DIR
from elastic_compile.reference.data import IMAGE_SIZE, NUM_CLASSES, load_digits_split
from elastic_compile.sampling import SamplingConfig

NULL_CLASS = NUM_CLASSES  # diffusers' LabelEmbedding appends the CFG row at index num_classes.


def build_model(hidden: int, heads: int, layers: int):
    """A diffusers DiT for (1, 8, 8) images, patch 1 (64 tokens), initialised like the DiT paper (adaLN-Zero)."""
    from diffusers import DiTTransformer2DModel

    model = DiTTransformer2DModel(
        num_attention_heads=heads, attention_head_dim=hidden // heads, in_channels=1, num_layers=layers,
        sample_size=IMAGE_SIZE, patch_size=1, num_embeds_ada_norm=NUM_CLASSES, norm_type="ada_norm_zero",
        activation_fn="gelu-approximate", dropout=0.0,
    )
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.xavier_uniform_(module.weight)
            torch.nn.init.zeros_(module.bias)
    for block in model.transformer_blocks:  # adaLN-Zero: every block starts as the identity
        torch.nn.init.zeros_(block.norm1.linear.weight)
        torch.nn.init.zeros_(block.norm1.linear.bias)
        emb = block.norm1.emb
        torch.nn.init.normal_(emb.class_embedder.embedding_table.weight, std=0.02)
        torch.nn.init.normal_(emb.timestep_embedder.linear_1.weight, std=0.02)
        torch.nn.init.normal_(emb.timestep_embedder.linear_2.weight, std=0.02)
    for layer in (model.proj_out_1, model.proj_out_2):
        torch.nn.init.zeros_(layer.weight)
        torch.nn.init.zeros_(layer.bias)
    return model


def disable_builtin_label_dropout(model) -> int:
    """Set every LabelEmbedding's dropout to 0 (the null row stays); returns how many were changed.

    In training mode diffusers' ``LabelEmbedding.token_drop`` draws a fresh random mask in *each* call: every
    block of a DiT has its own embedder (and the output layer calls block 0's again), so one sample would see
    its class in some blocks and the null class in others. CFG needs whole-model drops, done in ``train``.
    """
    from diffusers.models.embeddings import LabelEmbedding

    count = 0
    for module in model.modules():
        if isinstance(module, LabelEmbedding):
            module.dropout_prob = 0.0
            count += 1
    return count


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def train(args: argparse.Namespace) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.training_utils import EMAModel

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    split = load_digits_split()
    images, labels = split.train_images, split.train_labels
    model = build_model(args.hidden, args.heads, args.layers)
    disable_builtin_label_dropout(model)
    model.train()
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    train_timesteps, train_sigmas = scheduler.timesteps.clone(), scheduler.sigmas.clone()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)
    ema = EMAModel(model.parameters(), decay=args.ema_decay, use_ema_warmup=True, power=0.75)
    gen = torch.Generator().manual_seed(args.seed + 1)

    log_path = out / "train_log.jsonl"
    log = log_path.open("w")
    n = images.shape[0]
    order, cursor = torch.randperm(n, generator=gen), 0
    smoothed, start, cpu_start = None, time.time(), time.process_time()
    for step in range(args.steps):
        if cursor + args.batch_size > n:
            order, cursor = torch.randperm(n, generator=gen), 0
        idx = order[cursor:cursor + args.batch_size]
        cursor += args.batch_size
        x0, y = images[idx], labels[idx].clone()
        y[torch.rand(y.shape, generator=gen) < args.cfg_dropout] = NULL_CLASS
        # Timesteps come from the scheduler's own training table (sigma * 1000), uniformly.
        table_index = torch.randint(0, len(train_timesteps), (x0.shape[0],), generator=gen)
        timestep, sigma = train_timesteps[table_index], train_sigmas[table_index].view(-1, 1, 1, 1)
        noise = torch.randn(x0.shape, generator=gen)
        noisy = (1.0 - sigma) * x0 + sigma * noise
        target = noise - x0
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        prediction = model(noisy, timestep=timestep, class_labels=y, return_dict=False)[0]
        loss = F.mse_loss(prediction, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        ema.step(model.parameters())
        smoothed = loss.item() if smoothed is None else 0.98 * smoothed + 0.02 * loss.item()
        if step % args.log_every == 0 or step == args.steps - 1:
            record = {"step": step, "loss": round(loss.item(), 5), "loss_smoothed": round(smoothed, 5),
                      "grad_norm": round(float(grad_norm), 4), "lr": optimizer.param_groups[0]["lr"],
                      "ema_decay": round(ema.cur_decay_value or 0.0, 6), "elapsed_s": round(time.time() - start, 1),
                      "cpu_s": round(time.process_time() - cpu_start, 1)}
            log.write(json.dumps(record) + "\n")
            log.flush()
            print(json.dumps(record), flush=True)
    log.close()
    wall, cpu = time.time() - start, time.process_time() - cpu_start

    raw_dir = Path(args.raw_out)
    model.eval()
    model.save_pretrained(raw_dir, safe_serialization=True)
    ema.copy_to(model.parameters())
    model.save_pretrained(out / "transformer", safe_serialization=True)
    FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0).save_pretrained(out / "scheduler")
    SamplingConfig(num_inference_steps=args.sampling_steps, guidance_scale=args.guidance_scale,
                   sample_size=IMAGE_SIZE, in_channels=1, num_classes=NUM_CLASSES, null_class=NULL_CLASS,
                   ).save(out / "sampling.json")
    import diffusers

    meta = {"args": vars(args), "wall_time_s": round(wall, 1), "cpu_time_s": round(cpu, 1), "train_images": int(n),
            "parameters": sum(p.numel() for p in model.parameters()), "weights": "EMA",
            "torch": torch.__version__, "diffusers": diffusers.__version__, "threads": torch.get_num_threads()}
    (out / "train_config.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"done in {wall:.0f} s -> {out}", flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ASSETS_DIR), help="where the assets go (default: the package's)")
    p.add_argument("--raw-out", default="/tmp/elastic_reference_raw", help="where the non-EMA weights go")
    p.add_argument("--steps", type=int, default=3600)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--cfg-dropout", type=float, default=0.1)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--layers", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--sampling-steps", type=int, default=25)
    p.add_argument("--guidance-scale", type=float, default=1.25,
                   help="default CFG scale written to sampling.json (chosen by evaluate_reference.py --sweep)")
    return p.parse_args(argv)


if __name__ == "__main__":
    train(parse_args())
