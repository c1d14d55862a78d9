import io
import warnings

import cv2
import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from PIL import Image

import video
from sequence import frame_list, frame_weights, plot_font_note, sequence_scores, timeline_figure, track_faces
from utils import UserError


@pytest.mark.parametrize("T,decay", [(1, 0.5), (5, 0.5), (7, 0.9), (4, 1.0), (3, 0.0)])
def test_weights_follow_the_formula(T, decay):
    scores = np.random.default_rng(T).random((T, 6))
    overall, w = sequence_scores(scores, decay)
    raw = np.array([decay ** (T - 1 - t) for t in range(T)])
    assert w.shape == (T,) and np.allclose(w, raw / raw.sum(), rtol=0, atol=1e-12)
    assert w.sum() == pytest.approx(1.0) and w[-1] == w.max()
    assert np.allclose(overall, (raw[:, None] * scores).sum(0) / raw.sum())


def test_constant_sequence_gives_the_constant():
    row = np.array([0.1, -0.4, 2.5, 0.0])
    for decay in (0.0, 0.3, 1.0):
        overall, _ = sequence_scores(np.tile(row, (9, 1)), decay)
        assert np.allclose(overall, row)


def test_recent_frame_dominates_as_decay_goes_to_zero():
    scores = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])          # last frame disagrees with the rest
    assert sequence_scores(scores, 1.0)[0].argmax() == 0               # plain mean: majority wins
    gaps = [abs(sequence_scores(scores, d)[0] - scores[-1]).max() for d in (0.5, 0.1, 0.01, 1e-6)]
    assert gaps == sorted(gaps, reverse=True) and gaps[-1] < 1e-5
    assert np.array_equal(sequence_scores(scores, 0.0)[0], scores[-1])


def test_accepts_torch_and_refuses_bad_input():
    overall, w = sequence_scores(torch.ones(3, 2), 0.5)
    assert overall.shape == (2,) and w.shape == (3,)
    for bad in (np.zeros((0, 3)), np.array([[np.nan, 1.0]]), np.zeros((2, 2, 2))):
        with pytest.raises(UserError):
            sequence_scores(bad)
    with pytest.raises(UserError, match="decay"):
        frame_weights(3, 1.5)


def test_timeline_plots_top_classes(tmp_path):
    scores = np.array([[0.1, 0.5, 0.2, 0.9], [0.2, 0.4, 0.1, 0.8], [0.3, 0.9, 0.0, 0.1]])
    fig = timeline_figure(scores, ["a", "b", "c", "d"], top=2)
    assert isinstance(fig, Figure)
    labels = [line.get_label().split()[0] for line in fig.axes[0].get_lines()]
    assert labels == ["b", "d"]                                      # b: 0.7 overall, d: 0.4 with decay 0.5
    fig.savefig(tmp_path / "t.png")
    assert (tmp_path / "t.png").stat().st_size > 1000
    with pytest.raises(UserError, match="names"):
        timeline_figure(scores, ["a", "b"])


def test_timeline_x_axis_is_seconds_for_a_video_and_frame_numbers_otherwise():
    scores = np.array([[0.1, 0.9], [0.5, 0.5], [0.8, 0.2]])
    fig = timeline_figure(scores, ["a", "b"], times=[0.0, 1.5, 3.0])
    ax = fig.axes[0]
    assert ax.get_xlabel() == "time (s)" and list(ax.get_lines()[0].get_xdata()) == [0.0, 1.5, 3.0]
    assert "0-3 s" in ax.get_title()
    for times in (None, [0.0, None, 3.0], [0.0, 3.0, 1.5], ["0", "1", "2"], [0.0, float("nan"), 2.0], [0.0, 1.0]):
        ax = timeline_figure(scores, ["a", "b"], times=times).axes[0]           # two videos, a still, junk
        assert ax.get_xlabel() == "frame" and list(ax.get_lines()[0].get_xdata()) == [1, 2, 3], times
    ax = timeline_figure(scores, ["a", "b"], numbers=[1, 3, 4]).axes[0]         # frame 2 left out: not renumbered
    assert list(ax.get_lines()[0].get_xdata()) == [1, 3, 4] and frame_list(None, [2]) == "frame(s) 3"


def test_a_face_keeps_its_person_number_when_the_other_outgrows_it():
    left_big, left_small = (20, 60, 120, 160), (30, 70, 110, 150)
    right_big, right_small = (190, 60, 290, 160), (200, 70, 280, 150)
    frames = [[left_big, right_small], [right_big, left_small],      # detectors list faces largest first
              [],                                                      # a frame without a face
              [right_small],                                           # the left person looks away
              [left_small, (600, 400, 700, 500), right_big]]           # back, and a third person far away
    assert track_faces(frames) == [[1, 2], [2, 1], [], [2], [1, 3, 2]]


