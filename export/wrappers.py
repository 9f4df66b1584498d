"""Tensor-only, positional modules around M2SE: what the ONNX files compute (STYLE 3 and 7).

    Scorer(model, inputs, outputs, k)(ids)                -> scores (B, K), items (B, K), user (B, M d)
    ItemTower(model, id_emb)(feats, mask, ...)            -> table (n, M d), inputs (n, M d)
    HistoryEncoder(model)(inputs, lengths)                -> user (B, M d)
    SentenceEncoder(bert, pooling, normalize)(input_ids, attention_mask) -> vectors (B, F)
    ImageEncoder(clip)(pixels)                            -> vectors (B, D), unit rows

M is the model's number of modalities (text, then image; one in a single-modality model), d its
width. Histories are right-padded with item 0 (train/model.py). The graphs use train.model's own
`serving_table`, `user_vector` and `concat_modalities`; parity checks the whole against the
training forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from mp4sr_train.features.text import pool_tokens
from mp4sr_train.model import M2SE, ItemIdEmbedding, concat_modalities, serving_table, untrained_vectors, user_vector
from torch import Tensor, nn


class Scorer(nn.Module):
    """Item-ID histories -> top-k items over the catalogue folded into the graph.

    `inputs` and `outputs` (M, N + 1, d): the catalogue's sequence-input and candidate-side
    vectors (model.item_vectors). `block` > 0: the top k in two stages over blocks of that many
    items (block_topk)."""

    def __init__(self, model: M2SE, inputs: Tensor, outputs: Tensor, k: int, block: int = 0):
        super().__init__()
        self.model = model
        self.k = k
        self.block = block
        self.register_buffer("inputs", inputs.detach().clone())  # (M, N + 1, d)
        table = serving_table(outputs)  # (N + 1, M d)
        # -inf on the padding column, and on the columns that fill the last block, so they can
        # never enter the top k (k <= N); an additive bias rather than an in-place write keeps
        # the graph a plain MatMul + Add + TopK.
        columns = len(table) + (-len(table) % block if block else 0)
        pad_bias = torch.full((columns,), float("-inf"))
        pad_bias[1:len(table)] = 0.0
        table = F.pad(table, (0, 0, 0, columns - len(table)))
        self.register_buffer("table_t", table.detach().t().contiguous())  # (2d, columns)
        self.register_buffer("pad_bias", pad_bias)

    def forward(self, ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        # encode_history, with the last layer computed at the last position alone (encode_last).
        x = self.inputs[:, ids].flatten(0, 1)  # (M B, L, d): text rows, then image rows
        lengths = (ids != 0).sum(-1).repeat(len(self.inputs))
        h = self.model.encode_last(x, lengths).view(len(self.inputs), ids.shape[0], -1)  # (M, B, d)
        user = user_vector(h)  # (B, M d)
        scores = user @ self.table_t + self.pad_bias
        if self.block:
            scores, items = block_topk(scores, self.k, self.block)
        else:
            scores, items = torch.topk(scores, self.k, dim=-1)
        return scores, items, user


def block_topk(scores: Tensor, k: int, block: int) -> tuple[Tensor, Tensor]:
    """torch.topk(scores, k) (up to the order of ties) as two top-ks over far fewer values.

    scores (B, N), N a multiple of `block`. The k best items lie in the k blocks of highest
    maximum: a block outside those has a maximum no higher than each of theirs, so they hold k
    items at least as good as any of its own. Stage 1: the top k of the N / block maxima;
    stage 2: the top k of those blocks' k * block scores."""
    b, n = scores.shape
    blocks = scores.view(b, n // block, block)
    chosen = torch.topk(blocks.amax(dim=-1), min(k, n // block), dim=-1).indices  # (B, k)
    candidates = blocks.gather(1, chosen.unsqueeze(-1).expand(-1, -1, block))  # (B, k, block)
    top, where = torch.topk(candidates.flatten(1), k, dim=-1)  # (B, k)
    return top, chosen.gather(1, where // block) * block + where % block


class ItemTower(nn.Module):
    """Feature slots of new items -> their serving rows and sequence-input vectors.

    Inputs: per modality of the model, in its order, the slots (n, S, F) and their mask (n, S).
    Items unseen in training have no trained ID row (SPEC section 4): their vectors are the
    feature-only z, plus, where the model predicts ID rows from features (`id_emb.project`), that
    prediction, as in training (ItemIdEmbedding): table = [c_text, c_image] normalised per
    modality, inputs = [x_text, x_image] with x = z (+ predicted ID row); c is x, or with untied ID
    rows z plus the candidate side's predicted row (model.untrained_vectors)."""

    def __init__(self, model: M2SE, id_emb: ItemIdEmbedding | None = None):
        super().__init__()
        self.model = model
        self.id_emb = id_emb

    def forward(self, feats: Tensor, mask: Tensor, feats_2: Tensor | None = None,
                mask_2: Tensor | None = None) -> tuple[Tensor, Tensor]:
        slots = [(feats, mask), (feats_2, mask_2)][:len(self.model.cfg.modalities)]
        z = torch.stack([self.model.adaptor[m](self.model.pool_slots(m, x, x_mask))
                         for m, (x, x_mask) in enumerate(slots)])  # (M, n, d)
        x, outputs = untrained_vectors(z, self.id_emb)
        return serving_table(outputs), concat_modalities(x)


class HistoryEncoder(nn.Module):
    """Sequence-input vectors of a right-padded history (any items, new ones included) -> user vector.

    `inputs` (B, L, M d) holds per position [input_text, input_image] (zeros at padding), e.g. rows
    of the artifact's item_inputs.npy or the item tower's `inputs` output; `lengths` (B,) counts
    the real positions."""

    def __init__(self, model: M2SE):
        super().__init__()
        self.model = model

    def forward(self, inputs: Tensor, lengths: Tensor) -> Tensor:
        m, b = len(self.model.cfg.modalities), inputs.shape[0]
        x = torch.cat(inputs.chunk(m, dim=-1), dim=0)  # (M B, L, d): text rows, then image rows
        h = self.model.encode_last(x, lengths.repeat(m))  # (M B, d), as encode_sequence
        return user_vector(h.view(m, b, -1))


class SentenceEncoder(nn.Module):
    """Token ids -> sentence vectors, pooled as train.features.text.TextEncoder pools them.

    token_type_ids are left to the model's default (zeros), which is what a tokenizer gives a
    single sentence."""

    def __init__(self, model: nn.Module, pooling: str, normalize: bool):
        super().__init__()
        self.model = model
        self.pooling = pooling
        self.normalize = normalize

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, F)
        return pool_tokens(hidden, attention_mask, self.pooling, self.normalize)


class ImageEncoder(nn.Module):
    """Preprocessed pixels (B, 3, H, W) -> unit CLIP image vectors, as train.features.image.Clip."""

    def __init__(self, clip_model: nn.Module):
        super().__init__()
        self.clip = clip_model

    def forward(self, pixels: Tensor) -> Tensor:
        return self.clip.encode_image(pixels, normalize=True)
