"""Evaluation metrics for zero-shot expression classification and text<->image retrieval.

Pure numpy: every function accepts numpy arrays or torch tensors (any device/dtype) and returns numpy values;
the two *_report functions return plain python (JSON-safe: nan becomes None).
Ties: rankings use a stable argsort on -scores, so equal scores are ordered by index (lower index first);
top-k accuracy and argmax predictions follow the same rule.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np

from utils import UserError, atomic_write


def _np(x) -> np.ndarray:
    """numpy view of an array-like or torch tensor (bf16/fp16 tensors are upcast to float32)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu()
        x = (x.float() if x.is_floating_point() else x).numpy()
    return np.asarray(x)


def _l2n(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (all-zero rows stay zero)."""
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _scores(scores, relevant=None) -> tuple[np.ndarray, np.ndarray | None]:
    """Validated float [Q,N] scores (and bool [Q,N] relevance): finite, 2-D, same shape."""
    s = _np(scores).astype(np.float64)
    if s.ndim != 2:
        raise UserError(f"scores must be 2-D [queries, items], got shape {s.shape}")
    if not np.isfinite(s).all():
        raise UserError("scores contain NaN/inf (did the model diverge?); check the embeddings")
    r = None if relevant is None else _np(relevant).astype(bool)
    if r is not None and r.shape != s.shape:
        raise UserError(f"relevant has shape {r.shape} but scores has {s.shape}; they must match")
    return s, r


def _ranked_relevance(scores, relevant) -> np.ndarray:
    """[Q,N] bool: relevance of each query's items in rank order (stable argsort on -scores)."""
    s, r = _scores(scores, relevant)
    return np.take_along_axis(r, np.argsort(-s, axis=1, kind="stable"), axis=1)  # [Q,N]


def _mean(v: np.ndarray) -> float:
    """Mean of the non-nan entries (nan, without a warning, when there are none)."""
    v = v[~np.isnan(v)]
    return float(v.mean()) if len(v) else float("nan")


def _check_k(k: int) -> int:
    if int(k) < 1:
        raise UserError(f"k must be >= 1, got {k}")
    return int(k)


def class_prototypes(text_emb, text_labels, classes: Sequence | None = None) -> tuple[list, np.ndarray]:
    """Prompt ensembling: per class, the re-normalised mean of its L2-normalised text embeddings -> (classes, [C,D]).
    classes: output order (default: first appearance of text_labels); texts of other labels are ignored."""
    e, labels = _l2n(_np(text_emb).astype(np.float64)), _np(text_labels).tolist()
    if e.ndim != 2 or len(labels) != len(e):
        raise UserError(f"text_emb {e.shape} and text_labels ({len(labels)}) must be [T,D] and [T]")
    classes = list(dict.fromkeys(labels)) if classes is None else list(classes)
    protos = []
    for c in classes:
        rows = e[[lab == c for lab in labels]] if labels else e[:0]
        if len(rows) == 0:
            raise UserError(f"class {c!r} has no text prompt; add a caption for it or drop it from the class list")
        protos.append(rows.mean(axis=0))
    return classes, _l2n(np.stack(protos)) if protos else np.zeros((0, e.shape[1]))


def zero_shot_scores(image_emb, protos) -> np.ndarray:
    """[N,D] x [C,D] -> [N,C] cosine similarities (both sides are L2-normalised here)."""
    im, pr = _np(image_emb).astype(np.float64), _np(protos).astype(np.float64)
    if im.ndim != 2 or pr.ndim != 2 or im.shape[1] != pr.shape[1]:
        raise UserError(f"image_emb {im.shape} and protos {pr.shape} must be [N,D] and [C,D] with the same D")
    return _l2n(im) @ _l2n(pr).T


def prior_adjusted(scores, scale: float, prior) -> np.ndarray:
    """Post-hoc logit adjustment: scale * cosine + log prior ([N,C] -> [N,C]). With prior = the training label
    frequencies this is the Bayes decision for test data distributed like training (Menon et al., ICLR 2021);
    top-1 rises, UAR usually falls. prior: [C], positive, normalised here."""
    s, p = _np(scores).astype(np.float64), np.asarray(prior, np.float64)
    if s.ndim != 2 or p.shape != (s.shape[1],) or not (p > 0).all():
        raise UserError(f"prior {p.shape} must hold one positive value per class column of scores {s.shape}")
    return scale * s + np.log(p / p.sum())[None, :]


def topk_accuracy(scores, y, k: int) -> float:
    """Fraction of rows whose true class is among the k best scores (k clipped to C; ties -> lower index first)."""
    s, _ = _scores(scores)
    y = _np(y).astype(np.int64).reshape(-1)
    if len(y) != len(s) or (len(y) and (y.min() < 0 or y.max() >= s.shape[1])):
        raise UserError(f"labels must be {len(s)} class ids in [0, {s.shape[1]}) (one per score row); got {len(y)}")
    if len(y) == 0:  # no samples: accuracy undefined
        return float("nan")
    sy = s[np.arange(len(s)), y][:, None]  # [N,1] score of the true class
    cols = np.arange(s.shape[1])[None, :]
    rank = (s > sy).sum(1) + ((s == sy) & (cols < y[:, None])).sum(1)  # 0-based rank, same as stable argsort
    return float((rank < min(_check_k(k), s.shape[1])).mean())


def confusion_matrix(y_true, y_pred, n_classes: int) -> np.ndarray:
    """[C,C] int64 counts, rows = true class, columns = predicted class."""
    t, p = _np(y_true).astype(np.int64).reshape(-1), _np(y_pred).astype(np.int64).reshape(-1)
    if len(t) != len(p):
        raise UserError(f"y_true has {len(t)} labels but y_pred has {len(p)}")
    for name, v in (("y_true", t), ("y_pred", p)):
        if len(v) and (v.min() < 0 or v.max() >= n_classes):
            raise UserError(f"{name} holds a label outside [0, {n_classes}): {v.min()}..{v.max()}")
    return np.bincount(t * n_classes + p, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def per_class_recall(cm) -> np.ndarray:
    """[C] diag / row sum; nan for a class with no true samples."""
    cm = _np(cm).astype(np.float64)
    support = cm.sum(1)
    return np.divide(np.diag(cm), support, out=np.full(len(cm), np.nan), where=support > 0)


def uar(cm) -> float:
    """Unweighted average recall: mean recall over the classes that have samples (nan if none)."""
    return _mean(per_class_recall(cm))


def war(cm) -> float:
    """Weighted average recall = overall accuracy = trace / total (nan if empty)."""
    cm = _np(cm).astype(np.float64)
    return float(np.trace(cm) / cm.sum()) if cm.sum() > 0 else float("nan")


def macro_f1(cm) -> float:
    """Mean F1 = 2TP / (2TP + FP + FN) over classes with true samples; a never-predicted class scores 0."""
    cm = _np(cm).astype(np.float64)
    tp, present = np.diag(cm), cm.sum(1) > 0
    f1 = 2 * tp / np.maximum(cm.sum(0) + cm.sum(1), 1e-12)  # 2TP+FP+FN == col sum + row sum
    return _mean(np.where(present, f1, np.nan))


def precision_at_k(scores, relevant, k: int) -> np.ndarray:
    """[Q] fraction of the top-k items that are relevant (k clipped to N; 0 for a query with no relevant)."""
    rel = _ranked_relevance(scores, relevant)
    k = min(_check_k(k), rel.shape[1])
    return rel[:, :k].sum(1) / k if k else np.full(len(rel), np.nan)


def average_precision(scores, relevant) -> np.ndarray:
    """[Q] mean over the relevant items of the precision at their rank; nan for a query with no relevant."""
    rel = _ranked_relevance(scores, relevant).astype(np.float64)  # [Q,N]
    prec = np.cumsum(rel, axis=1) / np.arange(1, rel.shape[1] + 1)  # precision at each rank
    n_rel = rel.sum(1)
    return np.divide((prec * rel).sum(1), n_rel, out=np.full(len(rel), np.nan), where=n_rel > 0)


def recall_at_k(scores, relevant, k: int) -> np.ndarray:
    """[Q] 1.0 if any relevant item is in the top-k (k clipped to N), else 0.0 (the R@K of CLIP papers)."""
    rel = _ranked_relevance(scores, relevant)
    return rel[:, : _check_k(k)].any(1).astype(np.float64)


def median_rank(scores, relevant) -> float:
    """Median over queries of the 1-based rank of the first relevant item (queries with none are skipped)."""
    rel = _ranked_relevance(scores, relevant)
    has = rel.any(1)
    return float(np.median(rel[has].argmax(1) + 1)) if has.any() else float("nan")


def _py(x):
    """Plain python for JSON: arrays -> lists, numpy scalars -> float, nan -> None."""
    if isinstance(x, (list, tuple, np.ndarray)):
        return [_py(v) for v in x]
    x = float(x)
    return None if math.isnan(x) else x


def retrieval_report(image_emb, image_labels, protos, ks: Sequence[int] = (1, 5, 10)) -> dict:
    """Text->image (query = class prototype, relevant = images of that class): precision@K and AP per class
    (None for a class with no image) and their means over present classes; image->text recall@1/5 and median rank
    of the true class among the C prototypes."""
    s = zero_shot_scores(image_emb, protos)  # [N,C] image -> class scores
    n, c = s.shape
    y = _np(image_labels).astype(np.int64).reshape(-1)
    if len(y) != n or (n and (y.min() < 0 or y.max() >= c)):
        raise UserError(f"image_labels must be {n} ints in [0, {c}) (one per image embedding)")
    rel = y[:, None] == np.arange(c)[None, :]  # [N,C] image i is relevant to class j
    present = rel.any(0)  # [C]
    out: dict = {"n_images": n, "n_classes": c, "classes_present": int(present.sum())}
    for k in ks:
        p = np.where(present, precision_at_k(s.T, rel.T, k), np.nan)
        out[f"t2i_precision@{k}"] = _py(_mean(p))
        out[f"t2i_precision@{k}_per_class"] = _py(p)
    ap = average_precision(s.T, rel.T)
    out["t2i_mAP"] = _py(_mean(ap))
    out["t2i_AP_per_class"] = _py(ap)
    for k in (1, 5):
        out[f"i2t_recall@{k}"] = _py(recall_at_k(s, rel, k).mean() if n else np.nan)
    out["i2t_median_rank"] = _py(median_rank(s, rel) if n else np.nan)
    return out


def classification_report(scores, y, class_names: Sequence[str]) -> dict:
    """top1, top5 (k clipped to C), war, uar, macro_f1, per_class_recall {name: value or None}, confusion [C][C]."""
    s, _ = _scores(scores)
    if len(class_names) != s.shape[1]:
        raise UserError(f"{len(class_names)} class names given for {s.shape[1]} score columns; they must match")
    y, top1 = _np(y).astype(np.int64).reshape(-1), topk_accuracy(s, y, 1)  # topk_accuracy validates y
    cm = confusion_matrix(y, s.argmax(1) if len(s) else y, s.shape[1])  # argmax: first max, as the tie rule
    return {"n": len(y), "top1": _py(top1), "top5": _py(topk_accuracy(s, y, 5)), "war": _py(war(cm)),
            "uar": _py(uar(cm)), "macro_f1": _py(macro_f1(cm)),
            "per_class_recall": {str(name): _py(r) for name, r in zip(class_names, per_class_recall(cm))},
            "confusion": cm.tolist()}


def save_confusion_png(cm, class_names: Sequence[str], path, normalize: bool = True) -> Path:
    """Annotated heat-map PNG of the confusion matrix (rows = true); normalize: rows as recall, '-' for empty rows."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # Agg canvas: no pyplot, no global backend
    from matplotlib.figure import Figure
    cm, c = _np(cm).astype(np.float64), len(class_names)
    if cm.shape != (c, c):
        raise UserError(f"confusion matrix {cm.shape} does not match {c} class names")
    rows = cm.sum(1, keepdims=True)  # [C,1] support
    val = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0) if normalize else cm
    vmax = 1.0 if normalize else max(val.max(), 1.0)
    fig = Figure(figsize=(1.6 + 0.7 * c, 0.8 + 0.6 * c), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    fig.colorbar(ax.imshow(val, cmap="Blues", vmin=0, vmax=vmax), ax=ax, fraction=0.046, pad=0.04)
    ax.set_xticks(range(c), [str(n) for n in class_names], rotation=45, ha="right")
    ax.set_yticks(range(c), [f"{n} (n={int(r)})" if normalize else str(n) for n, r in zip(class_names, rows[:, 0])])
    ax.set(xlabel="predicted", ylabel="true", title="confusion (row-normalised)" if normalize else "confusion (counts)")
    for i in range(c):
        for j in range(c):
            txt = ("-" if rows[i, 0] == 0 else f"{val[i, j]:.2f}") if normalize else f"{int(cm[i, j])}"
            ax.text(j, i, txt, ha="center", va="center", fontsize=8, color="white" if val[i, j] > vmax / 2 else "black")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    return Path(path)


def format_table(rows: list[dict], columns: Sequence[str]) -> str:
    """Fixed-width text table: floats as .4f, None/nan as '-', a missing key blank; numeric columns right-aligned."""
    def cell(v) -> str:
        if v is None or (isinstance(v, (float, np.floating)) and math.isnan(v)):
            return "-"
        return f"{float(v):.4f}" if isinstance(v, (float, np.floating)) else str(v)
    body = [[cell(r[col]) if col in r else "" for col in columns] for r in rows]
    num = [all(r.get(col) is None or isinstance(r[col], (int, float, np.number)) for r in rows) for col in columns]
    width = [max([len(str(col))] + [len(b[i]) for b in body]) for i, col in enumerate(columns)]
    line = lambda cells: "  ".join(s.rjust(w) if n else s.ljust(w) for s, w, n in zip(cells, width, num)).rstrip()
    return "\n".join([line([str(c) for c in columns]), "  ".join("-" * w for w in width)] + [line(b) for b in body])


# ----------------------------------------------------------------------------- FER+ vote distributions

def _log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax ([N,C]); -inf entries stay -inf (a row needs one finite entry)."""
    m = logits.max(axis=1, keepdims=True)
    z = logits - m
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def vote_agreement(logits, votes) -> dict:
    """Agreement of predicted distributions softmax(logits) [N,C] with annotator vote distributions [N,C] (counts or
    fractions, normalised per row here): mean cross-entropy H(q, p), mean KL(q || p) and the mean vote entropy H(q)
    (the floor of the cross-entropy), all in nats. A zero-vote class contributes nothing; a voted class the
    prediction rules out (-inf logit) makes that row's CE and KL inf."""
    s, q = _np(logits).astype(np.float64), _np(votes).astype(np.float64)
    if s.ndim != 2 or s.shape != q.shape:
        raise UserError(f"logits {s.shape} and votes {q.shape} must both be [N,C]")
    if (q < 0).any() or (len(q) and (q.sum(1) <= 0).any()) or np.isnan(q).any() or np.isnan(s).any():
        raise UserError("votes must be >= 0 with at least one vote per row, and logits must not be NaN")
    q = q / q.sum(1, keepdims=True)
    logp = _log_softmax(s)
    with np.errstate(invalid="ignore"):
        ce = -np.where(q > 0, q * logp, 0.0).sum(1)                                   # [N]
        ent = -np.where(q > 0, q * np.log(np.where(q > 0, q, 1.0)), 0.0).sum(1)       # [N]
    return {"ce": float(ce.mean()) if len(ce) else float("nan"),
            "kl": float((ce - ent).mean()) if len(ce) else float("nan"),
            "entropy": float(ent.mean()) if len(ent) else float("nan")}


def onehot_logits(y, n_classes: int, smoothing: float = 0.0) -> np.ndarray:
    """Log-probabilities [N,C] of a hard predictor: (1 - smoothing) on class y plus smoothing / C everywhere
    (smoothing 0: -inf off the class). The majority-vote reference for vote_agreement."""
    y = _np(y).astype(np.int64).reshape(-1)
    if not 0 <= smoothing <= 1 or (len(y) and (y.min() < 0 or y.max() >= n_classes)):
        raise UserError(f"onehot_logits: labels must lie in [0, {n_classes}) and smoothing in [0, 1]")
    p = np.full((len(y), n_classes), smoothing / n_classes)
    p[np.arange(len(y)), y] += 1.0 - smoothing
    with np.errstate(divide="ignore"):
        return np.log(p)


def compound_pairs(votes, classes: Sequence[str], min_votes: float = 3, min_faces: int = 20) -> dict:
    """Compound expressions from vote counts [N,C]: for every class pair (a, b) in `classes` order, the faces with
    >= min_votes votes for both. Returns {"a+b": bool [N]} for the pairs with >= min_faces faces, most faces first
    (ties in class order). A face with three such classes counts for each of its pairs."""
    v = _np(votes).astype(np.float64)
    if v.ndim != 2 or v.shape[1] != len(classes):
        raise UserError(f"votes {v.shape} must be [N, {len(classes)}] (one column per class)")
    strong = v >= min_votes                                                           # [N,C]
    pairs = {f"{classes[a]}+{classes[b]}": strong[:, a] & strong[:, b]
             for a in range(len(classes)) for b in range(a + 1, len(classes))}
    kept = [(k, m) for k, m in pairs.items() if m.sum() >= min_faces]
    return dict(sorted(kept, key=lambda km: -int(km[1].sum())))                       # stable: class order on ties


def ap_gain(pair_scores, single_scores, relevant) -> dict:
    """Retrieval of compound faces: AP of one query's scores [N] against the better of K single-class queries
    [N,K] (e.g. the two emotions' own sentences), relevant [N] bool. -> {ap, single_aps [K], best_single_ap,
    gain = ap - best_single_ap}; APs are nan (None in JSON) with no relevant face."""
    p, s = _np(pair_scores).astype(np.float64).reshape(-1), _np(single_scores).astype(np.float64)
    r = _np(relevant).astype(bool).reshape(-1)
    if s.ndim != 2 or len(s) != len(p) or len(r) != len(p):
        raise UserError(f"pair_scores [N], single_scores [N,K] and relevant [N] disagree: {p.shape}, {s.shape}, "
                        f"{r.shape}")
    ap = float(average_precision(p[None], r[None])[0])
    singles = average_precision(s.T, np.broadcast_to(r, s.T.shape))                   # [K]
    best = float(np.max(singles)) if len(singles) and not np.isnan(singles).all() else float("nan")
    return {"ap": _py(ap), "single_aps": _py(singles), "best_single_ap": _py(best), "gain": _py(ap - best)}
