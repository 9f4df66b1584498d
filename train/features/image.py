"""Item images -> words with CLIP (SPEC section 1): each image becomes a pseudo-sentence of the
vocabulary words closest to it, which the text encoder then embeds.

    vocabulary = build_vocabulary(all_item_texts)             # sorted words
    clip = Clip.load("ViT-B-32", weights=None)                # random tower: see Clip.load
    words = clip.encode_words(vocabulary)                     # float32 [W, D], unit rows
    images = clip.encode_images([decode_image(data)])         # float32 [1, D], unit rows
    top_words(images, words, vocabulary, 15)                  # ["tent lantern stove ..."]

Models come from open_clip's built-in configs or a JSON config file, weights only from a local
file: nothing is ever downloaded.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from mp4sr_train.checkpoint import file_sha256
from mp4sr_train.features.cache import content_key
from mp4sr_train.features.text import go_offline
from PIL import Image

from mp4sr_rt.errors import UserError

PROMPT = "a photo of {}"
# Enough to keep function words out of the vocabulary; content words are what CLIP can match.
STOP_WORDS = frozenset("""
    about above after again all also am an and any are as at be been before being below between
    both but by can could did do does doing down during each few for from further had has have
    having he her here hers him his how if in into is it its itself just me more most my no nor
    not now of off on once only or other our ours out over own same she should so some such than
    that the their theirs them then there these they this those through to too under until up
    very was we were what when where which while who whom why will with would you your yours
""".split())
_WORD = re.compile(r"[^\W\d_]+")  # runs of letters, any script


def build_vocabulary(texts: Iterable[str]) -> list[str]:
    """Sorted distinct lower-cased alphabetic words of length >= 2, stop-words removed."""
    words = set()
    for text in texts:
        words.update(w for w in _WORD.findall(text.lower()) if len(w) >= 2)
    return sorted(words - STOP_WORDS)


class Clip:
    """An open_clip model with its tokenizer and image preprocessing."""

    def __init__(self, model, tokenizer, preprocess, *, name: str, identity: str,
                 weights: dict | None, device: torch.device):
        self.model = model
        self.tokenizer = tokenizer
        self.preprocess = preprocess
        self.name = name
        self.identity = identity  # sha256 of config and weights: the cache key part
        self.weights = weights  # {"path", "sha256"}, or None for a randomly initialised tower
        self.device = device

    @classmethod
    def load(cls, name: str = "ViT-B-32", weights: Path | None = None,
             device: str | torch.device = "cpu") -> Clip:
        """``name``: an open_clip config (`open_clip.list_models()`) or a JSON config file.

        Without ``weights`` the towers are randomly initialised with a fixed seed, so reruns
        agree and the cache stays valid; the words then reflect image statistics, not meaning.
        """
        go_offline()
        import open_clip

        config = _model_config(name)
        custom_text = config.pop("custom_text", False)
        model_class = open_clip.CustomTextCLIP if custom_text else open_clip.CLIP
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = model_class(**config)
        if weights is None:
            source, weights_meta = f"random-init:torch-{torch.__version__}", None
        else:
            source = _load_weights(model, weights)
            weights_meta = {"path": str(Path(weights).resolve()), "sha256": source}
        tokenizer = open_clip.SimpleTokenizer(context_length=model.context_length)
        preprocess = open_clip.image_transform(model.visual.image_size, is_train=False)
        identity = content_key("mp4sr-clip/1", model_class.__name__,
                               json.dumps(config, sort_keys=True), source, open_clip.__version__)
        device = torch.device(device)
        return cls(model.to(device).eval(), tokenizer, preprocess, name=str(name),
                   identity=identity, weights=weights_meta, device=device)

    @torch.inference_mode()
    def encode_images(self, images: list[Image.Image]) -> np.ndarray:
        pixels = torch.stack([self.preprocess(image) for image in images]).to(self.device)
        return self.model.encode_image(pixels, normalize=True).float().cpu().numpy()

    @torch.inference_mode()
    def encode_words(self, words: list[str]) -> np.ndarray:
        tokens = self.tokenizer([PROMPT.format(w) for w in words]).to(self.device)
        if _trimmable(self.model):
            vectors = encode_text_trimmed(self.model, tokens)
        else:
            vectors = self.model.encode_text(tokens)
        return torch.nn.functional.normalize(vectors, dim=-1).float().cpu().numpy()


def encode_text_trimmed(model, tokens: torch.Tensor) -> torch.Tensor:
    """`model.encode_text(tokens)` computed on the positions up to the last end-of-text token.

    The text tower is causal and pools at the end-of-text token (the highest id), so the padding
    after it cannot change the result: a one-word prompt then costs about 6 positions, not 77.
    """
    from open_clip.transformer import text_global_pool

    n = int(tokens.argmax(dim=-1).max()) + 1
    tokens = tokens[:, :n]
    x = model.token_embedding(tokens) + model.positional_embedding[:n]  # (B, n, width)
    x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask[:n, :n]))
    x = text_global_pool(x, tokens, "argmax")  # (B, width)
    if isinstance(model.text_projection, torch.nn.Linear):
        return model.text_projection(x)
    return x @ model.text_projection


def _trimmable(model) -> bool:
    import open_clip

    return (type(model) is open_clip.CLIP and model.text_pool_type == "argmax"
            and model.attn_mask is not None and model.text_projection is not None)


def _model_config(name: str) -> dict:
    import open_clip

    path = Path(name).expanduser()
    if path.suffix == ".json":
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise UserError(f"CLIP config {path}: cannot be read ({e})") from None
        config = config.get("model_cfg", config)  # also accept an open_clip_config.json
    elif name in open_clip.list_models():
        config = open_clip.get_model_config(name)
    else:
        raise UserError(
            f"unknown CLIP model {name!r}: give an open_clip config name (e.g. ViT-B-32, ViT-B-16,"
            " RN50) or a JSON config file"
        )
    if not all(k in config for k in ("embed_dim", "vision_cfg", "text_cfg")):
        raise UserError(f"CLIP config {name}: needs embed_dim, vision_cfg and text_cfg")
    # These towers come from timm or Hugging Face and would fetch their own weights or tokenizer.
    outside = ("timm_model_name" in config["vision_cfg"] or "hf_model_name" in config["text_cfg"]
               or "hf_tokenizer_name" in config["text_cfg"] or "multimodal_cfg" in config)
    if outside:
        raise UserError(f"CLIP model {name}: timm or Hugging Face towers are not supported")
    return config


def _load_weights(model, weights: Path) -> str:
    import open_clip

    weights = Path(weights).expanduser()
    if not weights.is_file():
        raise UserError(f"--clip-weights {weights}: file not found")
    try:
        open_clip.load_checkpoint(model, str(weights))
    except Exception as e:  # torch, safetensors and load_state_dict each raise their own types
        raise UserError(f"--clip-weights {weights}: does not fit this CLIP model ({e})") from None
    return file_sha256(weights)
