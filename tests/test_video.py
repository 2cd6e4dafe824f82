"""test.py on videos (PyAV) and animated GIF/WebP (Pillow): every frame translated, in
order, as an image would be; the frame count, size, frame rate or frame durations and
loop survive; and a missing PyAV is one line saying what to install."""
import os
import sys
from fractions import Fraction

import numpy as np
import pytest
import torch
from PIL import Image, ImageSequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from models import GeneratorResNet, to_image, to_tensor, translate  # noqa: E402
from conftest import run_translate as run_main, translate_script  # noqa: E402

tt = translate_script()

AV_REASON = "PyAV is not installed (pip install av)"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        G = GeneratorResNet((3, 0, 0), 1).eval()
    path = tmp_path_factory.mktemp("g") / "G_AB_1.pth"
    torch.save(G.state_dict(), path)
    return str(path), G



def random_frames(n, w, h, seed=0):
    """Frames that differ from each other a lot (so a swapped frame shows) and have
    some smooth structure (so a lossy codec keeps them recognisable)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    frames = []
    for i in range(n):
        base = np.stack([(xx * 9 + i * 40) % 256, (yy * 11 + i * 70) % 256, ((xx + yy) * 5 + i * 25) % 256], -1)
        frames.append(np.clip(base + rng.integers(-20, 21, (h, w, 3)), 0, 255).astype(np.uint8))
    return frames


def translated(G, a):
    """test.py's translate() of one decoded frame (H, W, 3 uint8), as uint8."""
    with torch.no_grad():
        return np.asarray(to_image(translate(G, to_tensor(Image.fromarray(a))))).astype(int)


def blocks(a):
    h, w = a.shape[0] // 4 * 4, a.shape[1] // 4 * 4
    return a[:h, :w].astype(float).reshape(h // 4, 4, w // 4, 4, -1).mean((1, 3))


def decode(path):
    import av
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(s)]
        return frames, s.average_rate, (s.codec_context.width, s.codec_context.height), s.codec_context.name


def write_clip(path, frames, rate, codec, pix_fmt):
    import av
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=rate)
        s.height, s.width = frames[0].shape[:2]
        s.pix_fmt = pix_fmt
        for i, a in enumerate(frames):
            f = av.VideoFrame.from_ndarray(a, format="rgb24")
            f.pts = i
            c.mux(s.encode(f))
        c.mux(s.encode(None))


# -----------------------------------------------------------------------------
# videos

@pytest.mark.parametrize("name, codec, pix_fmt, size", [
    ("clip.mkv", "ffv1", "bgr0", (47, 33)),      # lossless input, odd size
    ("clip.mp4", "libx264", "yuv420p", (48, 40)),
])
def test_video_every_frame_translated_in_order_with_same_count_size_and_frame_rate(ckpt, tmp_path, capsys, name, codec,
                                                                                   pix_fmt, size):
    av = pytest.importorskip("av", reason=AV_REASON)
    if codec not in av.codecs_available:
        pytest.skip(f"this PyAV build has no {codec} encoder")
    path, G = ckpt
    write_clip(tmp_path / name, random_frames(12, *size), Fraction(10), codec, pix_fmt)
    inputs, rate, in_size, _ = decode(tmp_path / name)
    assert len(inputs) == 12 and in_size == size and rate == 10
    code, _, err = run_main(["--checkpoint", path, "--image_path", tmp_path / name, "--output_dir", tmp_path / "out",
                             "--batch_size", 5], capsys)  # batches of 5, 5, 2
    assert code == 0, err
    assert sorted(os.listdir(tmp_path / "out")) == ["clip.mp4", "index.html", "inputs"]  # no partial file left
    outputs, rate, out_size, _ = decode(tmp_path / "out" / "clip.mp4")
    assert len(outputs) == 12 and out_size == size and rate == 10
    # H.264 (lossy, colour at half resolution) keeps each frame's 4x4 block averages:
    # within a few levels (~2.5) of the frame's own translation, 25 or more from any other.
    expected = [blocks(translated(G, a)) for a in inputs]
    for i, out in enumerate(outputs):
        errors = [np.abs(blocks(out) - e).mean() for e in expected]
        assert errors[i] < 6, (i, errors)
        assert int(np.argmin(errors)) == i and sorted(errors)[1] > 3 * errors[i]


