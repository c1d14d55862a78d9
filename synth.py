"""Procedurally drawn expression faces: the bundled offline sample (`images/` + `captions.csv`).

Each face is drawn from explicit parameters (brows, eyes, mouth curve/openness, lip-corner asymmetry, nose
wrinkle, raised upper lip, cheeks, tears) over several identities, poses and lightings, and captioned from those
same parameters. Deterministic from --seed. Regenerate with:  python synth.py --out . --per-class 75
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFilter

from logs import get_logger
from utils import UserError, atomic_write, run_cli

log = get_logger(__name__)

LABELS = ["neutral", "happiness", "sadness", "surprise", "fear", "disgust", "anger", "contempt"]
S = 256  # drawing canvas; saved images are downsampled (antialiased)
COLUMNS = ["image", "caption", "label", "split"]
OWN_NAME = re.compile(rf"({'|'.join(LABELS)})_\d{{3,}}\.png")          # the names make_sample gives its faces

# Expression parameters per class: (low, high) ranges. brow: raise (+ up); tilt: inner ends (+ up, - down, a V);
# eye: openness; curve: mouth (+ smile, - frown); open: jaw; width: mouth width; asym: one corner up;
# wrinkle: nose; lip: upper lip raised; cheek: cheeks raised; tear: probability of tears.
PROTOTYPES = {
    "neutral":   dict(brow=(-.1, .1), tilt=(-.1, .1), eye=(.9, 1.), curve=(-.1, .1), open=(0, .05), width=(.95, 1.05)),
    "happiness": dict(brow=(0, .2), eye=(.65, .85), curve=(.7, 1.), open=(0, .7), width=(1.1, 1.3), cheek=(1, 1)),
    "sadness":   dict(brow=(-.2, 0), tilt=(.6, 1.), eye=(.6, .8), curve=(-1., -.6), open=(0, .1), tear=.5),
    "surprise":  dict(brow=(.8, 1.), eye=(1.3, 1.5), curve=(-.1, .1), open=(.8, 1.), width=(.75, .9)),
    "fear":      dict(brow=(.5, .8), tilt=(.5, .8), eye=(1.25, 1.45), curve=(-.4, -.2), open=(.3, .5), width=(1.15, 1.3)),
    "disgust":   dict(brow=(-.5, -.3), eye=(.6, .75), curve=(-.6, -.4), open=(0, .15), wrinkle=(1, 1), lip=(.7, 1.)),
    "anger":     dict(brow=(-.9, -.6), tilt=(-1., -.7), eye=(.55, .7), curve=(-.3, -.1), open=(0, .02), width=(.75, .85)),
    "contempt":  dict(brow=(0, .2), eye=(.8, .9), curve=(0, .1), open=(0, .03), asym=(.7, 1.)),
}
DEFAULTS = dict(brow=(0, 0), tilt=(0, 0), eye=(1, 1), curve=(0, 0), open=(0, 0), width=(1, 1), asym=(0, 0),
                wrinkle=(0, 0), lip=(0, 0), cheek=(0, 0), tear=0.0)
FEELINGS = {
    "neutral": ["A calm, neutral face", "An expressionless face"],
    "happiness": ["A happy face", "A joyful, smiling person"],
    "sadness": ["A sad face", "A sorrowful, unhappy person"],
    "surprise": ["A surprised face", "An astonished person"],
    "fear": ["A frightened face", "A fearful, scared person"],
    "disgust": ["A disgusted face", "A repulsed person"],
    "anger": ["An angry face", "A furious, irritated person"],
    "contempt": ["A contemptuous face", "A scornful, disdainful person"],
}


def sample_params(label: str, rng: np.random.Generator) -> dict:
    """Draw one expression's parameters from its class ranges."""
    spec = {**DEFAULTS, **PROTOTYPES[label]}
    p = {k: float(rng.uniform(*v)) for k, v in spec.items() if k != "tear"}
    p["tear"] = bool(rng.random() < spec["tear"])
    p["asym_side"] = int(rng.choice([-1, 1]))
    return p


def sample_identity(i: int, rng: np.random.Generator) -> dict:
    return dict(face_w=rng.uniform(.30, .36), face_h=rng.uniform(.40, .46), skin=int(rng.integers(150, 215)),
                hair=int(rng.integers(20, 90)), hair_h=rng.uniform(.05, .14), eye_dx=rng.uniform(.12, .15),
                nose=rng.uniform(.08, .12), id=i)


def _brow(d, cx, cy, side, p, u, ink):
    """One eyebrow: `brow` moves it, `tilt` lifts (+) or drops (-) its inner end."""
    inner, outer = cx - side * .035 * u, cx + side * .085 * u
    y = cy - (.09 + .055 * p["brow"]) * u
    d.line([(inner, y - .05 * p["tilt"] * u), (outer, y + .015 * p["tilt"] * u)], fill=ink, width=int(.03 * u))


