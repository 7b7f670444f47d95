"""Train the digit classifier that scores the reference model, on the reference train split.

    PYTHONPATH=. python benchmarks/train_classifier.py            # writes elastic_compile/assets/reference/classifier
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from elastic_compile.reference import ASSETS_DIR
from elastic_compile.reference.classifier import save_classifier, train_classifier
from elastic_compile.reference.data import load_digits_split


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ASSETS_DIR / "classifier"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.time()
    model, report = train_classifier(load_digits_split(), seed=args.seed, epochs=args.epochs)
    report["wall_time_s"] = round(time.time() - start, 1)
    save_classifier(model, Path(args.out), report)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
