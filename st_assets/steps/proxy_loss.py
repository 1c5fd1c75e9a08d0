"""A proxy softmax loss for labelled texts: every label has a learnable vector, every step sees every label."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from sentence_transformers import SentenceTransformer
from torch import Tensor, nn

PROXY_LOSS = "ProxySoftmaxLoss"
# Cosines times 20, as MultipleNegativesRankingLoss scales them.
PROXY_SCALE = 20.0
# The proxies start at their label's mean embedding and move 50 times as fast as the model's weights
# (1e-3 against the default 2e-5): a proxy is one vector, the model the many weights behind every text.
PROXY_LEARNING_RATE = 1e-3
# Each labelled text appears this many times in an epoch: on Banking77 (BENCHMARKS.md) one pass read +0.9
# points of 1-NN accuracy in a plain script and three +1.7; through the assets five passes beat three on
# five of six splits, and seven added about one query a split for 40% more time. Other formats in the run
# keep one pass an epoch.
PROXY_PASSES = 5


def label_proxies(vectors: np.ndarray, label_indices: Sequence[int]) -> Tensor:
    """The mean of each label's unit vectors, one row per label index (0 to the largest index)."""
    indices = np.asarray(label_indices)
    return torch.tensor(
        np.stack([vectors[indices == index].mean(axis=0) for index in range(int(indices.max()) + 1)])
    )


class ProxySoftmaxLoss(nn.Module):
    """NormSoftmax (Zhai and Wu, 2018): a text's scaled cosines to every label's proxy, softmaxed towards
    its own label.

    In-batch losses show a text the labels of its batch alone; this one shows it all of them at every step.
    Under MatryoshkaLoss the proxies are cut to the embeddings' dimensions as the embeddings are.
    """

    def __init__(self, model: SentenceTransformer, proxies: Tensor, scale: float = PROXY_SCALE) -> None:
        super().__init__()
        self.model = model
        self.proxies = nn.Parameter(proxies.clone().float())
        self.scale = scale

    def logits(self, sentence_features: Iterable[dict[str, Tensor]]) -> Tensor:
        """Each text's scaled cosines to every label's proxy, one row per text."""
        (features,) = sentence_features
        embeddings = self.model(features)["sentence_embedding"]
        proxies = self.proxies[:, : embeddings.shape[-1]]
        return self.scale * F.normalize(embeddings, dim=-1) @ F.normalize(proxies, dim=-1).T

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor) -> Tensor:
        return F.cross_entropy(self.logits(sentence_features), labels.long())

    def get_config_dict(self) -> dict[str, float | int]:
        return {"scale": self.scale, "labels": len(self.proxies)}
