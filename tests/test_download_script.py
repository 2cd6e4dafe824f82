"""Tests for data/download_cyclegan_dataset.sh.

No real network: the script's base URL is overridden with CYCLEGAN_DATASET_URL
to point at a file:// URL or an http server bound to 127.0.0.1. Each test copies
the script into a fresh ``tmp_path/data`` folder so the repository's own data/
folder is never touched. Tools (curl, wget, unzip) are hidden by running the
script with a PATH made of symlinks that leaves them out.
"""

import http.server
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest

from conftest import needs_curl

Image = pytest.importorskip("PIL.Image")

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "data" / "download_cyclegan_dataset.sh"
SCRIPT_NAME = SCRIPT.name
LIB = REPO / "scripts" / "download.sh"  # the helpers it shares with the pretrained-model script

VALID_NAMES = (
    "apple2orange summer2winter_yosemite horse2zebra monet2photo cezanne2photo "
    "ukiyoe2photo vangogh2photo maps facades iphone2dslr_flower ae_photos mini"
).split()

# image counts put into the fake "mini" archive (distinct so the report can be checked)
COUNTS = {"trainA": 3, "trainB": 2, "testA": 1, "testB": 4}


def _shell_param(name):
    return pytest.param(
        name,
        id=name,
        marks=pytest.mark.skipif(shutil.which(name) is None, reason=f"{name} not installed"),
    )


# dash is what /bin/sh is on Debian/Ubuntu; both must behave identically
SHELLS = [_shell_param("dash"), _shell_param("bash")]
SHELLS_WITH_SH = [_shell_param("sh")] + SHELLS


# --------------------------------------------------------------------------- helpers


def _clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env.pop("CYCLEGAN_DATASET_URL", None)
    env["no_proxy"] = env["NO_PROXY"] = "127.0.0.1,localhost"
    env.update(extra)
    return env


def make_zip(path, name="mini", top_level=True, counts=COUNTS):
    """Write a zip laid out like the official ones: NAME/trainA/*.jpg, ..."""
    prefix = f"{name}/" if top_level else ""
    with zipfile.ZipFile(path, "w") as zf:
        if top_level:
            zf.writestr(prefix, "")
        for sub, n in counts.items():
            zf.writestr(f"{prefix}{sub}/", "")
            for i in range(n):
                img = Image.new("RGB", (8, 8), (30 * i % 256, 80, 160))
                tmp = path.parent / f"_img_{sub}_{i}.jpg"
                img.save(tmp, format="JPEG")
                zf.write(tmp, f"{prefix}{sub}/{sub}_{i}.jpg")
                tmp.unlink()
    return path


@pytest.fixture
def data_dir(tmp_path):
    d = tmp_path / "repo" / "data"
    d.mkdir(parents=True)
    shutil.copy2(SCRIPT, d / SCRIPT_NAME)
    (d.parent / "scripts").mkdir()
    shutil.copy2(LIB, d.parent / "scripts" / LIB.name)
    return d


@pytest.fixture
def served(tmp_path):
    """Folder whose files are reachable via a file:// base URL."""
    d = tmp_path / "served"
    d.mkdir()
    return d


