"""M2SE: the MP4SR backbone (SPEC section 2). Tensors in, tensors out: no I/O, no losses.

Serving split (SPEC section 4):
    z = model.encode_items(feats)                     # (M, N + 1, d): per-modality item vectors
    inputs, outputs = item_vectors(z, id_emb)         # fine-tuned models add item-ID rows
    h = model.encode_history(ids, inputs)             # (M, B, d): user vector per modality
    scores = score(h, candidates(outputs))            # (B, N + 1): cos(text) + cos(image)
M = len(cfg.modalities): 2 (text, then image) except in single-modality ablations.
Item index 0 is padding; histories are right-padded.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from mp4sr_train.config import IdConfig, ModelConfig
from torch import Tensor, nn

if TYPE_CHECKING:
    from mp4sr_train.features.store import RowReader

MODALITIES = ("text", "image")


@dataclass(frozen=True)
class ItemFeatures:
    """Per-item feature slots for the whole catalogue, row 0 being the padding item.

    In memory (`rows` None) the tensors hold one row per item. Mapped (`ItemFeatures.mapped`, a
    catalogue larger than memory): the feature tensors are memory maps of a features file's rows
    (float32 or float16, on the CPU), `rows` gives each item's row there and `take` reads only
    the rows a step touches, as float32 on `target`; the whole table is never in memory at once.
    """

    text: Tensor  # (N + 1, S, F); mapped: (R, S, F), the file's rows
    text_mask: Tensor  # (N + 1, S) bool; mapped: (R, S)
    image: Tensor  # (N + 1, V, F); mapped: (R, V, F)
    image_mask: Tensor  # (N + 1, V) bool; mapped: (R, V)
    rows: Tensor | None = None  # mapped: (N + 1,) int64 row of each item in the tensors, -1 for padding
    target: torch.device | None = None  # mapped: where `take` puts its rows
    readers: tuple[RowReader | None, RowReader | None] | None = dataclasses.field(default=None, compare=False)  # mapped

    @classmethod
    def mapped(cls, text: Tensor, text_mask: Tensor, image: Tensor, image_mask: Tensor, rows: Tensor,
               target: torch.device | str = "cpu", readers: tuple[RowReader | None, RowReader | None] | None = None,
               ) -> ItemFeatures:
        """Features read on demand: `rows` (N,) the row of each item in the stored tensors;
        `readers`, when given, read the (text, image) rows from the file (features.store.RowReader;
        None for a tensor held in memory) instead of indexing the tensors, keeping the process's
        resident memory flat."""
        rows = torch.cat([torch.full((1,), -1, dtype=torch.long), torch.as_tensor(rows, dtype=torch.long)])
        return cls(text, text_mask, image, image_mask, rows, torch.device(target), readers)

    @property
    def is_mapped(self) -> bool:
        return self.rows is not None

    def __len__(self) -> int:
        """N + 1: the catalogue's items and the padding row."""
        return int(self.text.shape[0] if self.rows is None else self.rows.shape[0])

    @property
    def dim(self) -> int:
        return int(self.text.shape[-1])

    @property
    def device(self) -> torch.device:
        return self.text.device if self.target is None else self.target

    def take(self, index: Tensor) -> ItemFeatures:
        """The rows `index` (n,), in that order: the features of the items a step touches
        (in memory, float32)."""
        if self.rows is None:
            return ItemFeatures(*(t[index] for t in (self.text, self.text_mask, self.image, self.image_mask)))
        rows = self.rows[index.cpu()]
        padding = rows < 0
        rows = rows.clamp(min=0)
        parts = []
        for m, (feats, mask) in enumerate(((self.text, self.text_mask), (self.image, self.image_mask))):
            reader = self.readers[m] if self.readers is not None else None
            values = (feats[rows] if reader is None else torch.from_numpy(reader.read(rows.numpy()))).float()
            values[padding] = 0.0
            parts += [values.to(self.target), (mask[rows] & ~padding[:, None]).to(self.target)]
        return ItemFeatures(*parts)

    def materialise(self) -> ItemFeatures:
        """In memory, float32, one row per item (a mapped catalogue read whole)."""
        return self if self.rows is None else self.take(torch.arange(len(self)))

    def to(self, device: torch.device | str) -> ItemFeatures:
        if self.rows is not None:
            return dataclasses.replace(self, target=torch.device(device))
        return ItemFeatures(*(t.to(device) for t in (self.text, self.text_mask, self.image, self.image_mask)))

    def modality(self, m: int) -> tuple[Tensor, Tensor]:
        if self.rows is not None:
            raise RuntimeError("mapped item features are read through take() or materialise()")
        return (self.text, self.text_mask) if m == 0 else (self.image, self.image_mask)

    def present(self) -> tuple[str, ...]:
        """The modalities at least one item has (a text-only catalogue: just "text")."""
        masks = (self.text_mask, self.image_mask)
        if self.rows is not None:
            masks = tuple(mask[self.rows[1:]] for mask in masks)
        return tuple(name for name, mask in zip(MODALITIES, masks, strict=True) if bool(mask.any()))


