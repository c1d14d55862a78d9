"""Browser demo: find faces by describing an expression, and rank expression sentences for an uploaded face.

    python demo.py                         # serves at once on http://127.0.0.1:7860 (no training)
    python demo.py --checkpoint PATH --gallery DIR --host 0.0.0.0 --port 7860 [--share] [--max-faces 5]

The model served: --checkpoint PATH, else model_final.pth in the project root (drop your trained model there), else
the bundled models/exprclip-ferplus.pth. The log says which one and why. Train your own with
`python train.py --preset offline --data .` (see the README).

The Gradio code is a thin layer over retrieval.py / sequence.py / vocab.py / photoviews.py; served_model.py picks the
model. Every handler turns a bad request into a message that names uploads by their file name only, and the server
log into one line (webguard.py; inputs Gradio would refuse with a traceback reach the handler's own check).
Endpoints (gradio_client): /search, /rank, /similar, /sequence, /save_vocab, /load_vocab, /add_photos.
"""
from __future__ import annotations

import argparse
import os
from functools import partial
from pathlib import Path

from captions import load_caption_bank
from faces import CROP_MAX_SIDE, check_min_side
from logs import get_logger
from photos import FACES_MODES, describe_update, failure_lines
from photoviews import (add_photos, add_photos_steps, clicked_key, gallery_warnings, header, picked_view,
                        result_items, result_tiles)
from retrieval import (Engine, clean_query, frame_crops, largest_face, rank_faces, score_frames, search_text,
                       similar_images, similar_to_gallery_image)
from served_model import (BUNDLED_MODEL, ROOT, ROOT_MODEL, TRAIN_COMMAND, choose_checkpoint, describe_model,
                          shown_path)
from utils import UserError, run_cli
from video import load_frames
from webguard import (MAX_UPLOAD_PIXELS, check_port_free, download_path, keep_text, lenient, named, number_in,
                      one_or_many_files, open_upload, port_in_use, quiet_refusals, read_vocab_upload, serving,
                      upload_name, upload_path, vocab_items, whole_number_in, with_fallback, yes_no)

log = get_logger(__name__)
PAPER_SENTENCES = [sentences[0] for sentences in load_caption_bank("paper").values()]   # the paper's eight, in order
EXAMPLES = ["a wide smile", "활짝 웃는 얼굴", "눈썹을 찌푸리고 화난 표정", "An expression of disdain and superiority."] \
    + PAPER_SENTENCES                                 # Korean examples: answered when the model reads Korean
MAX_K = 100                    # results per search (the slider stops at 50; API callers may ask more)
SHOWN_QUERY_CHARS = 80
SAMPLE_GALLERY = ROOT / "images"   # the drawn sample, served when no --gallery is given
QUERY_FACE = {"face": "the largest face in the upload", "crop": "the upload (a face crop)",
              "whole": "the whole upload (detection off)", "no face": "the whole upload (no face found)"}


def _md(text: str) -> str:
    return str(text).replace("|", "\\|")


def face_table(names: list[str], probs, whole: str = "") -> str:
    """Markdown table: one row per face (`face 1` = the largest, as numbered on the picture), its top-5 expressions;
    with `whole` one row named so (`whole image (no face)`: none was found; `face crop`: the image is one)."""
    top_n = min(5, len(names))
    rows = ["| | " + " | ".join(["1st", "2nd", "3rd", "4th", "5th"][:top_n]) + " |", "|---" * (top_n + 1) + "|"]
    for n, p in enumerate(probs, 1):                                       # p: [C]
        top = p.argsort(kind="stable")[::-1][:top_n]
        name = whole or f"face {n}"
        rows.append(f"| {name} | " + " | ".join(f"{_md(names[i])} {p[i]:.0%}" for i in top) + " |")
    return "\n".join(rows)


# ----------------------------------------------------------------------------- handlers (no Gradio inside)

def top_k(k) -> int:
    return whole_number_in(k, "Top K", 1, MAX_K)


def search_message(query: str, n_hits: int, notes: list[str]) -> str:
    """'12 best matches for “…”' (long queries shortened), then one warning paragraph per note."""
    shown = query if len(query) <= SHOWN_QUERY_CHARS else query[:SHOWN_QUERY_CHARS - 1] + "…"
    return "\n\n".join([f"{n_hits} best matches for “{_md(shown)}”"] + [f"**Warning:** {n}" for n in notes])


