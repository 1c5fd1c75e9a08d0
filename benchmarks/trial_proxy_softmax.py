"""Trial, outside the assets: a proxy softmax loss (NormSoftmax) on Banking77, 1-NN held-out accuracy.

Each intent gets a learnable proxy vector, started at the mean embedding of its training texts; each text
is pulled towards its intent's proxy and pushed from the other 76 with a softmax over scaled cosines, so
every step sees every intent as a negative (in-batch losses see at most the batch's). The model trains
on 80% of the split's training texts (what the plugin trains on with its 20% eval split), with AdamW at
the defaults' 2e-5 (the proxies at 1e-3), linear warmup over 10% of the steps, batch 32.

Usage: python -m benchmarks.trial_proxy_softmax [--split-seed 13] [--epochs 3] [--scale 20] [--proxy-lr 1e-3]
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np
import torch

from benchmarks.datasets import banking77_split
from st_assets.settings import DEFAULT_BASE_MODEL
from st_assets.steps.models import encode_texts, load_model, resolve_base_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split-seed", type=int, default=13)
    parser.add_argument("--epochs", type=float, default=3)
    parser.add_argument("--scale", type=float, default=20)
    parser.add_argument("--proxy-lr", type=float, default=1e-3)
    args = parser.parse_args()
    torch.manual_seed(42)
    rng = np.random.default_rng(42)
    train, test = banking77_split(seed=args.split_seed)
    fit = train.groupby("label").sample(frac=0.8, random_state=42).reset_index(drop=True)
    model = load_model(resolve_base_model(DEFAULT_BASE_MODEL))

    def knn_accuracy() -> float:
        similarities = (
            encode_texts(model, test["text"].tolist()) @ encode_texts(model, train["text"].tolist()).T
        )
        predicted = train["label"].to_numpy()[similarities.argmax(axis=1)]
        return float(np.mean(predicted == test["label"].to_numpy()))

    base = knn_accuracy()
    labels = sorted(fit["label"].unique())
    targets = torch.tensor(fit["label"].map({label: i for i, label in enumerate(labels)}).to_numpy())
    embeddings = torch.tensor(encode_texts(model, fit["text"].tolist()))
    proxies = torch.nn.Parameter(torch.stack([embeddings[targets == i].mean(0) for i in range(len(labels))]))
    optimizer = torch.optim.AdamW(
        [
            {"params": model.parameters(), "lr": 2e-5},
            {"params": [proxies], "lr": args.proxy_lr, "weight_decay": 0.0},
        ],
        weight_decay=0.01,
    )
    batch_size = 32
    steps = math.ceil(len(fit) / batch_size * args.epochs)
    warmup = int(0.1 * steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: (step + 1) / warmup if step < warmup else max(0.0, (steps - step) / (steps - warmup)),
    )
    texts = fit["text"].tolist()
    started = time.perf_counter()
    model.train()
    step = 0
    while step < steps:
        order = rng.permutation(len(fit))
        for start in range(0, len(order), batch_size):
            if step == steps:
                break
            batch = order[start : start + batch_size]
            features = model.preprocess([texts[i] for i in batch])
            embedded = torch.nn.functional.normalize(model(features)["sentence_embedding"], dim=-1)
            logits = args.scale * embedded @ torch.nn.functional.normalize(proxies, dim=-1).T
            loss = torch.nn.functional.cross_entropy(logits, targets[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
    model.eval()
    print(
        json.dumps(
            {
                "trial": "proxy_softmax",
                **vars(args),
                "train_texts": len(fit),
                "test_queries": len(test),
                "base_1nn_accuracy": base,
                "finetuned_1nn_accuracy": knn_accuracy(),
                "train_seconds": time.perf_counter() - started,
            }
        )
    )


if __name__ == "__main__":
    main()
