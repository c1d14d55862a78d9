"""A model's image preprocessing (handed out with it by checkpoint.create_model_and_transforms, as in open_clip):
a path or a PIL image -> checked 8-bit RGB (open_image) -> reduced to the training faces' side (reduce_to,
cfg.source_side) -> resized to cfg.image_size -> train-time augmentation (albumentations) -> normalised tensor.
"""
from __future__ import annotations

import albumentations as A
import numpy as np
import timm
import torch
from PIL import Image, UnidentifiedImageError

from config import Config
from image_files import to_rgb, upright


class BadImage(Exception):
    """An image file that cannot be decoded."""


def image_stats(cfg: Config) -> tuple[tuple, tuple]:
    """Normalisation mean/std of the image tower (timm's pretrained config; ImageNet when unknown)."""
    pc = timm.get_pretrained_cfg(cfg.image_model)
    mean = getattr(pc, "mean", None) or (0.485, 0.456, 0.406)
    std = getattr(pc, "std", None) or (0.229, 0.224, 0.225)
    return tuple(mean), tuple(std)


def build_transform(cfg: Config, train: bool, resize: bool = True) -> A.Compose:
    """Resize (unless resize=False: the input is already image_size, e.g. from the decode cache), the train-time
    augmentation when train and cfg.augment, then normalisation to a [3, H, W] tensor."""
    mean, std = image_stats(cfg)
    ops = [A.Resize(cfg.image_size, cfg.image_size)] if resize else []
    if train and cfg.augment:
        ops += [A.HorizontalFlip(p=0.5),
                A.Affine(scale=(0.9, 1.1), translate_percent=(-0.05, 0.05), rotate=(-10, 10), p=0.7),
                A.RandomBrightnessContrast(0.2, 0.2, p=0.5)]
        if cfg.augment_photo:
            ops += photo_degradations()
    ops += [A.Normalize(mean=mean, std=std), A.ToTensorV2()]
    return A.Compose(ops)


def photo_degradations() -> list:
    """What a face found in a user's photo went through before the model sees it (--augment-photo): a small face
    upscaled (downscale then back), JPEG, focus blur, exposure (gamma), and the looser, shifted box of a detector."""
    return [A.Downscale(scale_range=(0.3, 0.9), p=0.3),
            A.ImageCompression(quality_range=(30, 90), p=0.3),
            A.GaussianBlur(blur_limit=(3, 5), p=0.2),
            A.RandomGamma(gamma_limit=(70, 150), p=0.3),
            A.Affine(scale=(0.85, 1.15), translate_percent=(-0.08, 0.08), p=0.3)]


def open_image(image, grayscale: bool) -> np.ndarray:
    """A path or a PIL image -> HxWx3 uint8 (EXIF rotation applied to files; 16-bit, CMYK, palette, alpha -> 8-bit
    RGB); gray faces become 3 identical channels. Raises BadImage for anything undecodable."""
    if isinstance(image, Image.Image):
        im = to_rgb(image)
        return np.asarray(im.convert("L").convert("RGB") if grayscale else im)
    try:
        with Image.open(image) as im:
            return open_image(upright(im), grayscale)
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as e:
        raise BadImage(f"{image}: {type(e).__name__}")


def reduce_to(pixels: np.ndarray, side: int) -> np.ndarray:
    """[H, W, 3] uint8 whose longer side is over `side` (> 0) -> reduced to it with Lanczos, aspect kept: the
    resolution the training faces had (FER-2013's were resampled to 48 px with Lanczos). Otherwise unchanged."""
    h, w = pixels.shape[:2]
    if side <= 0 or max(h, w) <= side:
        return pixels
    f = side / max(h, w)
    size = (max(1, round(w * f)), max(1, round(h * f)))
    return np.asarray(Image.fromarray(pixels).resize(size, Image.LANCZOS))


class Preprocess:
    """A model's image preprocessing, handed out with it (checkpoint.create_model_and_transforms, as in open_clip):
    a path or a PIL image -> [3, H, W] float tensor for model.encode_image. Raises BadImage. Eval preprocessing is
    deterministic; train preprocessing augments, seeded per image with .seed(). In two halves for the training
    cache: decode (path -> resized HxWx3 uint8, deterministic) and finish (augment + normalise)."""

    def __init__(self, cfg: Config, train: bool = False):
        self.grayscale, self.source_side = cfg.grayscale, cfg.source_side
        self.resize = A.Resize(cfg.image_size, cfg.image_size)
        self.after_resize = build_transform(cfg, train, resize=False)

    def seed(self, seed: int) -> None:
        self.after_resize.set_random_seed(seed)

    def decode(self, image) -> np.ndarray:
        pixels = reduce_to(open_image(image, self.grayscale), self.source_side)          # [h, w, 3] uint8
        return self.resize(image=pixels)["image"]                                      # [H, W, 3] uint8

    def finish(self, pixels: np.ndarray) -> torch.Tensor:
        return self.after_resize(image=pixels)["image"]                                # [3, H, W]

    def __call__(self, image) -> torch.Tensor:
        return self.finish(self.decode(image))                                         # [3, H, W]