def rank_view(engine: Engine, image, vocab_text, detect, max_faces: int = 5):
    """Face → expressions: (photo with numbered boxes, <= 1024 px; {name: probability} of the table's first row
    (face 1, or the whole image); markdown)."""
    from faces import DECODE_SIDE
    items, detect = vocab_items(vocab_text), yes_no(detect, "Detect faces")
    photo = open_upload(image, DECODE_SIDE)
    res = rank_faces(engine, photo, [s for _, s in items], detect, max_faces,     # big JPEGs decode at 1/2..1/8
                     name=upload_name(image))
    names = [name for name, _ in items]
    notes = []
    if res.crop:
        notes.append(f"Read as a face crop: the image is {photo.width}x{photo.height} px (at most {CROP_MAX_SIDE} "
                     "px on its longer side), so it was scored whole, without searching it for faces.")
    elif not detect:
        notes.append("Detection off: the whole image was ranked, without searching it for faces.")
    elif not res.found:
        notes.append("**No face found: ranked the whole image.** These scores describe the whole picture, not a "
                     "face, so they are no reading of anyone's expression: use a photo with a visible, mostly "
                     "frontal face, or untick face detection for an already cropped face.")
    if res.more:
        notes.append(f"More than {max_faces} faces: showing the {max_faces} largest (--max-faces).")
    elif res.found:
        notes.append(f"{len(res.boxes)} face(s) found, numbered largest first.")
    first = {names[i]: float(v) for i, v in enumerate(res.probs[0])}
    whole = ("face crop" if res.crop else "whole image (detection off)" if not detect
             else "" if res.found else "whole image (no face)")
    table = face_table(names, res.probs, whole)
    return res.shown, first, "\n\n".join([" ".join(notes), table]).strip()


def similar_gallery_view(engine: Engine, paths, index, k):
    """A click on result `index` of the last text search -> faces with the closest expression, itself first."""
    key = clicked_key(engine, paths, index)
    items = result_items(engine, similar_to_gallery_image(engine, key, top_k(k)))
    return items, f"{len(items)} faces closest to {key.name} (itself first)"


def sequence_view(engine: Engine, files, vocab_text, detect, decay, max_frames: int = 32):
    """Sequence: ({name: turn-weighted probability}, timeline figure, markdown). Frames showing others but not the
    followed person are left out of the scores and named."""
    from sequence import frame_list, plot_font_note, sequence_scores, timeline_figure
    items = vocab_items(vocab_text)
    files = [files] if isinstance(files, (str, os.PathLike)) else files
    if not isinstance(files, (list, tuple)):
        raise UserError("upload several images (frames) or a short video first")
    decay, detect = float(number_in(decay, "decay", 0, 1)), yes_no(detect, "Detect faces")
    notes: list[str] = []
    frames, skipped = load_frames(files, max_frames, MAX_UPLOAD_PIXELS, notes)
    crops, found, people, followed, away = frame_crops(frames, detect, engine.cfg.grayscale)
    times, kept = [f.info.get("time_s") for f in frames], [i for i, a in enumerate(away) if not a]
    names = [name for name, _ in items]
    scores = score_frames(engine, [crops[i] for i in kept], [s for _, s in items])       # [T, C]
    overall, w = sequence_scores(scores, decay)                       # [C], [T]
    fig = timeline_figure(scores, names, top=5, decay=decay, times=[times[i] for i in kept],
                          numbers=[i + 1 for i in kept])
    msg = [f"**{len(kept)} frame{'' if len(kept) == 1 else 's'}** (decay {decay:g}: the last frame weighs "
           f"{w[-1]:.0%})."]
    if people > 1:
        msg.append(f"{people} people in view: followed the one in the most frames ({followed} of {len(frames)}).")
    if len(kept) < len(frames):
        msg.append(f"{frame_list(times, [i for i in range(len(frames)) if away[i]]).capitalize()}: the followed "
                   "person not in view, left out.")
    missing = [i for i, f in enumerate(found) if not f]
    if detect and missing:
        msg.append(f"No face found in {frame_list(times, missing)}: the whole frame was scored.")
    if skipped:
        msg.append(f"Skipped {len(skipped)} file(s): " + "; ".join(skipped))
    msg += [n + "." for n in notes] + [plot_font_note(names)]
    return {n: float(v) for n, v in zip(names, overall)}, fig, " ".join(m for m in msg if m)


