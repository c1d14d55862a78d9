"""Pack what bench/gpu_check.sh needs on a lent GPU machine into .devcarry/ (git-ignored; issue 21, section 4).

    python bench/gpu_pack.py                 # FER+ subset, DistilBERT-sized tower folder, wheels for Python 3.12
    python bench/gpu_pack.py --no-wheels     # offline: faces and the tower folder only

The device tool sends the working tree and the folders named in `carry`, 64 MiB in all; `../shared` stays behind and
the machine reaches no registry. It has torch, timm, transformers, pandas and OpenCV, not albumentations and its
needs. So this writes, inside --budget-mb together with what git sends of the checkout:
  .devcarry/ferplus/      FER2013Valid whole (the evaluation split) and a stratified subset of FER2013Train (by
                          majority emotion, seeded) as large as fits, in the FER+ release layout (images, label.csv,
                          fer2013new.csv filtered to them) that `bench/ferplus.py --ferplus` reads
  .devcarry/distilbert/   DistilBertConfig() and an uncased WordPiece tokenizer: the paper's text tower, random init
  .devcarry/wheels/       albumentations and the packages it needs, for CPython 3.12 on x86-64 (pip download)
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from formats import FERPLUS_VOTES  # noqa: E402
from utils import UserError, read_csv_checked  # noqa: E402

# albumentations and what it imports that the device image lacks or may hold too old (versions: those that
# requirements.txt resolves here; each package's Requires-Dist checked)
WHEELS = ["albumentations==2.0.8", "albucore==0.0.24", "pydantic==2.14.4", "pydantic-core==2.50.5",
          "annotated-types==0.8.0", "typing-inspection==0.4.5", "stringzilla==5.3.2", "simsimd==6.5.16",
          "typing-extensions==4.16.0"]          # pydantic(-core) 2.50 need >= 4.16, newer than the image may hold
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64"]


def tree_bytes(root: Path = ROOT) -> int:
    """Bytes of what the device tool sends of the checkout: tracked and untracked-not-ignored files."""
    names = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=root, check=True,
                           capture_output=True).stdout.decode().split("\0")
    return sum((root / n).stat().st_size for n in names if n and (root / n).is_file())


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def download_wheels(dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
           "3.12", "--implementation", "cp", "-d", str(dest)] + [f"--platform={p}" for p in PLATFORMS] + WHEELS
    if subprocess.run(cmd).returncode:
        raise UserError("pip download failed (is PyPI reachable?); rerun, or pass --no-wheels and carry them later")


def write_tower(dest: Path, tokenizer: str) -> None:
    from bench_train import distilbert_folder
    from model import resolve_source
    distilbert_folder(resolve_source(tokenizer), dest)


def pick_train(votes: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    """n Training rows, stratified by majority vote (of the ten columns; ties: the first in CSV order), seeded."""
    train = votes[votes["Usage"].str.strip() == "Training"]
    if n >= len(train):
        return train
    major = train[list(FERPLUS_VOTES)].apply(pd.to_numeric, errors="coerce").fillna(0).to_numpy().argmax(1)
    return train.groupby(major).sample(frac=n / len(train), random_state=seed)


def copy_split(src: Path, dst: Path, names: set[str]) -> int:
    """The named faces of one release folder, and its label.csv filtered to them (if it has one); -> bytes."""
    if bad := sorted(n for n in names if Path(n).name != n or n in ("", ".", "..")):   # names come from a CSV
        raise UserError(f"{src.parent / 'fer2013new.csv'}: image name {bad[0]!r} is not a plain file name")
    dst.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copyfile(src / name, dst / name)
    if (src / "label.csv").is_file():
        lines = (src / "label.csv").read_text().splitlines(keepends=True)
        (dst / "label.csv").write_text("".join(ln for ln in lines if ln.split(",", 1)[0] in names))
    return folder_bytes(dst)


def pack_ferplus(src: Path, dst: Path, room: int, seed: int = 0, min_train: int = 100) -> tuple[int, int]:
    """FER2013Valid whole + as many FER2013Train faces as fit in `room` bytes -> (train faces, valid faces)."""
    votes = read_csv_checked(src / "fer2013new.csv", ["Usage", "Image name", *FERPLUS_VOTES])
    votes = votes[votes["Image name"].str.strip() != ""]
    valid = votes[votes["Usage"].str.strip() == "PublicTest"]
    shutil.rmtree(dst, ignore_errors=True)
    room -= copy_split(src / "FER2013Valid", dst / "FER2013Valid", set(valid["Image name"]))
    train_all = votes[votes["Usage"].str.strip() == "Training"]
    per_face = np.mean([(src / "FER2013Train" / f).stat().st_size for f in train_all["Image name"]])
    n = int(room / (per_face + 120))                            # + its label.csv and fer2013new.csv lines
    if n < min_train:
        raise UserError(f"only {max(room, 0) / 2**20:.1f} MiB left for FER2013Train faces; raise --budget-mb or "
                        "pass --no-wheels")
    train = pick_train(votes, n, seed)
    copy_split(src / "FER2013Train", dst / "FER2013Train", set(train["Image name"]))
    pd.concat([train, valid]).to_csv(dst / "fer2013new.csv", index=False)
    return len(train), len(valid)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ferplus", default=str(ROOT.parent / "shared" / "data" / "ferplus"))
    ap.add_argument("--out", default=str(ROOT / ".devcarry"))
    ap.add_argument("--budget-mb", type=float, default=62.0, help="MiB for the checkout and --out together (tool: 64)")
    ap.add_argument("--tokenizer", default="pkg:all-minilm-l6-v2", help="folder with an uncased WordPiece tokenizer")
    ap.add_argument("--no-wheels", action="store_true", help="skip pip download (the machine then needs them)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    out = Path(a.out)
    try:
        if not (Path(a.ferplus) / "fer2013new.csv").is_file():
            raise UserError(f"--ferplus {a.ferplus}: no fer2013new.csv there; pass the FER+ release folder")
        if not a.no_wheels:
            download_wheels(out / "wheels")
        write_tower(out / "distilbert", a.tokenizer)
        used = tree_bytes() + sum(folder_bytes(out / d) for d in ("wheels", "distilbert") if (out / d).is_dir())
        n_train, n_valid = pack_ferplus(Path(a.ferplus), out / "ferplus", int(a.budget_mb * 2**20) - used, a.seed)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    total = used + folder_bytes(out / "ferplus")
    print(f"{out}: FER2013Train {n_train} faces (stratified), FER2013Valid {n_valid}; "
          f"checkout + {out.name} = {total / 2**20:.1f} MiB of {a.budget_mb:g}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
