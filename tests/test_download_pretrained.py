"""saved_models/download_pretrained_model.sh: the official pretrained generators.

No real network: CYCLEGAN_MODEL_URLS points the script at http servers bound to
127.0.0.1, serving tiny generators saved in the official layout
(models.OfficialGenerator with 4 filters and 1 residual block, ~140 KB). Each test
copies the script into a fresh tmp_path/repo/saved_models/ next to links to the
repository's modules, so the repository's own saved_models/ is never touched.
"""
import http.server
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import needs_curl, run_cli
from models import Discriminator, GeneratorResNet, OfficialGenerator

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "saved_models" / "download_pretrained_model.sh"
LIB = REPO / "scripts" / "download.sh"  # the helpers it shares with the dataset script
NAME = "horse2zebra"
DEST = f"saved_models/{NAME}_pretrained/latest_net_G.pth"

# The official script's list (junyanz/pytorch-CycleGAN-and-pix2pix, scripts/download_cyclegan_model.sh).
OFFICIAL_NAMES = (
    "apple2orange orange2apple summer2winter_yosemite winter2summer_yosemite horse2zebra zebra2horse "
    "monet2photo style_monet style_cezanne style_ukiyoe style_vangogh sat2map map2sat cityscapes_photo2label "
    "cityscapes_label2photo facades_photo2label facades_label2photo iphone2dslr_flower"
).split()


def _shell(name):
    return pytest.param(name, id=name,
                        marks=pytest.mark.skipif(shutil.which(name) is None, reason=f"{name} not installed"))


SHELLS = [_shell("dash"), _shell("bash")]


# --------------------------------------------------------------------------- helpers


