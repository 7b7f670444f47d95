"""Generated images as pictures: grids of samples and labelled side-by-side panels (the demo's dense | elastic |
difference), built on diffusers' ``make_image_grid``. Images are (N, C, H, W) tensors in [-1, 1], C in (1, 3)."""
from __future__ import annotations

from pathlib import Path

import torch
from diffusers.utils import make_image_grid
from PIL import Image, ImageDraw, ImageOps

from ..errors import ConfigError

GREY = 128
LABEL_HEIGHT = 14


def image_grid(images: torch.Tensor, nrow: int, *, scale: int | None = None, pad: int = 1) -> Image.Image:
    """One picture of ``images``, ``nrow`` per row: each pixel a ``scale`` x ``scale`` square (default: enough
    to make small images about 32 pixels wide), images separated by ``pad`` pixels of mid-grey. Grayscale ("L")
    for one channel, else RGB."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ConfigError("images of shape (N, 1 or 3, H, W)", f"{tuple(images.shape)}",
                          "Pass decoded images, not latents (write a tensor instead: --out images.pt).")
    count, channels, height, width = images.shape
    scale = scale or max(1, 32 // max(height, width))
    pixels = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    mode = "L" if channels == 1 else "RGB"
    tiles = [ImageOps.expand(Image.fromarray(p[0].numpy() if channels == 1 else p.permute(1, 2, 0).numpy(), mode)
                             .resize((width * scale, height * scale), Image.NEAREST), border=(0, 0, pad, pad), fill=GREY)
             for p in pixels]
    rows = -(-count // nrow)
    tiles += [Image.new(mode, tiles[0].size, GREY)] * (rows * nrow - count)
    grid = ImageOps.expand(make_image_grid(tiles, rows, nrow), border=(pad, pad, 0, 0), fill=(GREY,) * 3)
    return grid.convert(mode)


def save_grid(images: torch.Tensor, path: str | Path, nrow: int, **options) -> Path:
    """Write :func:`image_grid` to ``path`` (parents created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(images, nrow, **options).save(path)
    return path


def save_side_by_side(panels: dict[str, torch.Tensor], path: str | Path, nrow: int, **options) -> Path:
    """Write one picture with a grid per panel, left to right, each under its label (e.g. "dense", "elastic",
    "difference"); returns the path."""
    grids = {label: image_grid(images, nrow, **options) for label, images in panels.items()}
    mode = "RGB" if any(grid.mode == "RGB" for grid in grids.values()) else "L"
    measure = ImageDraw.Draw(Image.new(mode, (1, 1)))
    widths = [max(grid.width, int(measure.textlength(label)) + 6) for label, grid in grids.items()]  # labels fit
    height = max(grid.height for grid in grids.values()) + LABEL_HEIGHT
    canvas = Image.new(mode, (sum(widths), height), 255 if mode == "L" else (255, 255, 255))
    draw, left = ImageDraw.Draw(canvas), 0
    for (label, grid), width in zip(grids.items(), widths):
        draw.text((left + 2, 1), label, fill=0 if mode == "L" else (0, 0, 0))
        canvas.paste(grid.convert(mode), (left, LABEL_HEIGHT))
        left += width
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def difference(images: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``|images - reference|`` as images in [-1, 1]: black where equal, white where they differ by the whole range."""
    return (images - reference).abs() - 1.0
