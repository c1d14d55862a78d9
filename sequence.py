"""Sequence mode: one expression ranking for a series of frames (or conversation turns), recent ones weighing more.

Turn-weighted score, for frame scores s[t, c] with t = 0 .. T-1 (T-1 = most recent) and 0 <= decay <= 1:

    w_t       = decay ** (T-1-t) / sum_u decay ** (T-1-u)      (weights sum to 1; the last frame has the most)
    overall_c = sum_t w_t * s[t, c]                            (a weighted mean of the scores as given, no softmax)

decay = 1 is the plain mean over frames; decay -> 0 keeps only the last frame (decay = 0 is exactly the last frame).
Pass per-frame probabilities (softmax over expressions) to get a probability vector back; raw cosine similarities
work too, and a sequence that never changes returns its own scores.
"""
from __future__ import annotations

import functools
import warnings

import numpy as np
from matplotlib.figure import Figure  # no pyplot: no global state, renders with Agg

from utils import UserError


def _as_scores(frame_scores) -> np.ndarray:
    """[T,C] float64 array from a list / numpy array / torch tensor; refuses empty or non-finite input."""
    if hasattr(frame_scores, "detach"):
        frame_scores = frame_scores.detach().cpu().numpy()
    s = np.asarray(frame_scores, dtype=np.float64)
    if s.ndim == 1:
        s = s[:, None]                                                # [T] -> [T,1]
    if s.ndim != 2 or s.shape[0] == 0 or s.shape[1] == 0:
        raise UserError(f"sequence scores: expected a frames x expressions table, got shape {s.shape}")
    if not np.isfinite(s).all():
        raise UserError("sequence scores: contain NaN or infinity; check the frames that produced them")
    return s


def frame_weights(T: int, decay: float = 0.5) -> np.ndarray:
    """[T] weights w_t = decay**(T-1-t), normalised to sum 1 (see the module docstring)."""
    if not 0.0 <= decay <= 1.0:
        raise UserError(f"decay {decay}: must lie between 0 and 1 (1 = plain mean, near 0 = last frame only)")
    w = float(decay) ** np.arange(T - 1, -1, -1, dtype=np.float64)   # [T], w[T-1] = 1
    return w / w.sum()


