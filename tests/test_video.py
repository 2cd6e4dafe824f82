"""test.py on videos (PyAV) and animated GIF/WebP/PNG (Pillow): every frame translated, in
order, as an image would be; the frame count, size, frame rate or frame durations and
loop survive; frames are read, translated and written as a stream, within --max_memory
whatever the frame count and --batch_size; and a missing PyAV is one line saying what to
install."""
import argparse
import gc
import os
import sys
import weakref
from fractions import Fraction

import numpy as np
import pytest
import torch
from PIL import Image, ImageSequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from models import GeneratorResNet, to_image, to_tensor, translate  # noqa: E402
from conftest import live_tensor_bytes, run_translate as run_main, translate_script  # noqa: E402

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
    code, _, err = run_main(["--checkpoint", path, "--image_path", tmp_path / "talk.mp4",
                             "--output_dir", tmp_path / "out"], capsys)
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
    code, _, err = run_main(["--checkpoint", path, "--image_path", tmp_path / "in",
                             "--output_dir", tmp_path / "out"], capsys)
    assert code == 1 and "Traceback" not in err
    assert sum("cannot read" in line and "broken.mp4" in line for line in err.splitlines()) == 1
    assert (sorted(f for f in os.listdir(tmp_path / "out") if not f.startswith("."))
            == ["index.html", "inputs", "still.png"])


def test_without_pyav_a_video_is_one_line_saying_pip_install_av(ckpt, tmp_path, capsys, monkeypatch):
    path, _ = ckpt
    (tmp_path / "clip.mp4").write_bytes(b"not needed: PyAV is looked for first")
    monkeypatch.setitem(sys.modules, "av", None)  # import av raises ImportError
    code, _, err = run_main(["--checkpoint", path, "--image_path", tmp_path / "clip.mp4",
                             "--output_dir", tmp_path / "out"], capsys)
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
    (".png", {"loop": 2}, 2),  # APNG
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
    code, _, err = run_main(["--checkpoint", path, "--image_path", tmp_path / f"anim{ext}",
                             "--output_dir", tmp_path / "out", "--batch_size", 2], capsys)
    assert code == 0, err
    outputs, out_durations, out_loop, size = durations_and_loop(tmp_path / "out" / f"anim{ext}")
    assert (len(outputs), out_durations, out_loop, size) == (5, durations, loop, (30, 21))
    for out, a in zip(outputs, inputs):
        diff = np.abs(out - translated(G, a.astype(np.uint8)))
        if ext != ".gif":  # lossless: the translation itself (max 1: rounding between processes' kernels)
            assert diff.max() <= 1 and (diff > 0).mean() < 0.01
        else:  # GIF: 256 colours per frame
            assert diff.mean() < 6


def test_single_frame_gif_is_a_still_image(ckpt, tmp_path, capsys):
    path, G = ckpt
    a = random_frames(1, 16, 12)[0]
    Image.fromarray(a).save(tmp_path / "still.gif")
    code, _, err = run_main(["--checkpoint", path, "--image_path", tmp_path / "still.gif",
                             "--output_dir", tmp_path / "out"], capsys)
    assert code == 0, err
    assert os.path.exists(tmp_path / "out" / "still.png") and not os.path.exists(tmp_path / "out" / "still.gif")


def test_apng_still_default_image_is_not_a_frame(ckpt, tmp_path, capsys):
    path, G = ckpt
    still, *frames = [Image.fromarray(a) for a in random_frames(4, 30, 21, seed=4)]
    still.save(tmp_path / "anim.png", save_all=True, append_images=frames, duration=[50, 60, 70], default_image=True)
    code, _, err = run_main(["--checkpoint", path, "--image_path", tmp_path / "anim.png",
                             "--output_dir", tmp_path / "out"], capsys)
    assert code == 0, err
    outputs, durations, _, _ = durations_and_loop(tmp_path / "out" / "anim.png")
    assert len(outputs) == 3 and durations == [50, 60, 70]
    for out, a in zip(outputs, frames):
        assert np.abs(out - translated(G, np.asarray(a))).max() <= 1


# -----------------------------------------------------------------------------
# a stream, in bounded memory

def write_animation(path, frames, **kw):
    frames = [Image.fromarray(a) for a in frames]
    kw = {"lossless": True, **kw} if str(path).endswith(".webp") else kw
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=[40 + 10 * i for i in range(len(frames))],
                   **kw)


@pytest.mark.parametrize("ext", [".gif", ".webp", ".png"])
@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_streamed_animation_decodes_to_the_frames_pillows_save_all_writes_with_the_same_durations_and_loop(
        tmp_path, ext, mode):
    # what test.py wrote before it streamed: save_all of every translated frame at once
    frames = [Image.fromarray(a).convert(mode) for a in random_frames(5, 30, 21, seed=5)]
    durations, kw = [40, 80, 120, 60, 100], {"lossless": True} if ext == ".webp" else {}
    frames[0].save(tmp_path / f"all{ext}", save_all=True, append_images=frames[1:], duration=durations, loop=3, **kw)
    writer = {".gif": tt.GifWriter, ".webp": tt.WebPWriter, ".png": tt.PngWriter}[ext]
    with open(tmp_path / f"stream{ext}", "wb") as f:
        w = writer(f, len(frames), 3)
        for frame, d in zip(frames, durations):
            w.add(frame, d)
        w.close()
    expected, streamed = durations_and_loop(tmp_path / f"all{ext}"), durations_and_loop(tmp_path / f"stream{ext}")
    assert streamed[1:] == expected[1:] == (durations, 3, (30, 21))
    assert len(streamed[0]) == len(expected[0]) == 5
    for a, b in zip(streamed[0], expected[0]):
        assert np.array_equal(a, b)  # the same integer quantization and lossless coding: exact