def _eye(d, cx, cy, p, u, ink, skin):
    rx, ry = .052 * u, .026 * u * p["eye"]
    d.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=245, outline=ink, width=max(1, int(.008 * u)))
    r = min(ry, .02 * u)
    d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=ink)
    if p["cheek"] > .5:   # raised cheeks push up under the eye
        d.arc([cx - rx, cy + .2 * ry, cx + rx, cy + 2.4 * ry], 200, 340, fill=skin - 45, width=int(.01 * u))


def _mouth(d, cx, cy, p, u, ink):
    """Mouth from curve (smile/frown), openness, width and lip-corner asymmetry."""
    w = .125 * u * p["width"]
    lift = -.06 * u * p["curve"]                       # corners up when smiling
    lc = cy + lift + (.06 * u * p["asym"] if p["asym_side"] < 0 else 0) * -1
    rc = cy + lift + (.06 * u * p["asym"] if p["asym_side"] > 0 else 0) * -1
    top = cy - .012 * u - .035 * u * p["lip"]
    bottom = cy + .02 * u + .11 * u * p["open"] + .01 * u * max(p["curve"], 0)
    upper = [(cx - w, lc), (cx - w / 2, top), (cx, top + .005 * u), (cx + w / 2, top), (cx + w, rc)]
    if p["open"] > .12:
        lower = [(cx + w * .9, rc + .01 * u), (cx + w / 2, bottom), (cx - w / 2, bottom), (cx - w * .9, lc + .01 * u)]
        d.polygon(upper + lower, fill=45, outline=ink)
        if p["curve"] > .5:                             # teeth in a grin
            d.rectangle([cx - w / 2, top + .004 * u, cx + w / 2, top + .022 * u], fill=235)
    else:
        mid = cy + .5 * (lc + rc - 2 * cy) * -0.4 - lift * .6 + .01 * u
        d.line([(cx - w, lc), (cx - w / 2, mid), (cx + w / 2, mid), (cx + w, rc)], fill=ink,
               width=int(.024 * u), joint="curve")


def draw_face(ident: dict, p: dict, rng: np.random.Generator, size: int = 64) -> Image.Image:
    """Render one grayscale face of `size` px (pose, lighting and noise drawn from rng)."""
    u = S
    bg = int(rng.integers(60, 200))
    img = Image.new("L", (S, S), bg)
    d = ImageDraw.Draw(img)
    cx, cy = S / 2, S * .52
    fw, fh, skin, ink = ident["face_w"] * u, ident["face_h"] * u, ident["skin"], 25
    d.ellipse([cx - fw, cy - fh * 1.05, cx + fw, cy + fh], fill=ident["hair"])          # hair
    d.ellipse([cx - fw * .95, cy - fh + ident["hair_h"] * u, cx + fw * .95, cy + fh], fill=skin)
    ey = cy - .06 * u
    for side in (-1, 1):
        ex = cx + side * ident["eye_dx"] * u
        _eye(d, ex, ey, p, u, ink, skin)
        _brow(d, ex, ey, side, p, u, ink)
        if p["tear"]:
            d.ellipse([ex - .012 * u, ey + .06 * u, ex + .012 * u, ey + .1 * u], fill=230, outline=140)
    ny = ey + ident["nose"] * u
    d.line([(cx, ey + .02 * u), (cx - .02 * u, ny), (cx + .015 * u, ny)], fill=skin - 60, width=int(.01 * u))
    if p["wrinkle"] > .5:
        for k in range(3):
            yk = ey + (.015 + .018 * k) * u
            d.arc([cx - .05 * u, yk, cx + .05 * u, yk + .03 * u], 200, 340, fill=skin - 70, width=int(.008 * u))
    _mouth(d, cx, ny + .09 * u, p, u, ink)
    img = img.rotate(float(rng.uniform(-12, 12)), resample=Image.BILINEAR, fillcolor=bg,
                     translate=tuple(rng.uniform(-.05, .05, 2) * S), center=(cx, cy))
    light = np.linspace(rng.uniform(.6, 1.0), rng.uniform(1.0, 1.35), S)                  # side lighting
    arr = np.asarray(img, np.float32) * (light[None, :] if rng.random() < .5 else light[:, None])
    arr = arr * rng.uniform(.8, 1.15) + rng.normal(0, 6, arr.shape)
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(rng.uniform(0, 1.5)))
    return img.resize((size, size), Image.LANCZOS)


