"""evaluate.py's output: the human-readable report and the one-line JSON summary of an evaluation result."""
from __future__ import annotations

import numpy as np

import metrics

SUMMARY_KEYS = ("top1", "top5", "war", "uar", "macro_f1", "t2i_mAP", "t2i_precision@10", "i2t_recall@1",
                "i2t_recall@5", "i2t_median_rank")


def faces_line(f: dict | None) -> str:
    """'faces (--faces auto): ...' -- how the scored files were read (photos.FaceReader counts)."""
    if not f:
        return ""
    parts = [f"{f['crop']} read whole as face crops"] if f["crop"] else []
    if f["face"] or f["no face"]:
        parts.append(f"{f['face'] + f['no face']} photos searched for a face: {f['face']} found, {f['no face']} "
                     "without one (their centre square scored, as the demo does)")
    return f"faces (--faces {f['mode']}): " + "; ".join(parts or ["none read"])


# ----------------------------------------------------------------------------- output

def summary(res: dict) -> dict:
    """The one-line JSON summary: headline metrics, calibrated top1/uar, unseen AP ratios, prompt drops."""
    s = {k: res.get(k) for k in SUMMARY_KEYS[:5]}
    s.update({k: (res["retrieval"] or {}).get(k) for k in SUMMARY_KEYS[5:]})
    cal = res["calibrated"] or {}
    s.update(calibrated_top1=cal.get("top1"), calibrated_uar=cal.get("uar"),
             n_images=res["n_images"], skipped=res["skipped_total"], split=res["split"].split(" ")[0],
             scoring="classifier" if res["prompts"] is None else f"text:{res['prompts']}",
             tta=res.get("tta"), prior="train" if res.get("prior") else None, faces=res.get("faces"))
    for name, u in (res.get("unseen") or {}).items():
        s[f"unseen_{name}"] = {k: u[k] for k in ("ap", "base_rate", "ap_over_base", "recall", "calibrated_recall")}
    for name, c in list((res.get("compare_prompts") or {}).items())[1:]:
        s[f"drop_{name}"] = {"top1": c["top1_drop"], "uar": c["uar_drop"]}
    return s


def report_text(res: dict) -> str:
    """Human-readable report: header, per-class table, headline metrics, unseen and prompt-comparison tables."""
    cfg, ret = res["config"], res.get("retrieval")
    sk = ", ".join(f"{n} {k}" for k, n in res["skipped"].items() if n) or "none"
    lines = [f"checkpoint: {res['checkpoint']} ({cfg['image_model']} + {cfg['text_model']}, {cfg['image_size']} px, "
             f"objective {cfg['objective']}) on {res['device']} ({res['precision']})",
             f"data: {res['data']}   split: {res['split']}   images: {res['n_images']}   skipped: {sk}",
             f"scoring: {res['scoring']}; {len(res['classes'])} classes"
             f"{'; test-time flip averaging' if res.get('tta') else ''}"
             f"{'; + log training label frequency (--prior train)' if res.get('prior') else ''}",
             *([faces_line(res["faces"])] if res.get("faces") else []), ""]
    rows = [dict(cls=c, n=int(np.sum(res["confusion"][j])), recall=res["per_class_recall"][c],
                 cal_recall=(res["calibrated"] or {}).get("per_class_recall", {}).get(c),
                 **({"t2i_AP": ret["t2i_AP_per_class"][j], "t2i_P@10": ret["t2i_precision@10_per_class"][j]}
                    if ret else {})) for j, c in enumerate(res["classes"])]
    lines += [metrics.format_table(rows, list(rows[0])), ""]
    lines.append("top-1 {top1:.4f}  top-5 {top5:.4f}  WAR {war:.4f}  UAR {uar:.4f}  macro-F1 {macro_f1:.4f}".format(
        **{k: res[k] if res[k] is not None else float("nan") for k in SUMMARY_KEYS[:5]}))
    if (cal := res["calibrated"]) is None:
        lines.append("calibration and retrieval: not applicable (the images hold one class)")
    else:
        lines.append(f"calibrated (column means subtracted): top-1 {cal['top1']:.4f}  UAR {cal['uar']:.4f}")
    if ret:
        f = lambda v: "-" if v is None else f"{v:.4f}"
        lines.append(f"retrieval: text->image mAP {f(ret['t2i_mAP'])}  P@1 {f(ret['t2i_precision@1'])}  "
                     f"P@5 {f(ret['t2i_precision@5'])}  P@10 {f(ret['t2i_precision@10'])}   image->text "
                     f"R@1 {f(ret['i2t_recall@1'])}  R@5 {f(ret['i2t_recall@5'])}  median rank {f(ret['i2t_median_rank'])}")
    if res.get("unseen"):
        lines += ["", "unseen classes (AP of the class prompt over all images vs its base rate):",
                  metrics.format_table([dict(cls=k, **v) for k, v in res["unseen"].items()],
                                       ["cls", "n", "ap", "base_rate", "ap_over_base", "recall", "calibrated_recall"])]
    if res.get("compare_prompts"):
        lines += ["", "prompt sets (drop = first set minus this one):", metrics.format_table(
            [dict(prompts=k, **v) for k, v in res["compare_prompts"].items()],
            ["prompts", "top1", "uar", "macro_f1", "top1_drop", "uar_drop"])]
    return "\n".join(lines)