def test_a_face_of_another_size_or_too_far_is_someone_else():
    assert track_faces([[(0, 0, 100, 100)], [(0, 0, 300, 300)]]) == [[1], [2]]      # side 3x: not the same face
    assert track_faces([[(0, 0, 100, 100)], [(150, 0, 250, 100)]]) == [[1], [2]]    # moved 1.5 sides
    assert track_faces([[(0, 0, 100, 100)], [(80, 0, 180, 100)]]) == [[1], [1]]     # moved 0.8 sides
    # two faces close to one person's last box: the nearer one continues it, never both
    assert track_faces([[(0, 0, 100, 100)], [(60, 0, 160, 100), (10, 0, 110, 100)]]) == [[1], [2, 1]]


def _clip(path, n: int = 100, fps: int = 10):
    out = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (64, 48))
    for i in range(n):
        out.write(np.full((48, 64, 3), i * 2, np.uint8))
    out.release()
    return path


def test_a_video_cut_short_is_sampled_over_the_frames_it_has_and_says_so(tmp_path):
    data = _clip(tmp_path / "full.avi").read_bytes()
    (tmp_path / "cut.avi").write_bytes(data[:len(data) * 4 // 10])
    notes = []
    frames = video.video_frames(tmp_path / "cut.avi", 8, notes=notes)
    read = int(notes[0].split("ends at frame ")[1].split()[0])
    assert 10 < read < 100 and len(frames) == 8 and notes == [
        f"{tmp_path / 'cut.avi'}: the video ends at frame {read} of the 100 its header gives; sampled from those"]
    assert [f.index for f in frames] == np.linspace(0, read - 1, 8).round().astype(int).tolist()
    assert video.video_frames(tmp_path / "full.avi", 8, notes=notes) and len(notes) == 1     # whole: no note


def test_gif_frames_get_their_own_delays_as_times(tmp_path):
    ims = [Image.new("RGB", (64, 48), (60 * i, 0, 0)) for i in range(4)]
    ims[0].save(tmp_path / "v.gif", save_all=True, append_images=ims[1:], duration=[100, 1000, 100, 2000])
    assert [f.time_s for f in video.video_frames(tmp_path / "v.gif")] == [0.0, 0.1, 1.1, 1.2]
    assert [f.time_s for f in video.video_frames(_clip(tmp_path / "c.avi", 5))] == [0.0, 0.1, 0.2, 0.3, 0.4]


def test_many_videos_decode_only_their_share_of_max_frames(tmp_path, monkeypatch):
    decoded, real = [], video.video_frames

    def counted(*args, **kw):
        decoded.extend(got := real(*args, **kw))
        return got
    monkeypatch.setattr(video, "video_frames", counted)
    paths = [_clip(tmp_path / f"c{i}.avi", 20) for i in range(4)]
    frames, _ = video.load_frames(paths, max_frames=8)
    assert len(frames) == 8 and len(decoded) == 8                      # 2 per video, not 8 each


def test_frames_are_named_by_time_when_timed_else_by_number():
    assert frame_list([0.0, 0.25, 1.5], [0, 2]) == "frame(s) at 0.00 s, 1.50 s"
    assert frame_list([None, None, None], [0, 2]) == "frame(s) 1, 3"
    assert frame_list([0.0, 1.0, 0.0], [1]) == "frame(s) 2"                    # two videos: numbered as plotted


def test_korean_names_plot_without_a_warning_per_glyph_and_get_one_note():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fig = timeline_figure(np.array([[0.2, 0.8], [0.6, 0.4]]), ["행복", "슬픔"], times=[0.0, 0.5])
        fig.savefig(io.BytesIO(), format="png")
    assert not [w for w in caught if "Glyph" in str(w.message)]
    assert plot_font_note(["happy", "sad ü"]) == ""
    note = plot_font_note(["행복"])
    assert note == "" or note.startswith("Characters such as 행 복 show as boxes") and "fonts-noto-cjk" in note


def test_timeline_of_one_frame_is_singular_and_two_frames_start_at_zero():
    ax = timeline_figure(np.array([[0.2, 0.8]]), ["a", "b"], times=[0.0]).axes[0]
    assert "over 1 frame at 0 s" in ax.get_title()
    ax = timeline_figure(np.array([[0.2, 0.8], [0.6, 0.4]]), ["a", "b"], times=[0.0, 0.5]).axes[0]
    assert ax.get_xlim()[0] == 0.0 and "over 2 frames, 0-0.5 s" in ax.get_title()