def test_video_with_audio_is_translated_with_a_note_that_audio_is_dropped(ckpt, tmp_path, capsys):
    av = pytest.importorskip("av", reason=AV_REASON)
    path, _ = ckpt
    with av.open(str(tmp_path / "talk.mp4"), "w") as c:
        v = c.add_stream("libx264" if "libx264" in av.codecs_available else "mpeg4", rate=10)
        v.width, v.height, v.pix_fmt = 32, 24, "yuv420p"
        a = c.add_stream("aac", rate=16000)
        for i, frame in enumerate(random_frames(5, 32, 24)):
            f = av.VideoFrame.from_ndarray(frame, format="rgb24")
            f.pts = i
            c.mux(v.encode(f))
        for i in range(8):
            af = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            af.sample_rate, af.pts = 16000, i * 1024
            c.mux(a.encode(af))
        c.mux(v.encode(None))
        c.mux(a.encode(None))
    code, _, err = run_main(["--checkpoint", path, "--image_path", tmp_path / "talk.mp4", "--output_dir", tmp_path / "out"], capsys)
    assert code == 0, err
    assert any("audio" in line and "talk.mp4" in line for line in err.splitlines())
    with av.open(str(tmp_path / "out" / "talk.mp4")) as c:
        assert len(c.streams.video) == 1 and len(c.streams.audio) == 0
        assert len(list(c.decode(c.streams.video[0]))) == 5


def test_unreadable_video_is_named_and_skipped_the_rest_translated(ckpt, tmp_path, capsys):
    pytest.importorskip("av", reason=AV_REASON)
    path, _ = ckpt
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 this is not a video")
    Image.fromarray(random_frames(1, 12, 8)[0]).save(tmp_path / "in" / "still.png")
    code, _, err = run_main(["--checkpoint", path, "--image_path", tmp_path / "in", "--output_dir", tmp_path / "out"], capsys)
    assert code == 1 and "Traceback" not in err
    assert sum("cannot read" in line and "broken.mp4" in line for line in err.splitlines()) == 1
    assert sorted(f for f in os.listdir(tmp_path / "out") if not f.startswith(".")) == ["index.html", "inputs", "still.png"]


def test_without_pyav_a_video_is_one_line_saying_pip_install_av(ckpt, tmp_path, capsys, monkeypatch):
    path, _ = ckpt
    (tmp_path / "clip.mp4").write_bytes(b"not needed: PyAV is looked for first")
    monkeypatch.setitem(sys.modules, "av", None)  # import av raises ImportError
    code, _, err = run_main(["--checkpoint", path, "--image_path", tmp_path / "clip.mp4", "--output_dir", tmp_path / "out"], capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "pip install av" in lines[0]


# -----------------------------------------------------------------------------
# animated GIF and WebP

def durations_and_loop(path):
    with Image.open(path) as im:
        frames, durations = [], []
        for f in ImageSequence.Iterator(im):
            f.load()
            durations.append(f.info.get("duration"))
            frames.append(np.asarray(f.convert("RGB")).astype(int))
        return frames, durations, im.info.get("loop"), im.size


@pytest.mark.parametrize("ext, save_kw, loop", [
    (".webp", {"lossless": True, "loop": 3}, 3),
    (".gif", {"loop": 0}, 0),
    (".gif", {}, None),  # no loop entry: played once, and still so after translation
])
def test_animation_keeps_frame_count_size_durations_and_loop_and_translates_each_frame(ckpt, tmp_path, capsys, ext,
                                                                                      save_kw, loop):
    path, G = ckpt
    frames = [Image.fromarray(a) for a in random_frames(5, 30, 21, seed=2)]
    durations = [40, 80, 120, 60, 100]
    frames[0].save(tmp_path / f"anim{ext}", save_all=True, append_images=frames[1:], duration=durations, **save_kw)
    inputs, in_durations, in_loop, _ = durations_and_loop(tmp_path / f"anim{ext}")
    assert in_durations == durations and in_loop == loop
    code, _, err = run_main(["--checkpoint", path, "--image_path", tmp_path / f"anim{ext}", "--output_dir", tmp_path / "out",
                             "--batch_size", 2], capsys)
    assert code == 0, err
    outputs, out_durations, out_loop, size = durations_and_loop(tmp_path / "out" / f"anim{ext}")
    assert (len(outputs), out_durations, out_loop, size) == (5, durations, loop, (30, 21))
    for out, a in zip(outputs, inputs):
        diff = np.abs(out - translated(G, a.astype(np.uint8)))
        if ext == ".webp":  # lossless: the translation itself (max 1: rounding between processes' kernels)
            assert diff.max() <= 1 and (diff > 0).mean() < 0.01
        else:  # GIF: 256 colours per frame
            assert diff.mean() < 6


def test_single_frame_gif_is_a_still_image(ckpt, tmp_path, capsys):
    path, G = ckpt
    a = random_frames(1, 16, 12)[0]
    Image.fromarray(a).save(tmp_path / "still.gif")
    code, _, err = run_main(["--checkpoint", path, "--image_path", tmp_path / "still.gif", "--output_dir", tmp_path / "out"], capsys)
    assert code == 0, err
    assert os.path.exists(tmp_path / "out" / "still.png") and not os.path.exists(tmp_path / "out" / "still.gif")
