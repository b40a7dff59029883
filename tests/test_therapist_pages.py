"""Therapist pages in O(G) (issue 13): each page figure is drawn and PNG-encoded once per dataset (a
backdrop: every therapist grey and unlabelled), and each page overlays its own star (and interval) as
inline SVG. The mark must sit exactly where matplotlib drew it when every page redrew the whole figure
(``figures.control_funnel(highlight=...)``, ``figures.caterpillar_highlight``): checked against the old
figure's ``ax.transData``, against the old figure's pixels, and in a headless-Chromium screenshot.
"""

from __future__ import annotations

import base64
import io
import re

import numpy as np
import pytest
from PIL import Image

from browser import render, require_chromium
from test_report_inputs import simulated_inputs
from therapist_effects.report import figures
from therapist_effects.report.service import page_backdrops, page_name, service_context, therapist_pages

KEY = "test-key-not-secret"
BLUE = np.array([0x00, 0x72, 0xB2])  # figures.YOU, the star's colour


@pytest.fixture()
def inputs(monkeypatch):
    monkeypatch.setenv("TE_PSEUDONYM_KEY", KEY)
    return simulated_inputs(xss=False)


def png(src: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).convert("RGB")).astype(int)


def old_figure(ctx: dict, fid: str, i: int) -> figures.Figure:
    """The figure as every page drew it before: the whole figure redrawn with therapist ``i`` starred."""
    if fid == "caterpillar":
        eff = [r["effect"] for r in ctx["rows"] if r["effect"][0] is not None]
        return figures.caterpillar_highlight(*zip(*eff, strict=True), i, ylabel=f"effect ({ctx['unit']})",
                                             title="Your estimated effect among all listed therapists")
    if fid == "funnel-outcome":
        f = ctx["outcome_funnel"]
        return figures.control_funnel(f["n"], f["value"], f["target"], f["grid"], f["lo"], f["hi"], f["keys"],
                                      level=ctx["level"], ylabel=f"adjusted end score ({ctx['unit']})",
                                      title="Your case-mix-adjusted outcome and caseload", highlight=i)
    f = ctx["funnel"]
    return figures.control_funnel(f["n"], f["value"], f["p0"], f["grid"], f["lo"], f["hi"], f["keys"],
                                  level=ctx["level"], ylabel=f["label"], title=f"Your {f['label']} and caseload",
                                  highlight=i, percent=True)


def sample(bd: figures.Backdrop) -> list[int]:
    """Therapists to check: first, last, and the extremes of each coordinate."""
    return sorted({0, len(bd.x) - 1, int(np.argmin(bd.x)), int(np.argmax(bd.x)), int(np.argmin(bd.y)),
                   int(np.argmax(bd.y))})


def test_the_mark_is_where_matplotlib_puts_the_old_star(inputs, monkeypatch):
    """ax.transData of the old figure (at the PNG's DPI) puts the star at pixel (x, y); Agg centres a
    marker on the middle of the pixel that rounds to, so the overlay's centre is in (x, x + 1]."""
    ctx = service_context(inputs["estimates"], inputs["patients"], inputs["therapists"])
    backdrops = page_backdrops(ctx)
    assert [b[0] for b in backdrops] == ["funnel-outcome", "funnel-rate", "caterpillar"]
    drawn = []
    real = figures._encode
    monkeypatch.setattr(figures, "_encode", lambda fig: drawn.append(fig) or real(fig))
    for fid, bd, _ in backdrops:
        for i in sample(bd):
            old = old_figure(ctx, fid, i)
            fig = drawn[-1]
            ax = fig.axes[0]
            star = ax.collections[-1]  # drawn last, over the backdrop
            assert star.get_sizes()[0] in (figures.FUNNEL_STAR, figures.CATERPILLAR_STAR)
            assert star.get_offsets().tolist() == [[bd.x[i], bd.y[i]]]  # the same therapist, the same data
            fig.set_dpi(figures.DPI)  # savefig drew at DPI; the layout it made is kept
            x, y = ax.transData.transform(star.get_offsets()[0])
            mark = bd.highlight(i)
            height = png(old.src).shape[0]
            assert 0 < mark.x - x <= 1 and 0 < mark.y - (height - y) <= 1, (fid, i)
            assert (mark.width, mark.height) == png(old.src).shape[1::-1]


def test_the_old_figure_is_the_backdrop_plus_the_star(inputs):
    """Pixel for pixel, the old figure differs from the backdrop only inside the star (and the interval):
    the changed pixels are centred on the overlay's x and span the star's height around its y."""
    ctx = service_context(inputs["estimates"], inputs["patients"], inputs["therapists"])
    for fid, bd, _ in page_backdrops(ctx):
        back = png(bd.figure.src)
        for i in sample(bd):
            mark = bd.highlight(i)
            changed = np.abs(png(old_figure(ctx, fid, i).src) - back).sum(axis=2) > 0
            ys, xs = np.nonzero(changed)
            assert (xs.min() + xs.max() + 1) / 2 == mark.x, (fid, i)
            area = figures.CATERPILLAR_STAR if fid == "caterpillar" else figures.FUNNEL_STAR
            r = np.sqrt(area) * figures.DPI / 72 / 2 + mark.stroke / 2  # star's outer radius + half its edge
            top, bottom = mark.y - r, mark.y + np.cos(np.pi / 5) * (r - mark.stroke / 2) + mark.stroke / 2
            if mark.top is not None:  # the interval runs from top to bottom at the same x
                top, bottom = min(top, mark.top), max(bottom, mark.bottom)
            assert abs(ys.min() - top) < 1 and abs(ys.max() + 1 - bottom) < 1, (fid, i)