def vocab_handlers() -> dict:
    """Save, load and preset handlers of the expression list (no model needed)."""
    from vocab import SHIPPED, format_vocab, load_vocab, parse_vocab, save_vocab

    @with_fallback(lambda msg, *_: (None, msg))
    def on_save_vocab(vocab_text):
        items = vocab_items(vocab_text)
        path = download_path("expressions.txt")
        save_vocab(items, path)
        return str(path), f"saved {len(items)} expressions: download expressions.txt"

    @with_fallback(lambda msg, file=None, current=None: (keep_text(current), msg))
    def on_load_vocab(file, current=None):
        text = read_vocab_upload(file)
        return text, f"loaded {len(parse_vocab(text))} expressions from {Path(file).name}"

    @with_fallback(lambda msg, name=None, current=None: (keep_text(current), msg))
    def on_preset(name, current=None):
        if not isinstance(name, str) or name not in SHIPPED:
            raise UserError(f"choose a shipped list: {', '.join(SHIPPED)}")
        items = load_vocab(name)
        return format_vocab(items), f"loaded the shipped list `{name}` ({len(items)} expressions)"

    return named(dict(save_vocab=on_save_vocab, load_vocab=on_load_vocab, preset=on_preset))


def make_handlers(engine: Engine, max_faces: int = 5, max_frames: int = 32) -> dict:
    """Every handler of the app: the functions above, each guarded (webguard.with_fallback: a bad request gets a
    message in the UI and one line in the server log, never a traceback, and the server keeps serving)."""

    @with_fallback(lambda msg, *_: ([], [], msg))
    def on_search(query, k):      # (tiles, their keys: what a click looks up, message)
        text = clean_query(query)
        tiles, keys = result_tiles(engine, search_text(engine, text, top_k(k)))
        return tiles, keys, search_message(text, len(tiles), engine.query_warnings(query))

    @with_fallback(lambda msg, *_: ([], msg))
    def on_similar(image, k, detect=True):
        photo, detect = open_upload(image), yes_no(detect, "Detect faces")
        check_min_side(photo.size, upload_name(image))                  # largest_face says "the image"
        face, how = largest_face(photo, detect, engine.cfg.grayscale)
        hits = similar_images(engine, face, top_k(k))
        items = result_items(engine, hits)
        return items, f"{len(items)} faces with the closest expression to {QUERY_FACE[how]}"

    return named(dict(search=on_search, similar=on_similar, **vocab_handlers(),
                pick=with_fallback(lambda msg, *_: (None, [], msg))(partial(picked_view, engine)),
                add_photos=with_fallback(lambda msg, *_: (msg,))(lambda files: (add_photos(engine, files),)),
                rank=with_fallback(lambda msg, *_: (None, {}, msg))(partial(rank_view, engine, max_faces=max_faces)),
                similar_gallery=with_fallback(lambda msg, *_: ([], msg))(partial(similar_gallery_view, engine)),
                sequence=with_fallback(lambda msg, *_: ({}, None, msg))(
                    partial(sequence_view, engine, max_frames=max_frames))))


# ----------------------------------------------------------------------------- UI

def _image_input(**kw):
    """A gr.Image whose undecodable uploads reach the handler as a path (so they get a message, not a toast)."""
    import gradio as gr
    return lenient(gr.Image(type="filepath", image_mode=None, **kw), upload_path)  # image_mode None: not decoded


def _files_input(**kw):
    """A gr.File for several files that takes one file on its own too (set on the instance, as `lenient` does)."""
    import gradio as gr
    files = gr.File(file_count="multiple", type="filepath", **kw)
    files.data_model = one_or_many_files()
    return files


def _slider(*args, **kw):
    """A gr.Slider whose out-of-range or non-number values (API callers) reach the handler, which checks them."""
    import gradio as gr
    return lenient(gr.Slider(*args, **kw))


def build_app(engine: Engine, max_faces: int = 5, max_frames: int = 32):
    """The Gradio Blocks: an expression-list panel and three tabs, each a thin layer over make_handlers."""
    import gradio as gr
    h = make_handlers(engine, max_faces, max_frames)
    drawn = engine.index is not None and Path(engine.index.gallery).resolve() == SAMPLE_GALLERY.resolve()
    # delete_cache: Gradio's copies of served files (crops of users' photos) older than an hour, and at restart
    with gr.Blocks(title="ExprCLIP: search faces by expression", delete_cache=(3600, 3600)) as app:
        gr.Markdown("# ExprCLIP\nDescribe an expression to find faces, or upload a face to name its expression. "
                    + header(engine, drawn))
        vocab = _vocab_panel(h)
        with gr.Tab("Text → faces"):
            _search_tab(h, engine)
        with gr.Tab("Face → expressions"):
            _face_tab(h, vocab, max_faces)
        with gr.Tab("Sequence"):
            _sequence_tab(h, vocab, max_frames)
    return quiet_refusals(app)