def describe(label: str, p: dict, rng: np.random.Generator) -> str:
    """A caption from the face's actual parameters (plus, half the time, a feeling word for its class)."""
    parts = []
    if p["curve"] > .5:
        parts.append("a wide open-mouthed smile showing teeth" if p["open"] > .3 else
                     "a broad smile with the lip corners turned up")
    elif p["curve"] < -.5:
        parts.append("a downturned mouth in a frown")
    if p["asym"] > .5:
        parts.append("a lopsided smirk with one lip corner raised")
    if p["open"] > .7 and p["curve"] < .5:
        parts.append("a wide-open, rounded mouth")
    elif .25 < p["open"] <= .7 and p["curve"] < .5:
        parts.append("a slightly open, stretched mouth")
    if p["width"] < .87 and p["open"] < .05:
        parts.append("tightly pressed lips")
    if p["lip"] > .5:
        parts.append("a raised upper lip")
    if p["wrinkle"] > .5:
        parts.append("a wrinkled, scrunched nose")
    if p["eye"] > 1.2:
        parts.append("wide-open eyes")
    elif p["eye"] < .75:
        parts.append("narrowed eyes")
    if p["brow"] > .45:
        parts.append("raised eyebrows")
    if p["tilt"] < -.5:
        parts.append("lowered eyebrows drawn together in a frown")
    elif p["tilt"] > .45:
        parts.append("eyebrows pulled up in the middle")
    if p["cheek"] > .5:
        parts.append("raised cheeks")
    if p["tear"]:
        parts.append("tears under the eyes")
    if not parts:
        parts = ["a relaxed, closed mouth", "relaxed eyebrows"]
    order = rng.permutation(len(parts))
    parts = [parts[i] for i in order]
    body = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    if rng.random() < .5:
        return f"{rng.choice(FEELINGS[label])}, with {body}."
    return f"A face with {body}."


def previous_sample(out: Path) -> set[str] | None:
    """The faces of make_sample's own earlier output in `out` (a captions.csv with its columns listing only its
    names, and an images/ holding exactly those files); an empty set when out has neither; None when it holds
    anything else (a user's captions.csv, other images)."""
    csv, images = out / "captions.csv", out / "images"
    have = {p.name for p in images.iterdir() if not p.name.startswith(".")} if images.is_dir() else set()   # .DS_Store
    if not csv.exists() and not have:
        return set()
    try:
        df = pd.read_csv(csv, dtype=str, keep_default_na=False)
    except Exception:  # noqa: BLE001 -- missing, a folder, not a CSV: not synth's
        return None
    names = set(df["image"]) if list(df.columns) == COLUMNS else set()
    return names if names and names == have and all(OWN_NAME.fullmatch(n) for n in names) else None


def make_sample(out: str | Path, per_class: int = 75, size: int = 64, identities: int = 8, seed: int = 0,
                val_fraction: float = 0.2, force: bool = False) -> pd.DataFrame:
    """Write out/images/*.png and out/captions.csv (image, caption, label, split); returns the table. A folder
    holding anything but an earlier sample's captions.csv and images -> UserError before drawing, unless force.
    The earlier sample's faces the new table does not list are removed (with force over another folder: none; only
    the files of the names it writes are replaced)."""
    out = Path(out)
    old = previous_sample(out)
    if old is None and not force:
        raise UserError(f"--out {out}: holds a captions.csv or images/ that synth.py did not write (other files, "
                        "or other names listed); give a new folder (e.g. --out sample), or --force to replace its "
                        "captions.csv and the images of the names it writes (nothing was written)")
    old = old or set()                      # --force over another folder: only the files it writes are replaced
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    idents = [sample_identity(i, rng) for i in range(identities)]
    rows = []
    for label in LABELS:
        for k in range(per_class):
            p = sample_params(label, rng)
            name = f"{label}_{k:03d}.png"
            draw_face(idents[int(rng.integers(identities))], p, rng, size).save(out / "images" / name, optimize=True)
            split = "val" if k < round(per_class * val_fraction) else "train"
            rows.append(dict(image=name, caption=describe(label, p, rng), label=label, split=split))
    df = pd.DataFrame(rows, columns=COLUMNS)
    atomic_write(out / "captions.csv", lambda tmp: df.to_csv(tmp, index=False))
    stale = sorted(old - set(df["image"]))
    for name in stale:
        (out / "images" / name).unlink(missing_ok=True)
    if stale:
        log.info(f"removed {len(stale)} faces of the earlier sample in {out / 'images'} that the new one does not list")
    return df


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="sample", help="folder that receives images/ and captions.csv (default: "
                    "./sample; refused when it holds a captions.csv or images/ synth.py did not write)")
    ap.add_argument("--force", action="store_true", help="replace --out's captions.csv and the images of the "
                    "names it writes even when synth.py did not write them (no other file is touched)")
    ap.add_argument("--per-class", type=int, default=75)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--identities", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    if not 0 <= a.seed < 2**32:
        raise UserError(f"--seed {a.seed}: give a whole number from 0 to 2**32 - 1")
    if not a.out.strip():
        raise UserError("--out '': an empty path; give a folder (default: sample)")
    if a.per_class < 1 or a.identities < 1 or not 16 <= a.size <= 1024:    # 0 faces would empty captions.csv
        raise UserError(f"--per-class {a.per_class} --identities {a.identities} --size {a.size}: give at least 1 "
                        "face per class and 1 identity, and a size of 16-1024 px (the sample: 75, 8, 64)")
    df = make_sample(a.out, a.per_class, a.size, a.identities, a.seed, force=a.force)
    log.info(f"wrote {len(df)} faces ({a.per_class} per class x {len(LABELS)}) to {Path(a.out) / 'images'} "
             f"and {Path(a.out) / 'captions.csv'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
