"""Baselines trained and ranked by the same code as MP4SR (StageRunner, evaluate, finetune_loss).

    model = SASRec(cfg.model, feat_dim, use_features=False)   # item IDs only
    model = SASRec(cfg.model, feat_dim, use_features=True)    # "SASRecM": IDs + features
    id_emb = ItemIdEmbedding(num_items, cfg.model.d, known)
    StageRunner("finetune", cfg.train.finetune, cfg, model, id_emb, feats, data, directory).run()

SASRec has M2SE's interface with a single "modality": `encode_items` gives the feature part of
each item vector (zero for SASRec, an MLP of the mean-pooled features for SASRecM), the fine-tuning
code adds the item-ID rows, and the score is the cosine of the user and item vectors over tau,
trained with cross-entropy over the whole catalogue like MP4SR's fine-tuning. Popularity needs no
model: `train.loop.evaluate_popularity`.
"""

from __future__ import annotations

import torch
from mp4sr_train.config import ModelConfig
from mp4sr_train.model import M2SE, Block, ItemFeatures
from torch import Tensor, nn


def mean_pool(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of the present slots, (N, S, F) -> (N, F); zero for an item without any slot."""
    total = (x * mask[..., None]).sum(1)
    return total / mask.sum(1, keepdim=True).clamp(min=1)


class SASRec(nn.Module):
    """SASRec over item-ID embeddings; with `use_features`, SASRecM: mean-pooled text and image
    features through a small MLP, added to the ID embedding."""

    def __init__(self, cfg: ModelConfig, feat_dim: int, use_features: bool):
        super().__init__()
        self.cfg = cfg
        self.feature_mlp = (
            nn.Sequential(nn.Linear(2 * feat_dim, cfg.d), nn.GELU(), nn.Linear(cfg.d, cfg.d)) if use_features else None
        )
        self.position = nn.Embedding(cfg.max_len, cfg.d)
        self.input_ln = nn.LayerNorm(cfg.d, eps=cfg.layer_norm_eps)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        nn.init.normal_(self.position.weight, std=0.02)

    # The sequence encoder is M2SE's own code: it reads only position, input_ln, blocks and cfg,
    # so the baselines differ from MP4SR in their item vectors alone.
    encode_sequence = M2SE.encode_sequence
    encode_history = M2SE.encode_history

    def encode_items(self, feats: ItemFeatures, detach_pool: bool = False) -> Tensor:
        """Feature part of the item vectors, (1, N + 1, d), row 0 (padding) zero. `detach_pool` is
        accepted for the fine-tuning task's sake; there is no attention pooling to detach."""
        n = feats.text.shape[0]
        if self.feature_mlp is None:
            return feats.text.new_zeros(1, n, self.cfg.d)
        pooled = torch.cat([mean_pool(feats.text, feats.text_mask), mean_pool(feats.image, feats.image_mask)], -1)
        z = self.feature_mlp(pooled)  # (N + 1, d)
        return z.index_fill(0, torch.zeros(1, dtype=torch.long, device=z.device), 0.0)[None]
