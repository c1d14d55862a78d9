import io
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils import run_cli  # noqa: E402


class ClosedPipe(io.StringIO):
    """A stdout whose reader quit after the first line (`| head -1`)."""
    def write(self, text):
        if "\n" in self.getvalue():
            raise BrokenPipeError(32, "Broken pipe")
        return super().write(text)


def test_output_into_a_reader_that_quit_is_dropped_and_the_work_still_finishes(tmp_path, monkeypatch):
    pipe = ClosedPipe()
    monkeypatch.setattr(sys, "stdout", pipe)

    def main(argv):
        for i in range(5):
            print(f"line {i}", flush=True)
        (tmp_path / "out.csv").write_text("written")         # the command's --out, after its printed lines
        return 0
    assert run_cli(main, []) == 0
    assert pipe.getvalue() == "line 0\n" and (tmp_path / "out.csv").read_text() == "written"
    assert sys.stdout is pipe                                  # handed back as it was


def test_a_closed_stdout_still_lets_the_command_finish(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "stdout", None)                    # `python predict.py ... >&-`, or pythonw

    def main(argv):
        print("a result line")
        (tmp_path / "out.csv").write_text("written")
    assert run_cli(main, []) == 0 and (tmp_path / "out.csv").read_text() == "written"


def test_folder_links_are_walked_and_a_link_whose_disk_is_gone_is_named(tmp_path, caplog):
    from utils import walk_files
    (tmp_path / "sd" / "DCIM").mkdir(parents=True)
    (tmp_path / "sd" / "DCIM" / "a.jpg").write_bytes(b"x")
    gal = tmp_path / "gal"
    gal.mkdir()
    (gal / "Camera").symlink_to(tmp_path / "sd" / "DCIM")
    (gal / "loop").symlink_to(gal)
    assert [f for _, _, files in walk_files(gal) for f in files] == ["a.jpg"]
    (tmp_path / "sd").rename(tmp_path / "unplugged")
    unlisted = []
    assert [f for _, _, files in walk_files(gal, unlisted=unlisted) for f in files] == ["Camera"]
    assert unlisted == [gal / "Camera"] and "skipped folder" in caplog.text and "link target missing" in caplog.text


def test_a_csv_field_longer_than_the_csv_modules_limit_reads(tmp_path):
    from utils import read_csv_checked
    p = tmp_path / "bank.csv"
    p.write_text("label,caption\nhappy," + "a" * 200_000 + ",\n")          # a comma ending the row: the slow path
    df = read_csv_checked(p, ("label", "caption"))
    assert list(df.columns) == ["label", "caption"] and len(df["caption"][0]) == 200_000
