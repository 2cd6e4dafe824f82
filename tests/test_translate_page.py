"""test.py's scores against a paired --reference_dir and its results page (output_dir/index.html):
what the page links to exists, and the scores are those computed here with numpy."""
import html.parser
import os
import re
import urllib.parse

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import (G_direct, assert_same_pixels, expected_translation, make_generator, random_image,
                      run_translate as run_main)
from datasets import load_image


@pytest.fixture(scope="module")
def g3(tmp_path_factory):
    G = make_generator(3, seed=0)
    path = tmp_path_factory.mktemp("g3") / "G_BA_1.pth"
    torch.save(G.state_dict(), str(path))
    return str(path), G


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing is ever written into the repository


# -----------------------------------------------------------------------------
# --reference_dir scoring

def test_reference_dir_scores_translation_and_identity_baseline_matching_by_stem(g3, tmp_path, capsys):
    ckpt, G = g3
    (tmp_path / "in").mkdir()
    (tmp_path / "ref").mkdir()
    inputs = {"a": random_image(13, 9, seed=21), "b": random_image(13, 9, seed=22), "c": random_image(13, 9, seed=23)}
    for stem, img in inputs.items():
        img.save(tmp_path / "in" / f"{stem}.png")
    # a: same file name; b: same stem, another format; c: no reference; zz: a reference with no input
    refs = {"a": expected_translation(G, inputs["a"]), "b": expected_translation(G, inputs["b"])}
    Image.fromarray(refs["a"]).save(tmp_path / "ref" / "a.png")
    Image.fromarray(refs["b"]).save(tmp_path / "ref" / "b.bmp")
    random_image(13, 9, seed=24).save(tmp_path / "ref" / "zz.png")
    code, out, err = run_main(["--checkpoint", ckpt, "--image_path", "in", "--output_dir", "out",
                               "--reference_dir", "ref"], capsys)
    assert code == 0, err
    m = re.search(r"\((\d+) images?\): translation MAE ([\d.]+) .*identity baseline MAE ([\d.]+)", out)
    assert m, out
    assert int(m.group(1)) == 2
    assert float(m.group(2)) <= 0.0005
    identity = np.mean([np.abs(np.asarray(inputs[s], float) - refs[s].astype(float)).mean() / 255 for s in ("a", "b")])
    assert identity > 0.05  # the baseline is a real, non-zero number ...
    assert abs(float(m.group(3)) - identity) <= 6e-5  # ... computed as mean |input - reference|


# -----------------------------------------------------------------------------
# the results page, output_dir/index.html

class PageLinks(html.parser.HTMLParser):
    """Every src/href of the page, and its table rows that show media."""

    def __init__(self, text):
        super().__init__()
        self.links, self.rows, self.row = [], [], None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "tr":
            self.row = []
            self.rows.append(self.row)
        for key in ("src", "href"):
            if key in a:
                self.links.append(a[key])
                if tag in ("img", "video") and self.row is not None:
                    self.row.append(a[key])

    def media_rows(self):
        return [r for r in self.rows if r]


def page_file(page_dir, link):
    return os.path.join(page_dir, *urllib.parse.unquote(link).split("/"))


def test_results_page_has_one_row_per_translation_with_relative_links_that_exist(g3, tmp_path, capsys):
    ckpt, G = g3
    src = tmp_path / "far" / "away"
    src.mkdir(parents=True)
    names = ["a b#1%.png", "a.jpg", "c.bmp"]  # a space, '#' and '%' must be quoted in the links
    for k, name in enumerate(names):
        random_image(12, 8, seed=k).save(src / name)
    (src / "broken.png").write_bytes(b"not a png")
    code, _, err = run_main(["--checkpoint", ckpt, "--image_path", src, "--output_dir", tmp_path / "out"], capsys)
    assert code == 1  # broken.png
    page = (tmp_path / "out" / "index.html").read_text(encoding="utf-8")
    links = PageLinks(page)
    assert links.links, page
    for link in links.links:
        assert not link.startswith(("/", "file:", "http")) and ":" not in link and "\\" not in link, link
        assert os.path.isfile(page_file(tmp_path / "out", link)), link
    rows = links.media_rows()
    assert len(rows) == 3  # the three translated images; broken.png is only named
    assert "broken.png" in page
    for row, name in zip(rows, sorted(names)):
        shown_input, shown_output = (np.asarray(Image.open(page_file(tmp_path / "out", link))) for link in row)
        assert (shown_input == np.asarray(load_image(src / name))).all()  # the input, as the model saw it
        assert_same_pixels(shown_output, G_direct(G, load_image(src / name)))
    assert not list((tmp_path / "out").glob(".index*"))  # the temporary page was renamed into place


def test_results_page_with_reference_dir_shows_the_reference_and_each_images_scores(g3, tmp_path, capsys):
    ckpt, G = g3
    (tmp_path / "in").mkdir()
    (tmp_path / "ref").mkdir()
    for stem, seed in [("a", 1), ("b", 2)]:
        random_image(12, 8, seed=seed).save(tmp_path / "in" / f"{stem}.png")
    ref = random_image(12, 8, seed=9)
    ref.save(tmp_path / "ref" / "a.png")  # b has no reference
    code, _, err = run_main(["--checkpoint", ckpt, "--image_path", "in", "--output_dir", "out",
                             "--reference_dir", "ref"], capsys)
    assert code == 0, err
    page = (tmp_path / "out" / "index.html").read_text(encoding="utf-8")
    rows = PageLinks(page).media_rows()
    assert [len(r) for r in rows] == [3, 2]  # a: input, translation, reference; b: no reference
    assert (np.asarray(Image.open(page_file(tmp_path / "out", rows[0][2]))) == np.asarray(ref)).all()
    out = np.asarray(Image.open(tmp_path / "out" / "a.png"), dtype=float)
    mae = np.abs(out - np.asarray(ref, dtype=float)).mean() / 255
    assert f"{mae:.4f}" in page and "PSNR" in page
