"""export.py: ONNX (run with onnxruntime) and torch.export (.pt2) generators must
translate like the PyTorch generator, through test.py's own padding and cropping, at
sizes other than the one they were traced with. Tiny generators (one residual block)."""
import json
import os

import numpy as np
import pytest
import torch

ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed: pip install onnxruntime")
onnx = pytest.importorskip("onnx", reason="onnx is not installed: pip install onnx onnxscript")
pytest.importorskip("onnxscript", reason="onnxscript is not installed: pip install onnx onnxscript")

import export  # noqa: E402
from conftest import make_generator  # noqa: E402
from models import Discriminator, to_image, to_tensor, translate  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (width, height): odd and non-square, so test.py pads (to 40 x 24, 20 x 48) and crops
SIZES = [(37, 22), (17, 45)]
KEYS = {"input", "size", "padding", "output", "architecture", "source"}


def image(w, h, channels=3, seed=0):
    rng = np.random.RandomState(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    a = np.stack([xx * 255 // (w - 1), yy * 255 // (h - 1), (xx * yy) % 256], -1) + rng.randint(-30, 31, (h, w, 3))
    from PIL import Image
    img = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
    return img if channels == 3 else img.convert("L")


def run_export(argv, capsys):
    """export.main in-process: (exit code, stdout, stderr); any exception but SystemExit fails the test."""
    try:
        export.main([str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def compare(G, run, channels=3):
    """Largest difference, in [0, 1] image units, between test.py's translation with
    the PyTorch generator and with `run`, over SIZES; also the 8-bit images."""
    worst = 0.0
    for k, (w, h) in enumerate(SIZES):
        x = to_tensor(image(w, h, channels, seed=k))
        y_ref, y = translate(G, x), translate(run, x)
        assert y.shape == y_ref.shape == (1, channels, h, w)
        worst = max(worst, ((y - y_ref).abs().max() / 2).item())  # [-1, 1] -> [0, 1]
        a, b = np.asarray(to_image(y), dtype=int), np.asarray(to_image(y_ref), dtype=int)
        assert np.abs(a - b).max() <= 1
    return worst



@pytest.fixture(scope="module", params=["seed", "official", "antialiased", "canonical"])
def exported(request, tmp_path_factory):
    """(arch, G, checkpoint, the .onnx file) for each architecture, exported once."""
    d = tmp_path_factory.mktemp(f"export_{request.param}")
    G = make_generator(official=request.param == "official", ngf=16, n_blocks=1,
                       antialias=request.param == "antialiased", canonical_shift=request.param == "canonical")
    ckpt = d / ("latest_net_G.pth" if request.param == "official" else "G_AB_3.pth")
    torch.save(G.state_dict(), ckpt)
    export.main(["--checkpoint", str(ckpt), "--format", "onnx", "--output", str(d / "g.onnx")])
    return request.param, G, ckpt, d / "g.onnx"


# -----------------------------------------------------------------------------


def test_onnx_translates_odd_sizes_like_pytorch_through_test_py_padding(exported):
    arch, G, _, path = exported
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def run(xp):
        return torch.from_numpy(session.run(None, {"image": xp.numpy()})[0])

    worst = compare(G, run)
    print(f"{arch}: onnxruntime vs PyTorch, max difference {worst:.2e} of the [0, 1] range")
    assert worst <= 1 / 255


def test_onnx_has_dynamic_batch_height_width(exported):
    _, G, _, path = exported
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    shape = session.get_inputs()[0].shape
    assert shape[1] == 3 and all(isinstance(s, str) for s in (shape[0], shape[2], shape[3])), shape
    x = torch.rand(3, 3, 12, 28) * 2 - 1  # neither the traced batch nor its size
    y = torch.from_numpy(session.run(None, {"image": x.numpy()})[0])
    with torch.no_grad():
        torch.testing.assert_close(y, G(x), atol=2e-4, rtol=0)


def test_onnx_metadata_states_input_range_padding_and_output_mapping(exported):
    arch, _, ckpt, path = exported
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert KEYS <= set(meta), meta
    assert "[-1, 1]" in meta["input"] and "NCHW" in meta["input"] and "RGB" in meta["input"]
    assert "multiples of 4" in meta["size"]
    assert "reflection" in meta["padding"] and "crop" in meta["padding"]
    assert "(y + 1) / 2" in meta["output"] and "clipped to [-1, 1]" in meta["output"]
    if arch == "antialiased":  # the seed's layout, with both blurs
        assert meta["architecture"].startswith("seed ResNet generator (--antialias --antialias_up)")
    elif arch == "canonical":
        assert meta["architecture"].startswith("seed ResNet generator (--canonical_shift)")
    else:
        assert meta["architecture"].startswith(arch) and "--antialias" not in meta["architecture"]
    assert "1 residual block" in meta["architecture"]
    assert meta["source"] == ckpt.name


def test_pt2_loads_with_torch_export_and_translates_like_pytorch(exported, tmp_path, capsys):
    arch, G, ckpt, _ = exported
    out = tmp_path / "g.pt2"
    code, stdout, err = run_export(["--checkpoint", ckpt, "--format", "pt2", "--output", out], capsys)
    assert code == 0, err
    extra = {"cyclegan.json": ""}
    program = torch.export.load(str(out), extra_files=extra)
    module = program.module()
    worst = compare(G, lambda xp: module(xp))
    print(f"{arch}: torch.export program vs eager, max difference {worst:.2e}")
    assert worst <= 1 / 255
    meta = json.loads(extra["cyclegan.json"])
    assert KEYS <= set(meta) and "(y + 1) / 2" in meta["output"]


def test_last_pt_with_generator_exports_that_generator_grayscale(tmp_path, capsys):
    G_AB, G_BA = make_generator(1, seed=1), make_generator(1, seed=2)
    ckpt = tmp_path / "last.pt"
    torch.save({"G_AB": G_AB.state_dict(), "G_BA": G_BA.state_dict(), "epoch": 2}, ckpt)
    code, _, err = run_export(["--checkpoint", ckpt, "--format", "onnx", "--output", tmp_path / "g.onnx"], capsys)
    assert code == 2 and err.count("\n") == 1 and "--generator G_AB" in err
    assert not (tmp_path / "g.onnx").exists()

    code, out, err = run_export(["--checkpoint", ckpt, "--generator", "G_BA", "--format", "onnx"], capsys)
    assert code == 0, err
    path = tmp_path / "last_G_BA.onnx"  # the default name
    assert str(path) in out
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    run = lambda xp: torch.from_numpy(session.run(None, {"image": xp.numpy()})[0])  # noqa: E731
    assert compare(G_BA, run, channels=1) <= 1 / 255
    x = to_tensor(image(37, 22, 1))
    assert (translate(G_AB, x) - translate(run, x)).abs().max() > 0.05  # not the other one
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert "grayscale" in meta["input"] and meta["source"] == "last.pt [G_BA]"


@pytest.mark.parametrize("bad", ["missing", "text", "discriminator"])
def test_bad_checkpoint_is_one_line_and_writes_nothing(bad, tmp_path, capsys):
    ckpt = tmp_path / "G_AB_1.pth"
    if bad == "text":
        ckpt.write_text("not a checkpoint\n")
    elif bad == "discriminator":
        torch.save(Discriminator((3, 32, 32)).state_dict(), ckpt)
    code, out, err = run_export(["--checkpoint", ckpt, "--output", tmp_path / "g.onnx"], capsys)
    assert code == 2 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1 and str(ckpt) in err
    assert sorted(os.listdir(tmp_path)) == ([] if bad == "missing" else ["G_AB_1.pth"])


def test_missing_output_folder_and_missing_onnxscript_are_one_line(tmp_path, capsys, monkeypatch):
    ckpt = tmp_path / "G_AB_1.pth"
    torch.save(make_generator().state_dict(), ckpt)
    code, _, err = run_export(["--checkpoint", ckpt, "--output", tmp_path / "nope" / "g.onnx"], capsys)
    assert code == 2 and err.count("\n") == 1 and "does not exist" in err

    monkeypatch.setitem(__import__("sys").modules, "onnxscript", None)  # `import onnxscript` now raises ImportError
    code, _, err = run_export(["--checkpoint", ckpt, "--output", tmp_path / "g.onnx"], capsys)
    assert code == 2 and err == ("error: --format onnx needs the onnx and onnxscript packages: "
                                 "pip install onnx onnxscript\n")
    assert sorted(os.listdir(tmp_path)) == ["G_AB_1.pth"]