class AttentionPool(nn.Module):
    """alpha = softmax(W2 (W1 x + b1) + b2) over the slot axis, masked slots excluded.

    b1 and b2 add the same constant to every slot's logit, which the softmax cancels: they could
    never receive a gradient, so they are left out (the function computed is the same)."""

    def __init__(self, feat_dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(feat_dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, 1, bias=False)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        logits = self.w2(self.w1(x)).squeeze(-1)  # (N, S)
        # finfo.min rather than -inf: a row with no slot stays finite (its output is replaced
        # by the learned missing vector by the caller).
        logits = logits.masked_fill(~mask, torch.finfo(logits.dtype).min)
        alpha = torch.softmax(logits, dim=-1)
        return torch.einsum("ns,nsf->nf", alpha, x)  # (N, F)


class MoEAdaptor(nn.Module):
    """Dense mixture of experts F -> d; every expert is LayerNorm(Dropout(Linear)).

    The experts are one batched matrix product: weight (E, F, d)."""

    def __init__(self, feat_dim: int, d: int, n_experts: int, dropout: float, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_experts, feat_dim, d))
        self.bias = nn.Parameter(torch.zeros(n_experts, d))
        self.ln_weight = nn.Parameter(torch.ones(n_experts, d))
        self.ln_bias = nn.Parameter(torch.zeros(n_experts, d))
        # Zero-initialised gate: uniform mixture at the start (SPEC section 2).
        self.gate = nn.Parameter(torch.zeros(feat_dim, n_experts))
        self.dropout = nn.Dropout(dropout)
        self.eps = eps
        bound = feat_dim**-0.5
        nn.init.uniform_(self.weight, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        y = torch.einsum("nf,efd->ned", x, self.weight) + self.bias  # (N, E, d)
        y = F.layer_norm(self.dropout(y), y.shape[-1:], eps=self.eps)
        y = y * self.ln_weight + self.ln_bias
        gate = torch.softmax(x @ self.gate, dim=-1)  # (N, E)
        return torch.einsum("ne,ned->nd", gate, y)


class Block(nn.Module):
    """Post-LN causal transformer layer (SASRec / RecBole layout) on scaled_dot_product_attention."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.d, 3 * cfg.d)
        self.out = nn.Linear(cfg.d, cfg.d)
        self.ln1 = nn.LayerNorm(cfg.d, eps=cfg.layer_norm_eps)
        self.ff1 = nn.Linear(cfg.d, cfg.inner)
        self.ff2 = nn.Linear(cfg.inner, cfg.d)
        self.ln2 = nn.LayerNorm(cfg.d, eps=cfg.layer_norm_eps)
        self.dropout = cfg.dropout

    def forward(self, x: Tensor) -> Tensor:
        b, length, d = x.shape
        q, k, v = self.qkv(x).view(b, length, 3, self.n_heads, d // self.n_heads).unbind(2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, L, d / H)
        # Causal only, no key-padding mask: with right padding a real position never sees a
        # pad, and a pad position always sees position 0, so no row is fully masked (no NaN).
        a = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
        a = a.transpose(1, 2).reshape(b, length, d)
        x = self.ln1(x + F.dropout(self.out(a), self.dropout, self.training))
        ff = self.ff2(F.gelu(self.ff1(x)))
        return self.ln2(x + F.dropout(ff, self.dropout, self.training))

    def forward_last(self, x: Tensor, last: Tensor) -> Tensor:
        """This layer's output at position `last` (B,) of each row of x (B, L, d), causal as
        forward (see M2SE.encode_last). Inference only: no dropout."""
        b, length, d = x.shape
        heads, head_dim = self.n_heads, d // self.n_heads
        _, w_k, w_v = self.qkv.weight.view(3, heads, head_dim, d).unbind(0)  # each (H, d / H, d)
        b_v = self.qkv.bias[2 * d:].view(heads, head_dim)
        row = x[torch.arange(b, device=x.device), last]  # (B, d)
        q = (row @ self.qkv.weight[:d].t() + self.qkv.bias[:d]).view(b, heads, 1, head_dim)
        r = q @ w_k  # (B, H, 1, d): Wk_h^T q_h
        logits = (r @ x.unsqueeze(1).transpose(-1, -2)).squeeze(2) * head_dim**-0.5  # (B, H, L)
        future = torch.arange(length, device=x.device) > last[:, None]  # (B, L)
        a = torch.softmax(logits.masked_fill(future[:, None], float("-inf")), dim=-1)
        context = (a.unsqueeze(2) @ x.unsqueeze(1)).squeeze(2)  # (B, H, d): a H
        v = (context.unsqueeze(2) @ w_v.transpose(-1, -2)).squeeze(2) + b_v  # (B, H, d / H)
        row = self.ln1(row + self.out(v.reshape(b, d)))
        return self.ln2(row + self.ff2(F.gelu(self.ff1(row))))


class M2SE(nn.Module):
    """Multimodal item encoder + shared sequence encoder."""

    def __init__(self, cfg: ModelConfig, feat_dim: int):
        super().__init__()
        self.cfg = cfg
        self.feat_dim = feat_dim
        self.pool = nn.ModuleList(AttentionPool(feat_dim, cfg.pool_hidden) for _ in cfg.modalities)
        self.missing = nn.Parameter(torch.randn(len(cfg.modalities), feat_dim) * 0.02)
        self.adaptor = nn.ModuleList(
            MoEAdaptor(feat_dim, cfg.d, cfg.n_experts, cfg.adaptor_dropout, cfg.layer_norm_eps)
            for _ in cfg.modalities
        )
        self.position = nn.Embedding(cfg.max_len, cfg.d)
        self.input_ln = nn.LayerNorm(cfg.d, eps=cfg.layer_norm_eps)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        nn.init.normal_(self.position.weight, std=0.02)

    def pool_items(self, feats: ItemFeatures, m: int) -> Tensor:
        """Attention-pool the slots of the model's m-th modality: (N + 1, F); items without any
        slot get `missing`."""
        return self.pool_slots(m, *feats.modality(MODALITIES.index(self.cfg.modalities[m])))

    def pool_slots(self, m: int, x: Tensor, mask: Tensor) -> Tensor:
        """pool_items on the m-th modality's slots x (n, S, F) and mask (n, S)."""
        pooled = self.pool[m](x, mask)
        return torch.where(mask.any(-1, keepdim=True), pooled, self.missing[m])

    def encode_items(self, feats: ItemFeatures, detach_pool: bool = False) -> Tensor:
        """Item vectors of the whole catalogue, (M, N + 1, d), row 0 (padding) zero.

        Computed once per step and gathered by id afterwards: the experts see each item once
        rather than once per history position, so expert dropout acts per item, not per position.
        `detach_pool` reproduces the reference, whose pooling weights never receive gradients."""
        out = []
        for m in range(len(self.cfg.modalities)):
            pooled = self.pool_items(feats, m)
            if detach_pool:
                pooled = pooled.detach()
            out.append(self.adaptor[m](pooled))
        z = torch.stack(out)  # (M, N + 1, d)
        return z.index_fill(1, torch.zeros(1, dtype=torch.long, device=z.device), 0.0)

    def encode_sequence(self, x: Tensor, lengths: Tensor) -> Tensor:
        """Encode right-padded input vectors (B, L, d) -> hidden state at the last real position (B, d)."""
        length = x.shape[1]
        pos = self.position(torch.arange(length, device=x.device))  # (L, d)
        h = self.input_ln(F.dropout(x + pos, self.cfg.dropout, self.training))
        for block in self.blocks:
            h = block(h)
        last = (lengths - 1).clamp(min=0)  # an empty history reads position 0 (finite, unused)
        return h[torch.arange(h.shape[0], device=h.device), last]

    def encode_last(self, x: Tensor, lengths: Tensor) -> Tensor:
        """What encode_sequence returns in eval mode, computing the last layer at the last real
        position alone (inference only: no dropout).

        The serving path (export/wrappers.py): it reads one output row, so the last layer needs
        no queries, feed-forward or keys/values at the other positions. Its attention is
        rewritten per head h, with q the query row and H the layer's inputs (B, L, d):
            logits = q_h . (H Wk_h^T + bk_h) = H (Wk_h^T q_h) + const  (the const cancels in softmax)
            output = a (H Wv_h^T + bv_h)     = (a H) Wv_h^T + bv_h    (a sums to 1)
        so it costs O(L d) per head rather than O(L d^2): about half the FLOPs of a 2-layer model."""
        length = x.shape[1]
        h = self.input_ln(x + self.position.weight[:length])
        for block in self.blocks[:-1]:
            h = block(h)
        return self.blocks[-1].forward_last(h, (lengths - 1).clamp(min=0))

    def encode_history(self, ids: Tensor, inputs: Tensor) -> Tensor:
        """ids (B, L) right-padded, inputs (M, N + 1, d) -> user vectors (M, B, d).

        All modalities go through the shared encoder as one batch of M * B sequences."""
        m, b = len(inputs), ids.shape[0]
        lengths = (ids != 0).sum(-1)
        x = inputs[:, ids].flatten(0, 1)  # (M * B, L, d)
        return self.encode_sequence(x, lengths.repeat(m)).view(m, b, -1)


class ItemIdEmbedding(nn.Module):
    """Fine-tuning's item-ID embedding: rows `scale * weight`, weight N(0, init_std); only items
    seen in training have a trained row.

    An item without a trained row (never seen in training, or dropped in this step: see
    `finetune_loss`) gets zero, as in the paper, or with `from_features` an ID-like row predicted
    from its feature vectors, `project([z_text, z_image])`: the model then learns to rank such
    items among trained ones, and items added after training (cold start) get the same.

    `candidate_rows` (IdConfig): "tied", an item's ID row is the same as a history input and as a
    candidate (the paper); "untied", the candidate side has rows of its own (`out_weight`, and
    `project_out` for the predicted ones), as the input and output embeddings of a language model
    can; "residual", the candidate row is the input row plus a learned difference that starts at
    zero (tied at the start, untied where training moves it)."""

    def __init__(self, num_items: int, d: int, known: Tensor, init_std: float = 0.02,
                 from_features: bool = False, modalities: int = 2, scale: float = 1.0,
                 candidate_rows: str = "tied"):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_items + 1, d) * init_std)
        self.scale = scale
        # Items never seen in training (and padding) have no trained ID row.
        self.register_buffer("known", known.bool().clone(), persistent=True)
        self.project = nn.Linear(modalities * d, d) if from_features else None
        self.residual = candidate_rows == "residual"
        self.out_weight = self.project_out = None
        if candidate_rows != "tied":
            self.out_weight = nn.Parameter(torch.zeros(num_items + 1, d) if self.residual
                                           else torch.randn(num_items + 1, d) * init_std)
            self.project_out = nn.Linear(modalities * d, d) if from_features else None
            if self.residual and self.project_out is not None:
                nn.init.zeros_(self.project_out.weight)
                nn.init.zeros_(self.project_out.bias)

    @classmethod
    def create(cls, ids: IdConfig, num_items: int, d: int, known: Tensor, modalities: int) -> ItemIdEmbedding:
        return cls(num_items, d, known, ids.init_std, ids.from_features, modalities, ids.scale, ids.candidate_rows)

    @property
    def untied(self) -> bool:
        """Whether candidates have ID rows of their own (candidate_rows "untied" or "residual")."""
        return self.out_weight is not None

    def forward(self, z: Tensor, drop: Tensor | None = None, candidate: bool = False) -> Tensor:
        """ID rows (N + 1, d) for the item vectors z (M, N + 1, d); `drop` (N + 1,) bool marks
        trained rows to treat as missing; `candidate`: the candidate side's rows (the same as the
        inputs' unless untied). Row 0 (padding) is zero."""
        return self.rows(torch.arange(len(self.known), device=z.device), z, drop, candidate)

    def rows(self, index: Tensor, z: Tensor, drop: Tensor | None = None, candidate: bool = False) -> Tensor:
        """forward() restricted to the items `index` (n,), z their item vectors (M, n, d): their
        ID rows (n, d), padding (index 0) zero; `drop` (N + 1,) as in forward()."""
        have = self.known[index] if drop is None else self.known[index] & ~drop[index]
        rows = self.weight[index]
        if candidate and self.untied:
            rows = rows + self.out_weight[index] if self.residual else self.out_weight[index]
        rows = rows * (self.scale * have[:, None])
        if self.project is not None:
            rows = torch.where(have[:, None], rows, self.from_features(z, candidate))
        return rows.masked_fill((index == 0)[:, None], 0.0)

    def from_features(self, z: Tensor, candidate: bool = False) -> Tensor:
        """ID-like rows predicted from item vectors z (M, n, d) -> (n, d); `from_features` only."""
        x = z.permute(1, 0, 2).flatten(1)
        if not (candidate and self.untied):
            return self.project(x)
        return self.project(x) + self.project_out(x) if self.residual else self.project_out(x)


