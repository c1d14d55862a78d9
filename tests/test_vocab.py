import csv
from pathlib import Path

import pytest

from utils import UserError
from vocab import format_vocab, load_vocab, parse_vocab, save_vocab

PAPER_CSV = Path(__file__).resolve().parents[1].parent / "shared" / "paper_captions.csv"


def test_parse_rules():
    text = "\ufeff# comment\n\n  happy : A smile with raised cheeks  \nA frown with lowered brows\r\nodd: time: 10:30\n"
    assert parse_vocab(text) == [("happy", "A smile with raised cheeks"),
                                 ("A frown with lowered brows", "A frown with lowered brows"),
                                 ("odd", "time: 10:30")]


def test_round_trip_through_text_and_file(tmp_path):
    items = [("joy", "An expression of joy, with a wide smile"), ("A plain sentence", "A plain sentence"),
             ("clock", "eyes fixed on 10:30"), ("ünïcode", "Ein Lächeln")]
    assert parse_vocab(format_vocab(items)) == items
    path = tmp_path / "sub" / "mine.txt"
    save_vocab(items, path)
    assert load_vocab(path) == items and load_vocab(str(path)) == items
    assert [p.name for p in path.parent.iterdir()] == ["mine.txt"]    # no temp file left behind


@pytest.mark.parametrize("text,line", [("a: x\n: no name\n", 2), ("a: x\n\n# c\nb:\n", 4),
                                       ("a: x\nb: y\nA: z\n", 3)])
def test_bad_line_names_its_number(text, line):
    with pytest.raises(UserError, match=f"mine.txt line {line}:"):
        parse_vocab(text, source="mine.txt")


def test_empty_and_unwritable_lists_are_refused(tmp_path):
    with pytest.raises(UserError, match="no expressions"):
        parse_vocab("# only a comment\n\n")
    for bad in [("a:b", "x"), ("#tag", "x"), ("a", "two\nlines"), ("", "x")]:
        with pytest.raises(UserError):
            format_vocab([bad])
    with pytest.raises(UserError, match="no such vocabulary"):
        load_vocab(tmp_path / "absent.txt")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9: x".encode("latin-1"))
    with pytest.raises(UserError, match="UTF-8"):
        load_vocab(tmp_path / "latin1.txt")


def test_shipped_paper_list_matches_the_paper():
    items = load_vocab("paper")
    assert [n for n, _ in items] == ["neutral", "happiness", "sadness", "surprise", "fear", "disgust", "anger",
                                     "contempt"]
    if PAPER_CSV.is_file():
        with open(PAPER_CSV, newline="") as f:
            rows = sorted(csv.DictReader(f), key=lambda r: int(r["label"]))
        assert items == [(r["class_name"], r["caption"].strip()) for r in rows]


def test_shipped_fine_grained_list():
    items = load_vocab("fine_grained")
    names = [n for n, _ in items]
    assert len(items) >= 25 and len(set(names)) == len(names)
    for must in ["confusion", "boredom", "pride", "embarrassment", "contempt", "relief", "pain", "triumph"]:
        assert must in names
    assert all(s.startswith("An expression of") and len(s.split()) >= 15 for _, s in items)
