"""Browser demo: find faces by describing an expression, and rank expression sentences for an uploaded face.

    python demo.py                         # model_final.pth over images/, http://127.0.0.1:7860
    python demo.py --quickstart            # no model yet: train one on the bundled sample first (offline, ~3 min)
    python demo.py --gallery DIR --checkpoint PATH --host 0.0.0.0 --port 7860 [--share]

The Gradio code is a thin layer over retrieval.py; every handler turns a bad request into a message.
"""
from __future__ import annotations

import argparse
import functools
import traceback
from pathlib import Path

from retrieval import Engine, rank_expressions, search_text, similar_images
from utils import UserError, run_cli

PAPER_SENTENCES = [
    "An expression of calm and neutrality, with a neutral mouth and no particular indication of emotion. "
    "The eyebrows are usually not raised or furrowed",
    "An expression of contentment and pleasure, with a smile and the corners of the mouth turned up, often "
    "accompanied by crinkling around the eyes. The face may appear relaxed and at ease",
    "An expression of sadness and sorrow, with a downturned mouth or frown, and sometimes tears or a tightness "
    "around the eyes. The face may appear physically withdrawn or resigned.",
    "An expression of shock and astonishment, with wide-open eyes and raised eyebrows, sometimes accompanied by "
    "a gasp or an open mouth",
    "An expression of tension and withdrawal, with wide-open eyes, raised eyebrows, and a slightly open mouth. "
    "The face may appear physically tense or frozen in fear",
    "An expression of repulsion and displeasure, with a raised upper lip, a scrunched nose, and a downturned mouth",
    "A facial expression showing irritation and unrest, with a wrinkled forehead, narrowed eyes, and tight lips "
    "or a frown",
    "An expression of disdain and superiority, with a slight smirk or sneer, often accompanied by a raised eyebrow "
    "or a lopsided smile",
]
EXAMPLES = ["a wide smile", "An expression of disdain and superiority."] + PAPER_SENTENCES
MAX_UPLOAD_PIXELS = 40_000_000


def safe(fn):
    """Handler wrapper: UserError -> its message; anything else -> a short message (server keeps serving)."""
    @functools.wraps(fn)
    def wrapper(*args):
        try:
            return fn(*args)
        except UserError as e:
            return fn.fallback(str(e))
        except Exception as e:  # noqa: BLE001 -- a demo request must never take the server down
            traceback.print_exc()
            return fn.fallback(f"could not handle this request ({type(e).__name__}: {e})")
    return wrapper


def with_fallback(make):
    def deco(fn):
        fn.fallback = make
        return safe(fn)
    return deco


def open_upload(image):
    """Gradio upload (a file path) -> RGB PIL image; bombs and non-images -> UserError."""
    if image is None:
        raise UserError("upload a face image first")
    from faces import safe_open_image
    return safe_open_image(image, max_pixels=MAX_UPLOAD_PIXELS)


# ----------------------------------------------------------------------------- handlers (no Gradio inside)

def make_handlers(engine: Engine) -> dict:
    @with_fallback(lambda msg: ([], msg))
    def on_search(query, k):
        hits = search_text(engine, query, int(k))
        return [(str(p), f"{s:.3f}  {p.name}") for p, s in hits], f"{len(hits)} best matches for “{query.strip()}”"

    @with_fallback(lambda msg: (None, {}, msg))
    def on_rank(image, vocab_text, detect):
        from faces import draw_boxes, faces_or_whole
        from vocab import parse_vocab
        items = parse_vocab(vocab_text or "")
        if not items:
            raise UserError("the expression list is empty: one `name: sentence` per line")
        photo = open_upload(image)
        crops, boxes, found = faces_or_whole(photo, max_faces=5, grayscale=engine.cfg.grayscale) if detect \
            else ([photo], [], False)
        lines, first = [], {}
        for n, crop in enumerate(crops, 1):
            ranked = rank_expressions(engine, crop, [s for _, s in items])
            name_of = {s: name for name, s in items}
            top = {name_of[s]: p for s, p, _ in ranked[:5]}
            first = first or top
            lines.append(f"**face {n}**: " + ", ".join(f"{k} {v:.0%}" for k, v in top.items()))
        note = "" if found or not detect else "No face found: ranked the whole image. "
        return (draw_boxes(photo, boxes) if found else photo), first, note + "  \n".join(lines)

    @with_fallback(lambda msg: ([], msg))
    def on_similar(image, k):
        hits = similar_images(engine, open_upload(image), int(k))
        return [(str(p), f"{s:.3f}  {p.name}") for p, s in hits], f"{len(hits)} faces with the closest expression"

    return dict(search=on_search, rank=on_rank, similar=on_similar)