def item_vectors(z: Tensor, id_emb: ItemIdEmbedding | None, drop: Tensor | None = None,
                 index: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(inputs, outputs) of the items whose feature vectors are z (M, n, d): their sequence-input
    vectors and their candidate-side vectors (normalised by `candidates`), z plus the ID rows of
    either side; one tensor twice unless the ID embedding is untied. `index` (n,): the items' ids
    when z holds some items only (default: z is the whole catalogue); `drop` as ItemIdEmbedding."""
    if id_emb is None:
        return z, z
    index = torch.arange(z.shape[1], device=z.device) if index is None else index
    inputs = z + id_emb.rows(index, z, drop)
    return inputs, (z + id_emb.rows(index, z, drop, candidate=True)) if id_emb.untied else inputs


def untrained_vectors(z: Tensor, id_emb: ItemIdEmbedding | None) -> tuple[Tensor, Tensor]:
    """item_vectors of items without a trained ID row (new items), from their item vectors z
    (M, n, d): z itself, plus the predicted ID rows of either side where the model has them."""
    if id_emb is None or id_emb.project is None:
        return z, z
    inputs = z + id_emb.from_features(z)
    return inputs, (z + id_emb.from_features(z, candidate=True)) if id_emb.untied else inputs


def candidates(inputs: Tensor) -> Tensor:
    """Normalised candidate vectors c_m[j], (M, N + 1, d)."""
    return F.normalize(inputs, dim=-1)


def score(h: Tensor, cands: Tensor) -> Tensor:
    """cos(h_text, c_text[j]) + cos(h_image, c_image[j]) -> (B, N + 1); the padding column is -inf."""
    s = torch.einsum("mbd,mnd->bn", F.normalize(h, dim=-1), cands)
    s[:, 0] = float("-inf")
    return s


def concat_modalities(x: Tensor) -> Tensor:
    """(M, n, d) -> (n, M * d): the modalities side by side, text first. A concatenation rather
    than a Flatten, so that an exported graph keeps the width M * d static."""
    return torch.cat(x.unbind(0), dim=-1)


def serving_table(inputs: Tensor) -> Tensor:
    """t_j = [c_text[j], c_image[j]]: (N + 1, M * d), so that score = u . t_j (SPEC section 4)."""
    return concat_modalities(candidates(inputs))


def user_vector(h: Tensor) -> Tensor:
    """u = [h_text / |h_text|, h_image / |h_image|]: (B, M * d)."""
    return concat_modalities(F.normalize(h, dim=-1))