def test_pages_draw_each_figure_once_and_are_byte_identical(inputs, tmp_path, monkeypatch):
    encoded = []
    real = figures._encode
    monkeypatch.setattr(figures, "_encode", lambda fig: encoded.append(1) or real(fig))
    service_context(inputs["estimates"], inputs["patients"], inputs["therapists"])
    context_figures = len(encoded)
    first = therapist_pages(inputs["estimates"], inputs["patients"], inputs["therapists"], tmp_path / "a")
    assert len(first) > 40 and len(encoded) == 2 * context_figures + 3  # 3 backdrops for all the pages
    second = therapist_pages(inputs["estimates"], inputs["patients"], inputs["therapists"], tmp_path / "b")
    assert [p.name for p in first] == [p.name for p in second]
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(first, second, strict=True))
    # the pages embed the same three images (a therapist left out of the rate funnel for privacy gets two)
    srcs = [re.findall(r'<img src="(data:image/png;base64,[^"]+)"', p.read_text()) for p in first]
    assert len({s for page in srcs for s in page}) == 3 and {len(page) for page in srcs} == {2, 3}
    marks = {re.search(r'<path class="star" transform="translate\(([\d.]+ [\d.]+)\)', p.read_text()).group(1)
             for p in first}
    assert len(marks) > 0.9 * len(first)  # own positions (a few therapists share a caseload and score)


def test_you_label_turns_left_at_the_right_edge(inputs):
    ctx = service_context(inputs["estimates"], inputs["patients"], inputs["therapists"])
    cat = dict((fid, bd) for fid, bd, _ in page_backdrops(ctx))["caterpillar"]
    right, left = cat.highlight(int(np.argmax(cat.y))), cat.highlight(int(np.argmin(cat.y)))
    assert (right.label_anchor, left.label_anchor) == ("end", "start")
    assert right.label_x < right.x < right.clip[0] + right.clip[2] and left.label_x > left.x > left.clip[0]


@pytest.mark.browser
def test_screenshot_shows_the_star_where_the_old_figure_had_it(inputs, tmp_path):
    """Chromium paints the page's marks pixel for pixel where matplotlib drew the old stars, and the
    SVG covers the image exactly on screen and in print (where the image is scaled down)."""
    require_chromium()
    ctx = service_context(inputs["estimates"], inputs["patients"], inputs["therapists"])
    backdrops = page_backdrops(ctx)
    therapist_pages(inputs["estimates"], inputs["patients"], inputs["therapists"], tmp_path)
    boxes = ('Array.from(document.querySelectorAll(".marked")).map(d => [d.querySelector("img"), '
             'd.querySelector("svg")].map(e => {const b = e.getBoundingClientRect(); '
             'return [b.left, b.top + window.scrollY, b.width, b.height]}))')
    for r in (ctx["rows"][0], max(ctx["rows"], key=lambda r: r["n"])):
        path = tmp_path / page_name(r["name"])
        page = render(path, tmp_path / "shot.png", evaluate=boxes)
        shown = [(fid, bd, index) for fid, bd, index in backdrops if r["id"] in index]
        assert page.console_errors == [] and page.broken_images == [] and len(page.images) == len(shown) >= 2
        shot = np.asarray(Image.open(tmp_path / "shot.png").convert("RGB")).astype(int)
        for (fid, bd, index), (img_box, svg_box) in zip(shown, page.evaluated, strict=True):
            assert img_box == svg_box and img_box[2:] == [bd.width, bd.height]
            mark = bd.highlight(index[r["id"]])
            left, top = round(img_box[0]), round(img_box[1])
            assert np.abs(shot[top + int(mark.y), left + int(mark.x)] - BLUE).max() <= 3, fid
            # the star's pixels in the screenshot are the old figure's star pixels
            old = png(old_figure(ctx, fid, index[r["id"]]).src)
            rows, cols = slice(int(mark.y) - 11, int(mark.y) + 11), slice(int(mark.x) - 11, int(mark.x) + 11)
            was = np.abs(old[rows, cols] - BLUE).sum(axis=2) < 100
            now = np.abs(shot[top:top + bd.height, left:left + bd.width][rows, cols] - BLUE).sum(axis=2) < 100
            assert (was & now).sum() / (was | now).sum() > 0.95, fid
        printed = render(path, width=700, media="print", evaluate=boxes)  # A4's printable width
        for img_box, svg_box in printed.evaluated:
            assert img_box == pytest.approx(svg_box, abs=0.05) and img_box[2] < 700  # layout units: 1/64 px