def sequence_scores(frame_scores, decay: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """(overall [C], weights [T]) for frame scores [T,C]: overall = sum_t w_t * scores[t]."""
    s = _as_scores(frame_scores)                                      # [T,C]
    w = frame_weights(s.shape[0], decay)                              # [T]
    return w @ s, w                                                   # [C], [T]


def is_timed(times, T: int) -> bool:
    """One finite, increasing time per frame (a video's seconds): what timeline_figure plots against."""
    return times is not None and len(times) == T and \
        all(isinstance(t, (int, float, np.floating)) and np.isfinite(t) for t in times) and \
        bool(np.all(np.diff(np.asarray(times, dtype=np.float64)) > 0))


def frame_list(times, picks: list[int]) -> str:
    """Frames `picks` (positions) named as the timeline's axis shows them: 'frame(s) at 0.20 s, 1.10 s' when the
    frames are timed, else 'frame(s) 3, 5' (numbered from 1)."""
    if is_timed(times, len(times or [])):
        return "frame(s) at " + ", ".join(f"{times[i]:.2f} s" for i in picks)
    return "frame(s) " + ", ".join(str(i + 1) for i in picks)


def timeline_figure(frame_scores, names: list[str], top: int = 5, decay: float = 0.5,
                    times: list[float] | None = None, numbers: list[int] | None = None) -> Figure:
    """Per-frame scores of the `top` expressions by turn-weighted score, with the frame weights as grey bars; x is
    each frame's time in seconds when `times` gives one per frame, increasing (a video), else the frame number
    (`numbers`, from 1, when some frames were left out; else 1..T)."""
    s = _as_scores(frame_scores)                                      # [T,C]
    if len(names) != s.shape[1]:
        raise UserError(f"timeline: {len(names)} names for {s.shape[1]} score columns; give one name per column")
    overall, w = sequence_scores(s, decay)
    order = np.argsort(-overall, kind="stable")[:max(1, top)]
    T = s.shape[0]
    timed = is_timed(times, T)
    x = np.asarray(times, dtype=np.float64) if timed else \
        np.asarray(numbers) if numbers is not None and len(numbers) == T else np.arange(1, T + 1)     # [T]
    _font_fallback()
    warnings.filterwarnings("ignore", message=r"Glyph \d+ .*missing from", category=UserWarning)   # plot_font_note
    fig = Figure(figsize=(7, 3.5), layout="constrained")
    ax = fig.add_subplot()
    bars = ax.twinx()
    width = 0.6 * (float(np.diff(x).min()) if T > 1 else 1.0)
    bars.bar(x, w, color="0.85", width=width, zorder=0)
    bars.set_ylabel("frame weight", color="0.5")
    bars.set_ylim(0, max(1.0, float(w.max())))
    ax.set_zorder(bars.get_zorder() + 1)
    ax.patch.set_visible(False)
    for c in order:
        ax.plot(x, s[:, c], marker="o", label=f"{names[c]} ({overall[c]:.2f})")
    ax.set_xlabel("time (s)" if timed else "frame")
    ax.set_ylabel("score")
    if not timed:
        ax.set_xticks(x if T <= 20 else np.linspace(x[0], x[-1], 11).round().astype(int))
    elif T > 1:
        ax.set_xlim(max(0.0, x[0] - width), x[-1] + width)            # no negative seconds
    span = f", {x[0]:g}-{x[-1]:g} s" if timed and T > 1 else f" at {x[0]:g} s" if timed else ""
    ax.set_title(f"top {len(order)} expressions over {T} frame{'' if T == 1 else 's'}{span} (decay {decay:g})")
    ax.legend(fontsize="small", loc="best")
    return fig


CJK_FONTS = ("Noto Sans CJK KR", "Noto Sans CJK JP", "Noto Sans KR", "NanumGothic", "UnDotum", "Source Han Sans KR",
             "WenQuanYi Zen Hei", "Droid Sans Fallback")


@functools.cache
def _font_fallback() -> str | None:
    """A CJK font installed for matplotlib, added after the default sans-serif font (glyph fallback)."""
    import matplotlib
    from matplotlib import font_manager
    have = {f.name for f in font_manager.fontManager.ttflist}
    found = next((f for f in CJK_FONTS if f in have), None)
    if found and found not in matplotlib.rcParams["font.sans-serif"]:
        matplotlib.rcParams["font.sans-serif"] = [*matplotlib.rcParams["font.sans-serif"], found]
    return found


@functools.cache
def _plot_chars() -> frozenset[int]:
    """Code points the plots' fonts (the default sans-serif chain) can draw."""
    from matplotlib import font_manager
    from matplotlib.ft2font import FT2Font
    _font_fallback()
    props = font_manager.FontProperties()
    try:
        fonts = font_manager.fontManager._find_fonts_by_props(props)      # the fallback chain (matplotlib >= 3.6)
    except AttributeError:
        fonts = [font_manager.findfont(props)]
    return frozenset().union(*(FT2Font(str(f)).get_charmap() for f in fonts))


def plot_font_note(texts) -> str:
    """'' when the plot fonts draw every character of `texts`, else one line naming some that show as boxes."""
    missing = list(dict.fromkeys(c for t in texts for c in str(t) if not c.isspace() and ord(c) not in _plot_chars()))
    if not missing:
        return ""
    return (f"Characters such as {' '.join(missing[:3])} show as boxes in the timeline plot (no font for them): "
            "install one, e.g. fonts-noto-cjk for Korean, and restart.")


def track_faces(frames: list[list[tuple[float, float, float, float]]], max_shift: float = 1.0,
                max_scale: float = 2.0) -> list[list[int]]:
    """Person numbers (1, 2, ... in order of first appearance) for the face boxes (x0, y0, x1, y1) of each frame,
    so that a face keeps its number when another face outgrows it. A face continues the person whose last box is
    nearest: centre distance over the boxes' mean side (geometric) at most max_shift, sides within max_scale of
    each other; the closest pairs are matched first, one face per person per frame, and a person missing from some
    frames is still matched when it comes back. A face that matches no one is a new person."""
    last: list[np.ndarray] = []                                       # each person's latest box, [4]
    out = []
    for boxes in frames:
        b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)         # [F,4]
        pairs = sorted((cost, i, j) for i in range(len(b)) for j, t in enumerate(last)
                       if (cost := _box_shift(b[i], t, max_scale)) <= max_shift)
        ids = [0] * len(b)
        taken = set()
        for _, i, j in pairs:
            if not ids[i] and j not in taken:
                ids[i] = j + 1
                taken.add(j)
        for i in range(len(b)):
            if not ids[i]:
                last.append(b[i])
                ids[i] = len(last)
            last[ids[i] - 1] = b[i]
        out.append(ids)
    return out


def _box_shift(a: np.ndarray, b: np.ndarray, max_scale: float) -> float:
    """Centre distance of two boxes over their mean side; infinity when one side is over max_scale x the other."""
    sa, sb = (np.sqrt(max((x[2] - x[0]) * (x[3] - x[1]), 1e-9)) for x in (a, b))
    if max(sa, sb) > max_scale * min(sa, sb):
        return float("inf")
    return float(np.hypot((a[0] + a[2] - b[0] - b[2]) / 2, (a[1] + a[3] - b[1] - b[3]) / 2) / np.sqrt(sa * sb))
