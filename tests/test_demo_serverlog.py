"""The server log of the real demo app: a request Gradio's own input checks used to refuse with a traceback (a slider
out of its range, a file of the wrong type) gets one line naming the request, the input and what was wrong; a bug in
a handler still prints its traceback. A multi-file input also takes one file on its own."""
from __future__ import annotations

import shutil
import socket

import pytest

import demo
from retrieval import Engine
from utils import UserError
from webguard import with_fallback

VOCAB = "happy: a wide smile\nsad: a frown\n"


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    """The demo app (bundled model, 4 drawn faces) served on a free port."""
    tmp = tmp_path_factory.mktemp("serverlog")
    gallery = tmp / "gal"
    gallery.mkdir()
    for p in sorted(demo.SAMPLE_GALLERY.glob("*.png"))[:4]:
        shutil.copy2(p, gallery / p.name)
    engine = Engine.load(demo.BUNDLED_MODEL, gallery, "cpu", tmp / "cache", progress=False)
    app = demo.build_app(engine).queue(default_concurrency_limit=4, max_size=64)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, max_file_size="20mb")
    yield f"http://127.0.0.1:{port}/", tmp, sorted(gallery.iterdir())[0]
    app.close()


def test_refused_inputs_are_one_log_line_each_not_a_traceback(app_url, capfd):
    from gradio_client import Client, handle_file
    url, tmp, face = app_url
    (tmp / "notes.txt").write_text("hello")
    client = Client(url, verbose=False)
    capfd.readouterr()                                            # the log from here on
    cases = [  # (endpoint, arguments, the answer's message and the log line's end)
        ("search", ("a wide smile", 500), "Top K must be a number from 1 to 100 (got 500)"),
        ("search", ("a wide smile", None), "Top K must be a number from 1 to 100 (got nothing)"),
        ("similar", (handle_file(str(face)), 0), "Top K must be a number from 1 to 100 (got 0)"),
        ("sequence", ([handle_file(str(face))], VOCAB, False, 5.0), "decay must be a number from 0 to 1 (got 5)"),
        ("load_vocab", (handle_file(str(face)), VOCAB), f"{face.name}: not UTF-8 text"),     # not a .txt file
        ("rank", (handle_file(str(tmp / "notes.txt")), VOCAB, True), "notes.txt: not an image file"),
    ]
    for name, args, want in cases:
        out = client.predict(*args, api_name="/" + name)
        assert want in out[-1], (name, out)                       # a message in the page, not a Gradio error
    added = client.predict([handle_file(str(tmp / "notes.txt"))], api_name="/add_photos")
    assert "skipped: notes.txt: not an image or a zip" in added
    one = client.predict(handle_file(str(face)), api_name="/add_photos")    # one file, not in a list
    assert one.startswith("Added 1 photo(s)") and "skipped" not in one, one
    seq = client.predict(handle_file(str(face)), VOCAB, False, 0.5, api_name="/sequence")
    assert "1 frame" in seq[-1], seq
    assert client.predict("a wide smile", 2, api_name="/search")[1].startswith("2 best matches")   # still serving
    assert client.predict("a wide smile", 75, api_name="/search")[1].startswith("5 best matches")  # 4 + 1 added
    log = "".join(capfd.readouterr())
    assert "Traceback" not in log and "gradio.exceptions" not in log, log[-3000:]
    lines = log.splitlines()
    for name, _, want in cases:
        hits = [ln for ln in lines if ln.startswith(f"refused {name} request: ") and want in ln]
        assert len(hits) == 1, (name, want, log[-3000:])
    assert sum("add_photos request: skipped notes.txt: not an image or a zip" in ln for ln in lines) == 1


def _raw_call(url: str, name: str, data: list) -> str:
    """One request as sent over HTTP (gradio_client would upload a local path first): the event stream's text."""
    import httpx
    event = httpx.post(f"{url}gradio_api/call/{name}", json={"data": data}, timeout=60).json()["event_id"]
    return httpx.get(f"{url}gradio_api/call/{name}/{event}", timeout=60).text


def test_inputs_gradio_refuses_before_any_handler_are_one_log_line_and_a_short_error(app_url, capfd):
    url, tmp, face = app_url
    outside = {"path": str(face), "meta": {"_type": "gradio.FileData"}}       # not in Gradio's upload folder
    cases = [("rank", [outside, VOCAB, True]), ("load_vocab", [outside, VOCAB]), ("similar", [outside, 3, True]),
             ("sequence", [[outside], VOCAB, False, 0.5]), ("add_photos", [[outside]]),
             ("rank", ["just a string", VOCAB, True])]                          # a string where an image goes
    capfd.readouterr()
    answers = [_raw_call(url, name, data) for name, data in cases]
    assert all(a.startswith("event: error") and "handle_file(path)" in a and str(tmp) not in a for a in answers), \
        answers
    log = "".join(capfd.readouterr())
    assert "Traceback" not in log and "InvalidPathError" not in log and "ValidationError" not in log, log[-3000:]
    lines = [ln for ln in log.splitlines() if ln.startswith("refused ")]
    assert [ln.split()[1] for ln in lines] == [name for name, _ in cases], log[-3000:]
    assert "did not receive as an upload" in lines[0] and "an input is not what this endpoint takes" in lines[-1]


def test_an_upload_given_as_a_url_is_one_log_line_and_says_to_upload_the_file(app_url, capfd):
    url, tmp, _ = app_url
    link = {"path": "http://127.0.0.1:9/x.jpg", "meta": {"_type": "gradio.FileData"}}  # refused by Gradio's SSRF check
    capfd.readouterr()
    answers = [_raw_call(url, "rank", [link, VOCAB, True]), _raw_call(url, "sequence", [[link], VOCAB, False, 0.5])]
    assert all(a.startswith("event: error") and "could not fetch the URL http://127.0.0.1:9/x.jpg" in a
               and "upload the file instead" in a for a in answers), answers
    log = "".join(capfd.readouterr())
    assert "Traceback" not in log, log[-3000:]
    lines = [ln for ln in log.splitlines() if ln.startswith("refused ")]
    assert [ln.split()[1] for ln in lines] == ["rank", "sequence"], log[-3000:]


def test_a_bug_in_a_handler_still_prints_its_traceback(capsys):
    @with_fallback(lambda msg, *_: (msg,))
    def buggy(x):
        if x == "user":
            raise UserError("a message for the user")
        return {}["missing"]                                      # a real bug: KeyError

    assert buggy("user") == ("a message for the user",)
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err and "buggy request: a message for the user" in out
    (msg,) = buggy("bug")
    out, err = capsys.readouterr()
    assert "could not handle this request (KeyError" in msg and "Traceback" in err and "KeyError" in err
