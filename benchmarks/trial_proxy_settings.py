"""Trial: bench_quality with ProxySoftmaxLoss's constants changed for one run, through the assets.

The passes, scale and proxy learning rate are constants of the code (st_assets/steps/proxy_loss.py), not
settings; this runs `bench_quality` with them set otherwise, and with label smoothing in the loss's softmax.
The constants set here do not enter the model version: each run trains in a folder of its own anyway.

Usage: python -m benchmarks.trial_proxy_settings [--passes 5] [--scale 20] [--proxy-lr 1e-3]
       [--label-smoothing 0] -- banking77 --split-seed N [--set key=json-value ...]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable

import torch.nn.functional as F
from sentence_transformers import SentenceTransformer
from torch import Tensor

from benchmarks import bench_quality
from st_assets.steps import proxy_loss, train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passes", type=int, default=proxy_loss.PROXY_PASSES)
    parser.add_argument("--scale", type=float, default=proxy_loss.PROXY_SCALE)
    parser.add_argument("--proxy-lr", type=float, default=proxy_loss.PROXY_LEARNING_RATE)
    parser.add_argument("--label-smoothing", type=float, default=0.0)
    parser.add_argument("bench_quality_args", nargs=argparse.REMAINDER, help="after --: bench_quality's own")
    args = parser.parse_args()

    class TrialProxySoftmaxLoss(proxy_loss.ProxySoftmaxLoss):
        """ProxySoftmaxLoss at the trial's scale, with label smoothing in its cross-entropy."""

        def __init__(self, model: SentenceTransformer, proxies: Tensor) -> None:
            super().__init__(model, proxies, scale=args.scale)

        def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor) -> Tensor:
            return F.cross_entropy(
                self.logits(sentence_features), labels.long(), label_smoothing=args.label_smoothing
            )

    train.PROXY_PASSES = args.passes
    train.PROXY_LEARNING_RATE = args.proxy_lr
    train.ProxySoftmaxLoss = TrialProxySoftmaxLoss
    print(
        f"trial: passes {args.passes}, scale {args.scale}, proxy learning rate {args.proxy_lr}, "
        f"label smoothing {args.label_smoothing}",
        flush=True,
    )
    remaining = (
        args.bench_quality_args[1:] if args.bench_quality_args[:1] == ["--"] else args.bench_quality_args
    )
    sys.argv = [sys.argv[0], *remaining]
    bench_quality.main()


if __name__ == "__main__":
    main()