def test_a_gif_without_a_loop_entry_is_streamed_without_one(tmp_path):
    with open(tmp_path / "once.gif", "wb") as f:
        w = tt.GifWriter(f, 2, None)
        for a in random_frames(2, 16, 12):
            w.add(Image.fromarray(a), 50)
        w.close()
    frames, durations, loop, _ = durations_and_loop(tmp_path / "once.gif")
    assert len(frames) == 2 and durations == [50, 50] and loop is None


@pytest.fixture
def live_images(monkeypatch):
    """How many PIL images are alive: every image counts from when it is made until it is freed."""
    alive = {}
    init = Image.Image.__init__

    def counted(self, *args, **kwargs):
        init(self, *args, **kwargs)
        alive[id(self)] = True
        weakref.finalize(self, alive.pop, id(self), None)

    monkeypatch.setattr(Image.Image, "__init__", counted)
    return alive


@pytest.mark.parametrize("ext", [".gif", ".webp", ".png", ".mkv"])
def test_frames_are_read_translated_and_written_as_a_stream_as_many_images_alive_for_16_frames_as_for_4(
        ckpt, tmp_path, capsys, monkeypatch, live_images, ext):
    if ext == ".mkv":
        av = pytest.importorskip("av", reason=AV_REASON)
        if "ffv1" not in av.codecs_available:
            pytest.skip("this PyAV build has no ffv1 encoder")
    path, _ = ckpt
    translate, alive = tt.translate, []

    def counting(*args, **kwargs):  # each batch: how many decoded or translated frames are held now
        gc.collect()
        alive.append(len(live_images))
        return translate(*args, **kwargs)

    monkeypatch.setattr(tt, "translate", counting)
    most = []
    for n in (4, 16):
        frames = random_frames(n, 24, 16, seed=n)
        if ext == ".mkv":
            write_clip(tmp_path / f"clip{n}{ext}", frames, Fraction(10), "ffv1", "bgr0")
        else:
            write_animation(tmp_path / f"clip{n}{ext}", frames, loop=0)
        alive.clear()
        code, _, err = run_main(["--checkpoint", path, "--image_path", tmp_path / f"clip{n}{ext}", "--output_dir",
                                 tmp_path / "out", "--batch_size", 2], capsys)
        assert code == 0, err
        assert len(alive) == n // 2  # batches of 2
        most.append(max(alive))
    # held all at once, 16 frames would be 12 more than 4; a stream holds a batch, the one
    # before it being written, and the decoder's own canvas
    assert most[1] == most[0] <= 8, most


def bounded_and_unbounded_runs(G, path, clip, tmp_path, capsys, monkeypatch, budget, batch_size):
    """Run test.py on clip with --max_memory budget (bytes) and with the default: the peak of
    the tensor bytes alive at once while translating each, and the output files."""
    translate_animation, peaks = tt.translate_animation, []

    def measured(*args):
        with live_tensor_bytes() as m:
            n = translate_animation(*args)
        peaks.append(m.peak)
        return n

    monkeypatch.setattr(tt, "translate_animation", measured)
    outs = []
    for name, flags in (("bounded", ["--max_memory", f"{budget}B"]), ("default", [])):
        code, _, err = run_main(["--checkpoint", path, "--image_path", clip, "--output_dir", tmp_path / name,
                                 "--batch_size", batch_size, *flags], capsys)
        assert code == 0, err
        outs.append(durations_and_loop(tmp_path / name / os.path.basename(clip))[0])
    return peaks, outs


@pytest.mark.parametrize("fraction, plan", [(1.2, "one frame at a time"), (0.6, "in strips")])
def test_frames_stay_within_a_max_memory_that_batch_size_12_would_exceed_several_times(ckpt, tmp_path, capsys,
                                                                                        monkeypatch, fraction, plan):
    path, G = ckpt
    inputs = random_frames(12, 40, 32, seed=6)
    write_animation(tmp_path / "clip.webp", inputs, loop=0)
    budget = int(fraction * tt.memory_needed(G, 3, 32, 40))  # what one frame takes in one piece, times fraction
    batch, rows = tt.plan(G, 3, 32, 40, argparse.Namespace(max_memory=budget, tile=None, batch_size=12,
                                                              shift_average=False))
    assert (batch, rows is not None) == {"one frame at a time": (1, False), "in strips": (1, True)}[plan]
    assert batch * tt.memory_needed(G, 3, 32, 40, rows) <= budget  # the plan's own count
    peaks, (bounded, default) = bounded_and_unbounded_runs(G, path, tmp_path / "clip.webp", tmp_path, capsys,
                                                           monkeypatch, budget, 12)
    # measured: the tensors alive at once, within the budget; all 12 frames at once, several times it
    assert peaks[0] <= budget and peaks[1] > 3 * budget, (peaks, budget)
    assert len(bounded) == len(default) == 12
    for b, d, a in zip(bounded, default, inputs):  # other batches or strips: float rounding only
        assert np.abs(b - d).max() <= 1 and (b != d).mean() < 0.01
        assert np.abs(b - translated(G, a)).max() <= 1