def _vocab_panel(h: dict):
    """The expression list shared by the face and sequence tabs (edit, load a shipped list or a file, save)."""
    import gradio as gr
    from vocab import SHIPPED, format_vocab, load_vocab
    with gr.Accordion("Expression list (for Face → expressions and Sequence): edit, load or save", open=False):
        with gr.Row():
            vocab = gr.Textbox(label="Expressions (name: sentence, one per line)", lines=10, scale=3,
                               value=format_vocab(load_vocab("paper")))
            with gr.Column(scale=1):
                preset = lenient(gr.Dropdown(list(SHIPPED), value="paper", label="Load a shipped list"))
                upload = lenient(gr.UploadButton("Load from a text file", file_types=[".txt"], type="filepath"),
                                 upload_path)                 # another file type: read_vocab_upload says why
                save = gr.Button("Save as a text file")
                saved = gr.File(label="Saved list", interactive=False)
                vocab_status = gr.Markdown()
        preset.change(h["preset"], [preset, vocab], [vocab, vocab_status], api_visibility="private")
        upload.upload(h["load_vocab"], [upload, vocab], [vocab, vocab_status], api_name="load_vocab")
        save.click(h["save_vocab"], vocab, [saved, vocab_status], api_name="save_vocab")
    return vocab


def _search_tab(h: dict, engine: Engine) -> None:
    import gradio as gr
    with gr.Row():
        query = gr.Textbox(label="Expression description", placeholder="a wide smile", scale=4)
        k = _slider(1, 50, value=12, step=1, label="Top K", scale=1)
    go = gr.Button("Search", variant="primary")
    gr.Examples(EXAMPLES, inputs=query)
    status = gr.Markdown()
    gallery = gr.Gallery(label="Most similar faces (cosine score): click one to find similar expressions",
                         columns=6, height="auto")
    hit_paths = gr.State([])
    pick_status = gr.Markdown()
    with gr.Row():
        photo = gr.Image(label="The clicked face in its photo", type="pil", interactive=False, scale=1)
        similar = gr.Gallery(label="Faces with a similar expression to the clicked one", columns=4, height="auto",
                             scale=2)

    def pick(paths, top_k, evt):
        return h["pick"](paths, evt.index, top_k)
    pick.__annotations__ = {"evt": gr.SelectData}   # a real class: the `annotations` import makes strings

    go.click(h["search"], [query, k], [gallery, hit_paths, status], api_name="search")    # a State: not in the API
    query.submit(h["search"], [query, k], [gallery, hit_paths, status], api_visibility="private")
    gallery.select(pick, [hit_paths, k], [photo, similar, pick_status], api_visibility="private")
    _add_photos_panel(engine)


def _add_photos_panel(engine: Engine) -> None:
    """Upload photos or a zip: copied into the cache's uploads folder and indexed into the gallery, with progress."""
    import gradio as gr
    with gr.Accordion("Add photos to the gallery (image files or a zip; every face found becomes searchable)",
                      open=False):
        files = _files_input(label="Photos or a zip")
        add = gr.Button("Add and index")
        added = gr.Markdown()

    def add_ui(paths):
        yield from add_photos_steps(engine, paths)
    add.click(add_ui, files, added, api_name="add_photos")


def _face_tab(h: dict, vocab, max_faces: int) -> None:
    import gradio as gr
    with gr.Row():
        image = _image_input(label="Face or photo", sources=["upload", "webcam", "clipboard"])
        with gr.Column():
            detect = gr.Checkbox(value=True, label=f"Detect and crop faces (up to {max_faces}, largest first)",
                                 info=f"images of at most {CROP_MAX_SIDE} px are face crops already: read whole")
            rank = gr.Button("Rank expressions", variant="primary")
            bars = gr.Label(num_top_classes=5, label="Top-5 (the table's first row)")
    boxes = gr.Image(label="Faces found (numbered as in the table)", type="pil")
    per_face = gr.Markdown()
    rank.click(h["rank"], [image, vocab, detect], [boxes, bars, per_face], api_name="rank")
    sim_k = _slider(1, 50, value=12, step=1, label="Similar faces: top K")
    sim = gr.Button("Find faces with a similar expression")
    sim_status = gr.Markdown()
    sim_gallery = gr.Gallery(columns=6, height="auto")
    sim.click(h["similar"], [image, sim_k, detect], [sim_gallery, sim_status], api_name="similar")