# ----------------------------------------------------------------------------- UI

def build_app(engine: Engine):
    import gradio as gr
    from vocab import format_vocab, load_vocab
    h = make_handlers(engine)
    n = len(engine.index) if engine.index is not None else 0
    with gr.Blocks(title="ExprCLIP: search faces by expression") as app:
        gr.Markdown(f"# ExprCLIP\nDescribe an expression to find faces, or upload a face to name its expression. "
                    f"Gallery: {n} images" + (f", {len(engine.failed)} unreadable: "
                                              + ", ".join(p.name for p in engine.failed[:10]) if engine.failed else ""))
        with gr.Tab("Text → faces"):
            with gr.Row():
                query = gr.Textbox(label="Expression description", placeholder="a wide smile", scale=4)
                k = gr.Slider(1, 50, value=12, step=1, label="Top K", scale=1)
            go = gr.Button("Search", variant="primary")
            gr.Examples(EXAMPLES, inputs=query)
            status = gr.Markdown()
            gallery = gr.Gallery(label="Most similar faces (cosine score)", columns=6, height="auto")
            for trigger in (go.click, query.submit):
                trigger(h["search"], [query, k], [gallery, status])
        with gr.Tab("Face → expressions"):
            with gr.Row():
                image = gr.Image(label="Face or photo", type="filepath", sources=["upload", "webcam", "clipboard"])
                with gr.Column():
                    vocab = gr.Textbox(label="Expressions (name: sentence, one per line)", lines=10,
                                       value=format_vocab(load_vocab("paper")))
                    preset = gr.Dropdown(["paper", "fine_grained"], value="paper", label="Load a shipped list")
                    detect = gr.Checkbox(value=True, label="Detect and crop faces")
            rank = gr.Button("Rank expressions", variant="primary")
            with gr.Row():
                boxes = gr.Image(label="Faces found", type="pil")
                bars = gr.Label(num_top_classes=5, label="Top-5 (face 1)")
            per_face = gr.Markdown()
            preset.change(lambda name: format_vocab(load_vocab(name)), preset, vocab)
            rank.click(h["rank"], [image, vocab, detect], [boxes, bars, per_face])
            sim_k = gr.Slider(1, 50, value=12, step=1, label="Similar faces: top K")
            sim = gr.Button("Find faces with a similar expression")
            sim_status = gr.Markdown()
            sim_gallery = gr.Gallery(columns=6, height="auto")
            sim.click(h["similar"], [image, sim_k], [sim_gallery, sim_status])
    return app


def quickstart(checkpoint: str) -> None:
    """Train the offline preset on the bundled sample (images/ + captions.csv) into `checkpoint`."""
    import train
    print(f"{checkpoint} not found: training a model on the bundled sample (preset offline, a few minutes on CPU)")
    train.main(["--preset", "offline", "--data", ".", "--final-path", checkpoint, "--out-dir", "runs/quickstart"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default="model_final.pth", help="model written by train.py")
    ap.add_argument("--gallery", default="images", help="folder of face images to search")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=7860)
    ap.add_argument("--share", action="store_true", help="create a public Gradio link")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--cache-dir", default=".cache/gallery", help="where gallery embeddings are cached")
    ap.add_argument("--quickstart", action="store_true", help="train on the bundled sample if --checkpoint is missing")
    a = ap.parse_args(argv)
    if a.quickstart and not Path(a.checkpoint).exists():
        quickstart(a.checkpoint)
    engine = Engine.load(a.checkpoint, a.gallery, a.device, a.cache_dir)
    print(f"gallery: {len(engine.index)} images embedded" + (f", {len(engine.failed)} unreadable" if engine.failed else ""))
    build_app(engine).queue(default_concurrency_limit=4, max_size=64).launch(
        server_name=a.host, server_port=a.port, share=a.share, max_file_size="20mb")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