def tensor_file(obj, path):
    torch.save(obj, str(path))
    return Path(path).read_bytes()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The bytes of a good official-layout generator and of files that must be rejected."""
    d = tmp_path_factory.mktemp("served_models")
    torch.manual_seed(0)
    good = OfficialGenerator(3, 3, 4, 1)
    nan = OfficialGenerator(3, 3, 4, 1)
    with torch.no_grad():
        nan.model[1].weight.fill_(float("nan"))
    good_bytes = tensor_file(good.state_dict(), d / "good.pth")
    return {
        "good": good_bytes,
        "bad": {
            "html_page": b"<html><body><h1>503 Service Unavailable</h1></body></html>\n" * 20,
            "discriminator": tensor_file(Discriminator((3, 32, 32)).state_dict(), d / "d.pth"),
            "seed_layout": tensor_file(GeneratorResNet((3, 0, 0), 1).state_dict(), d / "seed.pth"),
            "pickled_module": tensor_file(good, d / "module.pth"),  # needs code to unpickle: refused
            "nan_weights": tensor_file(nan.state_dict(), d / "nan.pth"),
        },
    }


@pytest.fixture
def repo(tmp_path):
    r = tmp_path / "repo"
    (r / "saved_models").mkdir(parents=True)
    shutil.copy2(SCRIPT, r / "saved_models" / SCRIPT.name)
    (r / "scripts").mkdir()
    shutil.copy2(LIB, r / "scripts" / LIB.name)
    for f in REPO.glob("*.py"):  # models.py and utils.py check the download; test.py translates
        (r / f.name).symlink_to(f)
    return r


def clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env.pop("CYCLEGAN_MODEL_URLS", None)
    env.update(no_proxy="127.0.0.1,localhost", NO_PROXY="127.0.0.1,localhost", PYTHON=sys.executable,
               OMP_NUM_THREADS="1")
    env.update(extra)
    return env


def run_script(shell, repo, *args, env, from_saved_models=False, timeout=120):
    cwd, script = (repo / "saved_models", SCRIPT.name) if from_saved_models else (repo, f"saved_models/{SCRIPT.name}")
    return subprocess.run([shutil.which(shell), script, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def assert_nothing_left(repo):
    assert sorted(p.name for p in (repo / "saved_models").iterdir()) == [SCRIPT.name]


class Server:
    """http server on 127.0.0.1 serving {path: bytes}; 404 for anything else; with
    stall=True it sends half of the body and waits."""

    def __init__(self, routes, stall=False):
        self.requests, self.release = [], threading.Event()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                server.requests.append(self.path)
                body = routes.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if stall:
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    server.release.wait(30)
                    return
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def close(self):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def serve():
    servers = []

    def start(routes, stall=False):
        servers.append(Server(routes, stall))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


@pytest.fixture(scope="module")
def path_without(tmp_path_factory):
    """A PATH value that hides the given commands (a folder of symlinks)."""

    def build(*hidden):
        bindir = tmp_path_factory.mktemp("bin_without_" + "_".join(hidden))
        for d in os.environ.get("PATH", "").split(os.pathsep):
            if d and os.path.isdir(d):
                for e in os.scandir(d):
                    if (e.name not in hidden and not (bindir / e.name).exists() and not e.is_dir()
                            and os.access(e.path, os.X_OK)):
                        os.symlink(e.path, bindir / e.name)
        return str(bindir)

    return build


def closed_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now: connection refused
    return port


# --------------------------------------------------------------------------- arguments


def test_script_is_posix_sh_and_uses_the_official_host():
    text = SCRIPT.read_text()
    assert text.startswith("#!/bin/sh\n") and os.access(SCRIPT, os.X_OK)
    for bashism in ("[[", "pipefail", "function ", "declare ", "local ", "$'"):
        assert bashism not in text + LIB.read_text(), bashism
    assert "efrosgans.eecs.berkeley.edu/cyclegan/pretrained_models" in text


@pytest.fixture
def stub_path(tmp_path):
    """PATH whose curl and wget only leave a marker: proves nothing is downloaded."""
    stub, marker = tmp_path / "stubs", tmp_path / "network_used"
    stub.mkdir()
    for tool in ("curl", "wget"):
        (stub / tool).write_text(f"#!/bin/sh\ntouch '{marker}'\nexit 1\n")
        (stub / tool).chmod(0o755)
    return str(stub) + os.pathsep + os.environ["PATH"], marker


@pytest.mark.parametrize("shell", [_shell("sh"), *SHELLS])
@pytest.mark.parametrize("args", [["nope"], ["Horse2Zebra"], ["horse2zebra.pth"], [NAME, "extra"], []],
                         ids=["unknown", "case", "suffix", "two", "none"])
def test_bad_name_prints_the_list_and_touches_nothing(shell, args, repo, stub_path):
    path, marker = stub_path
    r = run_script(shell, repo, *args, env=clean_env(PATH=path))
    assert r.returncode == 1 and r.stdout == ""
    assert "usage:" in r.stderr
    valid = r.stderr.split("valid names:")[1].split()
    assert valid == OFFICIAL_NAMES
    assert not marker.exists()
    assert_nothing_left(repo)


# --------------------------------------------------------------------------- success


@needs_curl
@pytest.mark.parametrize("shell,from_saved_models", [("dash", False), ("bash", True)],
                         ids=["dash-from_root", "bash-from_saved_models"])
def test_404_then_the_second_location_lands_in_the_official_layout_and_translates(
        shell, from_saved_models, repo, files, serve):
    if not shutil.which(shell):
        pytest.skip(f"{shell} not installed")
    srv = serve({f"/mirror/{NAME}.pth": files["good"]})
    env = clean_env(CYCLEGAN_MODEL_URLS=f"{srv.url}/gone {srv.url}/mirror/")
    r = run_script(shell, repo, NAME, env=env, from_saved_models=from_saved_models)
    assert r.returncode == 0, r.stderr
    assert srv.requests == [f"/gone/{NAME}.pth", f"/mirror/{NAME}.pth"]
    assert f"{srv.url}/gone/{NAME}.pth: the server answered with an HTTP error, e.g. 404 (curl exit 22)" in r.stderr
    dest = repo / DEST
    assert dest.read_bytes() == files["good"]
    assert str(dest.resolve()) in r.stdout
    assert sorted(p.name for p in (repo / "saved_models").iterdir()) == [SCRIPT.name, f"{NAME}_pretrained"]
    assert sorted(os.listdir(dest.parent)) == ["latest_net_G.pth"]

    # The command the script prints, run as printed from the repository root (once: it
    # is the same file whichever shell fetched it).
    command = [line for line in r.stdout.splitlines() if line.startswith("Translate with: ")][0].split(": ", 1)[1]
    argv = shlex.split(command)
    assert argv[:4] == ["python", "test.py", "--checkpoint", DEST]
    if shell == "dash":
        Image.new("RGB", (37, 22), (200, 120, 40)).save(repo / "horse.jpg")
        t = run_cli(os.path.join(repo, argv[1]), *argv[2:], "--amp", "none", cwd=repo, env=clean_env())
        assert t.returncode == 0, t.stderr
        with Image.open(repo / "images" / "outputs" / "horse.png") as out:
            assert out.size == (37, 22)


def test_wget_when_there_is_no_curl(repo, files, serve, path_without, tmp_path):
    if not shutil.which("wget"):
        pytest.skip("wget not installed")
    (tmp_path / "wgetrc").write_text("")  # a user's ~/.wgetrc cannot change what wget does
    srv = serve({f"/mirror/{NAME}.pth": files["good"]})
    env = clean_env(CYCLEGAN_MODEL_URLS=f"{srv.url}/gone {srv.url}/mirror", PATH=path_without("curl"),
                    WGETRC=str(tmp_path / "wgetrc"))
    r = run_script("dash" if shutil.which("dash") else "sh", repo, NAME, env=env)
    assert r.returncode == 0, r.stderr
    assert "(wget exit 8)" in r.stderr
    assert srv.requests == [f"/gone/{NAME}.pth", f"/mirror/{NAME}.pth"]
    assert (repo / DEST).read_bytes() == files["good"]


def test_already_present_is_left_alone(repo, serve):
    srv = serve({})
    (repo / DEST).parent.mkdir()
    (repo / DEST).write_bytes(b"mine")
    r = run_script("sh", repo, NAME, env=clean_env(CYCLEGAN_MODEL_URLS=srv.url))
    assert r.returncode == 0 and "already exists" in r.stdout
    assert (repo / DEST).read_bytes() == b"mine" and srv.requests == []


# --------------------------------------------------------------------------- bad files and failures


def test_each_kind_of_bad_file_is_rejected_and_deleted_then_the_next_location_is_used(repo, files, serve):
    """One location per kind of bad file, in order, then a good one: every bad file is
    downloaded, rejected and deleted, and only the good one is kept."""
    bad = {k: v for k, v in files["bad"].items() if k != "nan_weights"}  # that one: the next test
    routes = {f"/{kind}/{NAME}.pth": body for kind, body in bad.items()}
    routes[f"/good/{NAME}.pth"] = files["good"]
    srv = serve(routes)
    urls = " ".join(f"{srv.url}/{kind}" for kind in [*bad, "good"])
    r = run_script("dash" if shutil.which("dash") else "sh", repo, NAME, env=clean_env(CYCLEGAN_MODEL_URLS=urls))
    assert r.returncode == 0, r.stderr
    assert srv.requests == [f"/{kind}/{NAME}.pth" for kind in [*bad, "good"]]
    for kind in bad:
        assert f"{srv.url}/{kind}/{NAME}.pth: rejected and deleted" in r.stderr
    assert "Traceback" not in r.stderr
    assert "not in the official layout" in r.stderr and "arbitrary code" in r.stderr
    assert (repo / DEST).read_bytes() == files["good"]


def test_only_a_bad_file_fails_and_leaves_nothing(repo, files, serve):
    srv = serve({f"/{NAME}.pth": files["bad"]["nan_weights"]})
    r = run_script("sh", repo, NAME, env=clean_env(CYCLEGAN_MODEL_URLS=srv.url))
    assert r.returncode == 1
    assert "its output is not finite" in r.stderr and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        f"download_pretrained_model.sh: error: none of the 1 locations gave a valid {NAME}.pth (see above); "
        "set CYCLEGAN_MODEL_URLS to other locations")
    assert_nothing_left(repo)


@needs_curl
@pytest.mark.parametrize("shell", SHELLS)
def test_unreachable_host_ends_with_one_clear_line(shell, repo):
    urls = f"http://127.0.0.1:{closed_port()}/a http://127.0.0.1:{closed_port()}/b"
    r = run_script(shell, repo, NAME, env=clean_env(CYCLEGAN_MODEL_URLS=urls))
    assert r.returncode == 1
    assert "cannot connect to the host (curl exit 7)" in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"download_pretrained_model.sh: error: could not reach any of the 2 locations of {NAME}.pth")
    assert_nothing_left(repo)


def test_no_python_with_torch_stops_before_downloading(repo, serve, tmp_path):
    srv = serve({})
    r = run_script("sh", repo, NAME,
                   env=clean_env(CYCLEGAN_MODEL_URLS=srv.url, PYTHON=str(tmp_path / "no_such_python")))
    assert r.returncode == 1 and "PYTHON=" in r.stderr
    assert srv.requests == []
    assert_nothing_left(repo)


def test_no_downloader(repo, path_without):
    r = run_script("sh", repo, NAME, env=clean_env(PATH=path_without("curl", "wget")))
    assert r.returncode == 1 and "neither curl nor wget" in r.stderr
    assert_nothing_left(repo)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
@pytest.mark.parametrize("shell", SHELLS)
def test_interrupted_download_leaves_nothing(shell, sig, repo, files, serve):
    if not shutil.which("curl"):
        pytest.skip("curl not installed")
    srv = serve({f"/{NAME}.pth": files["good"]}, stall=True)
    proc = subprocess.Popen(
        [shutil.which(shell), f"saved_models/{SCRIPT.name}", NAME], cwd=repo,
        env=clean_env(CYCLEGAN_MODEL_URLS=srv.url), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # A shell cannot trap a signal that was ignored when it started, and CI may run
        # pytest with SIGINT ignored: give the child the default action back.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        part = repo / "saved_models" / f"{NAME}_pretrained.pth.part"
        deadline = time.monotonic() + 30
        while not (part.exists() and part.stat().st_size > 0):  # half the body has arrived
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "download never started"
            time.sleep(0.02)
        proc.send_signal(sig)  # only the shell gets it, not curl
        _, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        srv.release.set()
    assert proc.returncode == 128 + sig, err
    assert f"interrupted by {sig.name}" in err
    assert_nothing_left(repo)