def _sequence_tab(h: dict, vocab, max_frames: int) -> None:
    import gradio as gr
    gr.Markdown(f"Several images (frames, taken in file-name order) or a short video (up to {max_frames} "
                "frames sampled evenly): per-frame expression probabilities and one turn-weighted score, "
                "recent frames weighing more.")
    files = _files_input(label="Frames or a video")
    with gr.Row():
        seq_detect = gr.Checkbox(value=True, label="Detect the largest face per frame")
        decay = _slider(0, 1, value=0.5, step=0.05, label="Decay (1 = plain mean, 0 = last frame only)")
    run = gr.Button("Score the sequence", variant="primary")
    with gr.Row():
        seq_bars = gr.Label(num_top_classes=5, label="Overall top-5 (turn-weighted)")
        plot = gr.Plot(label="Timeline")
    seq_status = gr.Markdown()
    run.click(h["sequence"], [files, vocab, seq_detect, decay], [seq_bars, plot, seq_status], api_name="sequence")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=None, help=f"model to serve (default: {ROOT_MODEL.name} in the project "
                    f"root, else the bundled {shown_path(BUNDLED_MODEL, ROOT)})")
    ap.add_argument("--gallery", default=str(SAMPLE_GALLERY), help="folder of photos (nested folders too: every "
                    "face found is searchable) or face crops to search (default: the drawn sample in images/)")
    ap.add_argument("--faces", choices=FACES_MODES, default="auto", help="auto: files of at most 160 px are face "
                    "crops (one entry each), larger files photos (one entry per face found); crops/photos force it")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=7860)
    ap.add_argument("--share", action="store_true", help="create a public Gradio link")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--tta", choices=["flip", "none"], default="flip", help="flip: each face's embedding is averaged "
                    "with its mirror image's (+2.0 top-1 on the validation faces; twice the image compute)")
    ap.add_argument("--cache-dir", default=str(ROOT / ".cache" / "gallery"), help="where gallery embeddings are "
                    "cached (default: .cache/gallery in the project folder, wherever the demo is started from)")
    ap.add_argument("--quickstart", action="store_true", help="deprecated: the demo serves the bundled model at once")
    ap.add_argument("--max-faces", type=int, default=5, help="faces ranked per photo, largest first")
    ap.add_argument("--max-frames", type=int, default=32, help="frames scored per sequence (videos: sampled evenly)")
    a = ap.parse_args(argv)
    if a.max_faces < 1 or a.max_frames < 1:
        raise UserError("--max-faces and --max-frames must be at least 1")
    if not 1 <= a.port <= 65535:
        raise UserError(f"--port {a.port}: give a TCP port in 1-65535 (7860 is Gradio's)")
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.quickstart:
        log.info(f"--quickstart is deprecated and no longer trains: the demo serves {ROOT_MODEL.name} from the "
                 f"project root or the bundled {shown_path(BUNDLED_MODEL, ROOT)}; to train your own: `{TRAIN_COMMAND}`")
    check_port_free(a.host, a.port)                                  # before minutes of loading and indexing
    checkpoint, why = choose_checkpoint(a.checkpoint, ROOT_MODEL, BUNDLED_MODEL)    # demo's names (tests set them)
    log.info(f"model: {shown_path(checkpoint)} ({why})")
    info, warn = describe_model(checkpoint)
    log.info(f"model: {info}")
    if warn:
        log.warning(f"warning: {warn}")
    engine = Engine.load(checkpoint, a.gallery, a.device, a.cache_dir, faces=a.faces, tta=a.tta == "flip")
    log.info(f"gallery {shown_path(Path(a.gallery))}: {describe_update(engine.stats, len(engine.index))}")
    for line in failure_lines(engine.stats) + gallery_warnings(engine):
        log.warning(line)
    with serving():                      # SIGTERM as Ctrl-C; Gradio's files in a folder removed on close
        app = build_app(engine, a.max_faces, a.max_frames).queue(default_concurrency_limit=4, max_size=64)
        try:
            app.launch(server_name=a.host, server_port=a.port, share=a.share, max_file_size="20mb")
        except OSError as e:             # Gradio: "Cannot find empty port in range: 7860-7860. ..."
            if "port" not in str(e).lower():
                raise
            raise UserError(port_in_use(a.host, a.port)) from None  # taken while the gallery was indexed
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