def run_script(shell, data_dir, *args, env=None, from_data_dir=False, timeout=30):
    if from_data_dir:
        cwd, script = data_dir, SCRIPT_NAME
    else:
        cwd, script = data_dir.parent, f"data/{SCRIPT_NAME}"
    return subprocess.run(
        [shutil.which(shell), script, *args],
        cwd=cwd,
        env=env if env is not None else _clean_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def assert_nothing_left(data_dir, name="mini", keep=()):
    left = sorted(p.name for p in data_dir.iterdir())
    assert left == sorted([SCRIPT_NAME, *keep]), left


def assert_dataset(data_dir, result, name="mini"):
    dest = data_dir / name
    assert result.returncode == 0, result.stderr
    for sub, n in COUNTS.items():
        files = sorted((dest / sub).iterdir())
        assert len(files) == n
        with Image.open(files[0]) as im:
            assert im.size == (8, 8)
        assert f"{sub}: {n} images" in result.stdout
    assert str(dest.resolve()) in result.stdout
    # zip, .part file and temp folder are gone
    assert_nothing_left(data_dir, keep=[name])


@pytest.fixture(scope="session")
def path_without(tmp_path_factory):
    """Return a PATH value that hides the given commands (built from symlinks)."""
    cache = {}

    def build(*hidden):
        key = tuple(sorted(hidden))
        if key in cache:
            return cache[key]
        bindir = tmp_path_factory.mktemp("bin_without_" + "_".join(key))
        for d in os.environ.get("PATH", "").split(os.pathsep):
            if not d or not os.path.isdir(d):
                continue
            for entry in os.scandir(d):
                if entry.name in hidden or (bindir / entry.name).exists():
                    continue
                if os.access(entry.path, os.X_OK) and not entry.is_dir():
                    os.symlink(entry.path, bindir / entry.name)
        # a direct link to this interpreter (pyenv shims need more than PATH)
        py = bindir / "python3"
        if "python3" not in hidden:
            if py.is_symlink() or py.exists():
                py.unlink()
            os.symlink(sys.executable, py)
        cache[key] = str(bindir)
        return cache[key]

    return build


class _Server:
    """Tiny http server on 127.0.0.1 serving one folder; optionally stalls mid-body."""

    def __init__(self, root, stall=False):
        self.root = Path(root)
        self.release = threading.Event()
        self.requests = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                server.requests.append(self.path)
                f = server.root / self.path.lstrip("/")
                if not f.is_file():
                    self.send_error(404)
                    return
                body = f.read_bytes()
                self.send_response(200)
                self.send_header("Content-Type", "application/zip")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if stall:
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    server.release.wait(20)
                    return
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, args=(0.05,), daemon=True
        )
        self.thread.start()

    def close(self):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def wgetrc(tmp_path):
    """An empty wgetrc, so a user's ~/.wgetrc cannot change what wget does."""
    p = tmp_path / "wgetrc"
    p.write_text("")
    return str(p)


@pytest.fixture
def http_server(served):
    servers = []

    def start(stall=False):
        s = _Server(served, stall=stall)
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.close()


# --------------------------------------------------------------------------- usage


def test_script_is_executable_posix_sh():
    assert os.access(SCRIPT, os.X_OK)
    text = SCRIPT.read_text()
    assert text.startswith("#!/bin/sh\n")
    for bashism in ("[[", "pipefail", "function ", "declare ", "local "):
        assert bashism not in text + LIB.read_text(), bashism
    assert "efrosgans.eecs.berkeley.edu/cyclegan/datasets" in text


def test_bin_sh_is_dash_here():
    if not os.path.exists("/bin/sh") or "dash" not in os.path.realpath("/bin/sh"):
        pytest.skip("/bin/sh is not dash on this machine")
    assert shutil.which("dash")


@pytest.fixture
def stub_path(tmp_path):
    """PATH whose curl/wget only leave a marker: proves no download is tried."""
    stub = tmp_path / "stubs"
    stub.mkdir()
    marker = tmp_path / "network_used"
    for tool in ("curl", "wget"):
        p = stub / tool
        p.write_text(f"#!/bin/sh\ntouch '{marker}'\nexit 1\n")
        p.chmod(0o755)
    return str(stub) + os.pathsep + os.environ.get("PATH", ""), marker


@pytest.mark.parametrize("shell", SHELLS_WITH_SH)
@pytest.mark.parametrize("args", [["nope"], ["Horse2Zebra"], ["cityscapes"], ["mini", "extra"]])
def test_unknown_name(shell, args, data_dir, stub_path):
    path, marker = stub_path
    r = run_script(shell, data_dir, *args, env=_clean_env(PATH=path))
    assert r.returncode == 1
    assert "usage:" in r.stderr
    for name in VALID_NAMES:
        assert name in r.stderr
    assert r.stdout == ""
    assert not marker.exists()
    assert_nothing_left(data_dir)


