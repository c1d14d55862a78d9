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
