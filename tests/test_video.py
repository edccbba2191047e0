"""Video output: write with PyAV, read back, compare.

H.264 in yuv420p is lossy twice over (RGB -> limited-range YUV with half-resolution chroma, then
the encoder), so pixel checks use tolerances measured on these clips (0..255 scale):
flat colours come back within 2 levels; the smooth moving pattern has a mean absolute error of
about 1.6 at crf 19 (checked <= 3) and 1.4 at crf 0.
"""

from __future__ import annotations

import os

import pytest
import torch

import wan_core.video as video
from wan_core.video import frames_to_uint8, frames_to_wan, read_video, wan_to_frames, write_video


def _smooth(t: int = 9, h: int = 48, w: int = 64) -> torch.Tensor:
    """A slowly varying colour pattern drifting over time: [T, H, W, 3] in [0, 1]."""
    tt = torch.arange(t).view(t, 1, 1, 1).float()
    y = torch.arange(h).view(1, h, 1, 1).float()
    x = torch.arange(w).view(1, 1, w, 1).float()
    c = torch.tensor([0.0, 1.0, 2.0]).view(1, 1, 1, 3)
    return 0.5 + 0.3 * torch.sin(x / 20 + tt / 4 + c) * torch.cos(y / 25 - c / 3)


def _mae(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().mean().item()


def test_round_trip_comfy_layout(tmp_path):
    frames = _smooth()
    assert write_video(tmp_path / "a.mp4", frames) == "libx264"  # PyAV wheels bundle x264
    got, fps = read_video(tmp_path / "a.mp4")
    assert got.dtype == torch.uint8 and got.shape == (9, 48, 64, 3)
    assert fps == 16.0
    assert _mae(got, frames_to_uint8(frames)) <= 3.0
    # each frame comes back in its own place (the pattern moves, so a shifted order would not match)
    per_frame = [[_mae(got[i], frames_to_uint8(frames)[j]) for j in range(9)] for i in range(9)]
    assert all(min(range(9), key=row.__getitem__) == i for i, row in enumerate(per_frame))


@pytest.mark.parametrize("rgb", [(0.5, 0.5, 0.5), (0.8, 0.0, 0.0), (0.1, 0.6, 0.9)])
def test_flat_colour_within_two_levels(tmp_path, rgb):
    frames = torch.tensor(rgb).expand(3, 32, 32, 3)
    write_video(tmp_path / "c.mp4", frames)
    got, _ = read_video(tmp_path / "c.mp4")
    assert (got.int() - frames_to_uint8(frames).int()).abs().max() <= 2


def test_wan_layout_and_conversions(tmp_path):
    frames = _smooth()
    wan = frames_to_wan(frames)
    assert wan.shape == (3, 9, 48, 64) and wan.min() >= -1 and wan.max() <= 1
    assert torch.allclose(wan_to_frames(wan), frames, atol=1e-6)
    assert torch.allclose(wan_to_frames(wan[None]), frames, atol=1e-6)  # VAE output with batch 1
    assert torch.equal(wan_to_frames(torch.full((3, 1, 2, 2), 7.0)), torch.ones(1, 2, 2, 3))  # clamped
    write_video(tmp_path / "comfy.mp4", frames)
    write_video(tmp_path / "wan.mp4", wan)
    assert torch.equal(read_video(tmp_path / "comfy.mp4")[0], read_video(tmp_path / "wan.mp4")[0])
    # uint8 rounding, not truncation
    assert frames_to_uint8(torch.full((1, 1, 1, 3), 0.999)).tolist() == [[[[255, 255, 255]]]]


def test_fps_and_quality(tmp_path):
    frames = _smooth()
    write_video(tmp_path / "24.mp4", frames, fps=24)
    assert read_video(tmp_path / "24.mp4")[1] == 24.0
    write_video(tmp_path / "ntsc.mp4", frames, fps=30000 / 1001)
    assert read_video(tmp_path / "ntsc.mp4")[1] == pytest.approx(30000 / 1001)

    ref = frames_to_uint8(frames)
    errs, sizes = [], []
    for crf in (0, 40):
        write_video(tmp_path / f"q{crf}.mp4", frames, crf=crf)
        errs.append(_mae(read_video(tmp_path / f"q{crf}.mp4")[0], ref))
        sizes.append((tmp_path / f"q{crf}.mp4").stat().st_size)
    assert errs[0] < errs[1] and sizes[0] > sizes[1]


def test_odd_sizes(tmp_path):
    frames = _smooth(t=3, h=25, w=33)
    write_video(tmp_path / "pad.mp4", frames)
    got, _ = read_video(tmp_path / "pad.mp4")
    assert got.shape == (3, 26, 34, 3)
    assert _mae(got[:, :25, :33], frames_to_uint8(frames)) <= 3.0
    write_video(tmp_path / "crop.mp4", frames, odd_size="crop")
    assert read_video(tmp_path / "crop.mp4")[0].shape == (3, 24, 32, 3)
    with pytest.raises(ValueError, match="33x25 is odd"):
        write_video(tmp_path / "err.mp4", frames, odd_size="error")


def test_mpeg4_fallback(tmp_path, monkeypatch):
    frames = _smooth(t=4)
    assert write_video(tmp_path / "m.mp4", frames, codec="mpeg4") == "mpeg4"
    got, fps = read_video(tmp_path / "m.mp4")
    assert got.shape == (4, 48, 64, 3) and fps == 16.0 and _mae(got, frames_to_uint8(frames)) <= 4.0

    monkeypatch.setattr(video, "_H264", ("no_such_h264_encoder",))
    assert video.available_codec() == "mpeg4"
    with pytest.warns(UserWarning, match="no libx264"):
        assert write_video(tmp_path / "f.mp4", frames) == "mpeg4"


def test_bad_inputs(tmp_path):
    out = tmp_path / "x.mp4"
    with pytest.raises(ValueError, match=r"\[T, H, W, 3\]"):
        write_video(out, torch.rand(4, 16, 16))
    # [3, T, H, 3] fits both layouts: ComfyUI's unless told otherwise
    write_video(out, torch.rand(3, 4, 16, 3))
    assert read_video(out)[0].shape == (3, 4, 16, 3)
    write_video(out, torch.rand(3, 4, 16, 3) * 2 - 1, layout="wan")  # 4 frames 16 x 3, padded to 16 x 4
    assert read_video(out)[0].shape == (4, 16, 4, 3)
    with pytest.raises(ValueError, match="layout must be"):
        write_video(out, torch.rand(2, 16, 16, 3), layout="nchw")
    with pytest.raises(ValueError, match="NaN"):
        write_video(out, torch.full((2, 16, 16, 3), float("nan")))
    with pytest.raises(ValueError, match="nothing to write"):
        write_video(out, torch.rand(0, 16, 16, 3))
    with pytest.raises(ValueError, match="must be float"):
        write_video(out, torch.ones(2, 16, 16, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match="fps must be positive"):
        write_video(out, torch.rand(2, 16, 16, 3), fps=0)
    with pytest.raises(ValueError, match="crf must be an integer in 0..51"):
        write_video(out, torch.rand(2, 16, 16, 3), crf=60)
    with pytest.raises(ValueError, match="x264 preset must be one of ultrafast, .*, placebo; got 'fastest'"):
        write_video(out, torch.rand(2, 16, 16, 3), preset="fastest")
    with pytest.raises(ValueError, match="odd_size must be"):
        write_video(out, torch.rand(2, 16, 16, 3), odd_size="stretch")
    with pytest.raises(ValueError, match="not available"):
        write_video(out, torch.rand(2, 16, 16, 3), codec="no_such_encoder")
    with pytest.raises(ValueError, match=r"Wan video \[3, T, H, W\]"):
        wan_to_frames(torch.rand(4, 2, 8, 8))

    with pytest.raises(FileNotFoundError, match="not found"):
        read_video(tmp_path / "missing.mp4")
    (tmp_path / "junk.mp4").write_bytes(b"this is not a video")
    with pytest.raises(ValueError, match="not a readable video"):
        read_video(tmp_path / "junk.mp4")


def test_chunked_background_writer_equals_one_shot(tmp_path):
    """The writer the pipeline feeds while the VAE decodes: chunks on a worker thread give the
    same video as one `write_video` call (x264 is deterministic for the same frames)."""
    from wan_core.video import VideoWriter

    frames = _smooth(t=13)
    write_video(tmp_path / "one.mp4", frames)
    with VideoWriter(tmp_path / "chunks.mp4", layout="wan", background=True) as w:
        wan = frames_to_wan(frames)  # [3, T, H, W] in [-1, 1], as the VAE hands it over
        for sl in (slice(0, 1), slice(1, 5), slice(5, 9), slice(9, 13)):
            w.write(wan[:, sl])
    one, _ = read_video(tmp_path / "one.mp4")
    chunks, fps = read_video(tmp_path / "chunks.mp4")
    assert fps == 16 and torch.equal(one, chunks)


def test_writer_errors_leave_no_partial_file_and_keep_an_old_one(tmp_path):
    from wan_core.video import VideoWriter

    out = tmp_path / "v.mp4"
    write_video(out, _smooth(t=3))
    before = out.read_bytes()
    # a bad first chunk: refused before anything is opened, the existing file is untouched
    with pytest.raises(ValueError, match="layout must be"):
        write_video(out, torch.rand(2, 16, 16, 3), layout="nchw")
    assert out.read_bytes() == before
    # a NaN chunk found by the worker thread: raised at close, the partial file removed
    w = VideoWriter(out, background=True)
    w.write(_smooth(t=2))
    w.write(torch.full((2, 48, 64, 3), float("nan")))
    with pytest.raises(ValueError, match="NaN"):
        w.close()
    # the partial file (written under a temporary name beside it) is removed; the old video stays
    assert out.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["v.mp4"]
    # chunks of different sizes; a writer given nothing
    w = VideoWriter(out)
    w.write(_smooth(t=2))
    with pytest.raises(ValueError, match="64x48"):
        w.write(_smooth(t=2, h=32))
    w.abort()
    assert out.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["v.mp4"]
    os.remove(out)
    w = VideoWriter(out)  # a new file: nothing at all is left
    w.write(_smooth(t=2))
    w.abort()
    assert os.listdir(tmp_path) == []
    with pytest.raises(ValueError, match="no frames"):
        VideoWriter(out).close()