@pytest.mark.parametrize("shell", SHELLS_WITH_SH)
def test_no_argument(shell, data_dir, stub_path):
    path, marker = stub_path
    r = run_script(shell, data_dir, env=_clean_env(PATH=path))
    assert r.returncode == 1
    assert "usage:" in r.stderr and "horse2zebra" in r.stderr
    assert not marker.exists()
    assert_nothing_left(data_dir)


# --------------------------------------------------------------------------- success


@pytest.mark.parametrize("from_data_dir", [False, True], ids=["from_root", "from_data"])
@pytest.mark.parametrize("shell", SHELLS)
def test_download_file_url(shell, from_data_dir, data_dir, served):
    make_zip(served / "mini.zip")
    env = _clean_env(CYCLEGAN_DATASET_URL=served.as_uri() + "/")
    r = run_script(shell, data_dir, "mini", env=env, from_data_dir=from_data_dir)
    assert_dataset(data_dir, r)
    assert (served / "mini.zip").exists()  # the source is not touched


@pytest.mark.parametrize("shell", SHELLS)
def test_download_http_curl(shell, data_dir, served, http_server):
    if not shutil.which("curl"):
        pytest.skip("curl not installed")
    make_zip(served / "mini.zip")
    srv = http_server()
    r = run_script(shell, data_dir, "mini", env=_clean_env(CYCLEGAN_DATASET_URL=srv.url))
    assert_dataset(data_dir, r)
    assert srv.requests == ["/mini.zip"]


@pytest.mark.parametrize("shell", SHELLS)
def test_download_http_wget_when_no_curl(
    shell, data_dir, served, http_server, path_without, wgetrc
):
    if not shutil.which("wget"):
        pytest.skip("wget not installed")
    make_zip(served / "mini.zip")
    srv = http_server()
    env = _clean_env(CYCLEGAN_DATASET_URL=srv.url, PATH=path_without("curl"), WGETRC=wgetrc)
    r = run_script(shell, data_dir, "mini", env=env)
    assert_dataset(data_dir, r)
    assert srv.requests == ["/mini.zip"]


@pytest.mark.parametrize("shell", SHELLS)
def test_python_fallback_without_unzip(shell, data_dir, served, path_without):
    make_zip(served / "mini.zip")
    env = _clean_env(CYCLEGAN_DATASET_URL=served.as_uri(), PATH=path_without("unzip"))
    r = run_script(shell, data_dir, "mini", env=env)
    assert_dataset(data_dir, r)


@pytest.mark.parametrize("shell", SHELLS)
def test_zip_without_top_level_folder(shell, data_dir, served):
    make_zip(served / "mini.zip", top_level=False)
    r = run_script(shell, data_dir, "mini", env=_clean_env(CYCLEGAN_DATASET_URL=served.as_uri()))
    assert_dataset(data_dir, r)


@pytest.mark.parametrize("shell", SHELLS)
def test_already_present(shell, data_dir, served):
    make_zip(served / "mini.zip")
    existing = data_dir / "mini" / "trainA" / "mine.jpg"
    existing.parent.mkdir(parents=True)
    existing.write_bytes(b"not touched")
    r = run_script(shell, data_dir, "mini", env=_clean_env(CYCLEGAN_DATASET_URL=served.as_uri()))
    assert r.returncode == 0, r.stderr
    assert "already exists" in r.stdout
    assert existing.read_bytes() == b"not touched"
    assert sorted(p.name for p in (data_dir / "mini").rglob("*")) == ["mine.jpg", "trainA"]
    assert_nothing_left(data_dir, keep=["mini"])


# --------------------------------------------------------------------------- failures


@pytest.mark.parametrize("shell", SHELLS)
def test_missing_file_url(shell, data_dir, served):
    url = served.as_uri()
    r = run_script(shell, data_dir, "mini", env=_clean_env(CYCLEGAN_DATASET_URL=url))
    assert r.returncode != 0
    assert f"download of {url}/mini.zip failed" in r.stderr
    assert_nothing_left(data_dir)


@needs_curl
@pytest.mark.parametrize("shell", SHELLS)
def test_http_404(shell, data_dir, http_server):
    srv = http_server()
    r = run_script(shell, data_dir, "mini", env=_clean_env(CYCLEGAN_DATASET_URL=srv.url))
    assert r.returncode != 0
    assert f"download of {srv.url}/mini.zip failed (curl exit 22)" in r.stderr
    assert_nothing_left(data_dir)


@pytest.mark.parametrize("shell", SHELLS)
def test_http_404_wget(shell, data_dir, http_server, path_without, wgetrc):
    if not shutil.which("wget"):
        pytest.skip("wget not installed")
    srv = http_server()
    env = _clean_env(CYCLEGAN_DATASET_URL=srv.url, PATH=path_without("curl"), WGETRC=wgetrc)
    r = run_script(shell, data_dir, "mini", env=env)
    assert r.returncode != 0
    assert "failed (wget exit" in r.stderr
    assert_nothing_left(data_dir)


@pytest.mark.parametrize("hide", [(), ("unzip",)], ids=["unzip", "python_zipfile"])
@pytest.mark.parametrize("shell", SHELLS)
def test_corrupt_zip(shell, hide, data_dir, served, path_without):
    (served / "mini.zip").write_bytes(b"PK\x03\x04 this is not really a zip file" * 50)
    env = _clean_env(CYCLEGAN_DATASET_URL=served.as_uri())
    if hide:
        env["PATH"] = path_without(*hide)
    r = run_script(shell, data_dir, "mini", env=env)
    assert r.returncode != 0
    assert "extraction of mini.zip failed" in r.stderr
    assert_nothing_left(data_dir)


@pytest.mark.parametrize("shell", SHELLS)
def test_zip_with_wrong_layout(shell, data_dir, served):
    with zipfile.ZipFile(served / "mini.zip", "w") as zf:
        zf.writestr("something_else/readme.txt", "hi")
    r = run_script(shell, data_dir, "mini", env=_clean_env(CYCLEGAN_DATASET_URL=served.as_uri()))
    assert r.returncode != 0
    assert "does not contain a mini/ folder" in r.stderr
    assert_nothing_left(data_dir)


@pytest.mark.parametrize("shell", SHELLS)
def test_no_downloader(shell, data_dir, served, path_without):
    make_zip(served / "mini.zip")
    env = _clean_env(CYCLEGAN_DATASET_URL=served.as_uri(), PATH=path_without("curl", "wget"))
    r = run_script(shell, data_dir, "mini", env=env)
    assert r.returncode != 0
    assert "neither curl nor wget" in r.stderr
    assert_nothing_left(data_dir)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
@pytest.mark.parametrize("shell", SHELLS)
def test_interrupted_download(shell, sig, data_dir, served, http_server):
    """A signal to the script mid-download removes the .part file and exits non-zero."""
    if not shutil.which("curl"):
        pytest.skip("curl not installed")
    make_zip(served / "mini.zip")
    srv = http_server(stall=True)
    proc = subprocess.Popen(
        [shutil.which(shell), f"data/{SCRIPT_NAME}", "mini"],
        cwd=data_dir.parent,
        env=_clean_env(CYCLEGAN_DATASET_URL=srv.url),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # A shell cannot trap a signal that was ignored when it started, and pytest may have
        # been launched with SIGINT ignored (`cmd &` in a script, nohup, some CI runners):
        # give the script the default disposition, as an interactive shell would.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        part = data_dir / "mini.zip.part"
        deadline = time.monotonic() + 10
        while not part.exists():  # curl creates it once the body starts arriving
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "download never started"
            time.sleep(0.02)
        proc.send_signal(sig)  # only the shell gets it, not curl
        _, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        srv.release.set()
    assert proc.returncode == 128 + sig, err
    assert f"interrupted by {sig.name}" in err
    assert_nothing_left(data_dir)
