"""--png, --html, --json: valid files whose every number comes from the trace (and the CLI writes the same)."""

import json
import math
import re
import struct
from html.parser import HTMLParser

import numpy as np
import pytest
import torch
from _cli import run_cli

from selfattn.checkpoint import save
from selfattn.explain import FULL_MATRIX_MAX_TOKENS, explain
from selfattn.explain.labels import fmt, token_label
from selfattn.explain.plot import png_size
from selfattn.explain.trace import stats_summary
from selfattn.model import AttentionStack

TEXT = "The cat sat on the mat, and the cat slept."
LONG = " ".join(f"w{(i * 7) % 23}" for i in range(FULL_MATRIX_MAX_TOKENS + 20))


class _Page(HTMLParser):
    # visible text (outside <style>/<script>), and every URL-bearing attribute
    def __init__(self):
        super().__init__()
        self.text, self.urls, self.tags, self._skip = [], [], [], 0

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self._skip += tag in ("style", "script")
        self.urls += [v for k, v in attrs if k in ("src", "href", "data", "action", "poster") and v is not None]

    def handle_endtag(self, tag):
        self._skip -= tag in ("style", "script")

    def handle_data(self, data):
        if not self._skip:
            self.text.append(data)


def _page(doc):
    p = _Page()
    p.feed(doc)
    return p, " ".join(p.text)


def _numbers(text):
    return set(re.findall(r"-?\d+\.\d{4}(?!\d)", text))


def _allowed(tr):
    vals = {fmt(float(x)) for t in tr.steps.values() for x in t.flatten()}
    vals |= {fmt(float(x)) for f in ("entropy", "max_logit") for x in getattr(tr.stats, f)}
    vals |= {fmt(math.log(len(tr.tokens))), fmt(tr.scale)}
    vals |= {fmt(float(x)) for x in tr.row_weights.flatten()}
    vals |= {fmt(v) for s in stats_summary(tr).values() if s for v in (s["mean"], s["min"], s["max"])}
    return vals


def _check_self_contained(p, doc):
    assert "script" not in p.tags
    assert all(u.startswith("data:") for u in p.urls), [u[:40] for u in p.urls if not u.startswith("data:")]
    assert "http://" not in doc and "https://" not in doc and "url(" not in doc and "@import" not in doc


def test_html_report_full_trace(tmp_path):
    tr = explain(TEXT, causal=True)
    doc = tr.to_html(tmp_path / "r.html")
    assert (tmp_path / "r.html").read_text(encoding="utf-8") == doc
    p, text = _page(doc)
    _check_self_contained(p, doc)
    assert doc.count('src="data:image/png;base64,') == 1  # the heatmap
    for t in set(tr.tokens):
        assert t in text
    for name in ("embeddings", "Q", "scores", "scaled", "masked", "weights", "output"):
        for x in tr.steps[name].flatten():
            assert fmt(float(x)) in text, (name, float(x))
    for f in ("entropy", "max_logit"):
        for x in getattr(tr.stats, f):
            assert fmt(float(x)) in text
    shown = _numbers(text)
    assert shown <= _allowed(tr), sorted(shown - _allowed(tr))[:10]
    assert "<svg" in doc  # per-row statistics charts
    assert tr._repr_html_() in doc  # the notebook view is the report's body


def test_html_report_long_and_model(tmp_path):
    tr = explain(LONG, rows="3,-1")
    doc = tr.to_html()
    p, text = _page(doc)
    _check_self_contained(p, doc)
    assert "no L x L matrix" in text
    for i, r in enumerate(tr.rows):
        assert token_label(tr, r) in text and fmt(float(tr.stats.entropy[r])) in text
        assert fmt(float(tr.row_weights[i].max())) in text
    assert _numbers(text) <= _allowed(tr)

    torch.manual_seed(3)
    vocab = sorted(set(TEXT.replace(",", " ,").replace(".", " .").split()))
    model = AttentionStack(len(vocab), 8, [{"type": "MultiHeadAttention", "num_heads": 2}], causal=True)
    save(tmp_path / "ck", model, model.config, vocab=vocab)
    mt = explain(TEXT, checkpoint=tmp_path / "ck")
    doc = mt.to_html()
    p, text = _page(doc)
    _check_self_contained(p, doc)
    assert "Per-head overview" in text
    allowed = set().union(*(_allowed(h) for h in mt.heads))
    for h in mt.heads:
        assert h.label in text
        for x in h.weights.flatten():
            assert fmt(float(x)) in text
    assert _numbers(text) <= allowed


def _png_info(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def _has_colour(img, rgb, tol=2):
    return bool((np.abs(img[..., :3].astype(int) - np.array(rgb)).max(-1) <= tol).any())


@pytest.mark.parametrize("kind", ["full", "long", "model", "many_heads"])
def test_png_heatmap(tmp_path, kind):
    import matplotlib.image
    from matplotlib import colormaps

    if kind == "full":
        obj = explain(TEXT, causal=True)
    elif kind == "long":
        obj = explain(LONG, rows="0,10,-1")
    else:
        torch.manual_seed(0)
        heads = 2 if kind == "model" else 8
        model = AttentionStack(30, 16, [{"type": "SelfAttention"}, {"type": "MultiHeadAttention", "num_heads": heads}])
        save(tmp_path / "ck", model, model.config, vocab=[f"t{i}" for i in range(30)])
        obj = explain("t1 t2 t3 t4 t5 t1 t2", checkpoint=tmp_path / "ck")
    path = tmp_path / "w.png"
    obj.plot(path)
    w, h = _png_info(path)
    assert (w, h) == png_size(obj) and w > 300 and h > 200
    if kind == "many_heads":
        # 1 + 8 heads: the 8 wrap onto two rows of 4 under the first layer's row, not one wide row (with more
        # than HEADS_PER_ROW heads in a layer the cells shrink and the heads share token labels: no longer
        # 2.5 single pictures tall)
        from selfattn.explain.plot import HEADS_PER_ROW, _layout

        one = explain("t1 t2 t3 t4 t5 t1 t2")
        lay = _layout(obj)
        tops = sorted({round(p.box[1] + p.box[3], 6) for p in lay.panels}, reverse=True)  # one per row of panels
        per_row = [sum(round(p.box[1] + p.box[3], 6) == t for p in lay.panels) for t in tops]
        assert per_row == [1, HEADS_PER_ROW, HEADS_PER_ROW] and not lay.left_out
        assert w < 5 * png_size(one)[0] and h > 1.5 * png_size(one)[1]
    img = (matplotlib.image.imread(path) * 255).round().astype(np.uint8)  # (H, W, 4)
    assert img.shape[:2] == (h, w)
    colours = np.unique(img.reshape(-1, img.shape[-1]), axis=0)
    assert len(colours) >= 64, f"only {len(colours)} distinct colours"
    # the cells carry the colour map's colour of their weight
    head = obj.heads[-1] if kind in ("model", "many_heads") else obj
    m = head.weights if head.full else head.row_weights
    if not head.full:  # long rows: each coloured relative to its own largest weight (issue 16)
        m = m / m.amax(dim=1, keepdim=True)
    for x in (float(m.max()), float(m[m > 0].min()), float(m.flatten()[m.numel() // 2])):
        rgb = [round(255 * c) for c in colormaps["viridis"](x)[:3]]
        assert _has_colour(img, rgb), f"no pixel of the colour of weight {x:.4f}"
    # masked pairs (causal: above the diagonal) are drawn in the hatch colours, not as a weight of 0
    from selfattn.explain.plot import MASKED_FACE

    face = np.array([int(MASKED_FACE[i:i + 2], 16) for i in (1, 3, 5)])
    hatched = int((np.abs(img[..., :3].astype(int) - face).max(-1) <= 2).sum())  # pixels of the hatch background
    assert (hatched > 2000) == (kind == "full"), (kind, hatched)  # (a few stray grey pixels come from anti-aliasing)


def test_long_rows_are_not_one_flat_colour(tmp_path):
    """300 tokens: every weight is small, yet the heatmap's row strip shows its structure."""
    import matplotlib.image

    tr = explain(" ".join(f"w{(i * 7) % 23}" for i in range(300)), rows="150")
    path = tmp_path / "long.png"
    tr.plot(path)
    img = (matplotlib.image.imread(path) * 255).round().astype(np.uint8)
    assert float(tr.row_weights.max()) < 0.2  # on a fixed 0-1 scale this row would be one colour
    w, h = png_size(tr)
    from selfattn.explain.plot import BOTTOM_IN, DPI, LEFT_IN, LONG_ROW_IN, LONG_WIDTH_IN

    y = round(h - (BOTTOM_IN + LONG_ROW_IN / 2) * DPI)  # the middle of the (only) row
    x0, x1 = round(LEFT_IN * DPI) + 3, round((LEFT_IN + LONG_WIDTH_IN) * DPI) - 3
    row = img[y, x0:x1, :3]
    assert len(np.unique(row, axis=0)) >= 8, "the row strip is (nearly) one colour"


def test_long_causal_first_row_is_visible(tmp_path):
    """2000 tokens, causal: query 0 may see one key (under a pixel wide); its strip still shows a
    coloured cell at least NARROW_PX wide at the left edge instead of looking wholly masked."""
    import matplotlib.image

    from selfattn.explain.plot import BOTTOM_IN, DPI, LEFT_IN, LONG_ROW_IN, LONG_WIDTH_IN, NARROW_PX

    tr = explain(" ".join(f"w{(i * 7) % 23}" for i in range(2000)), causal=True, rows="0,1999")
    path = tmp_path / "long.png"
    tr.plot(path)
    img = (matplotlib.image.imread(path) * 255).round().astype(np.uint8)
    w, h = png_size(tr)
    grey = lambda px: (np.ptp(px.astype(int), axis=-1) <= 6) & (px.mean(-1) >= 140) & (px.mean(-1) <= 225)  # noqa: E731
    hatch_like = grey  # the masked face (MASKED_FACE) and its hatch lines; viridis has no greys
    y0 = round(h - (BOTTOM_IN + 1.5 * LONG_ROW_IN) * DPI)  # the middle of the first row (query 0)
    x0 = round(LEFT_IN * DPI)
    left = img[y0, x0 + 1:x0 + NARROW_PX - 1, :3]
    assert not hatch_like(left).any(), left  # the allowed key is drawn, not grey
    rest = img[y0, x0 + 3 * NARROW_PX:round((LEFT_IN + LONG_WIDTH_IN) * DPI) - 3, :3]
    assert hatch_like(rest).mean() > 0.95  # and the 1999 masked keys stay hatched


def test_cli_writes_the_same_numbers(tmp_path):
    png, html, js = tmp_path / "w.png", tmp_path / "r.html", tmp_path / "t.json"
    r = run_cli("explain", TEXT, "--causal", "--window", "3", "--init", "default", "--dim", "6", "--seed", "4",
                "--png", png, "--html", html, "--json", js, env={"COLUMNS": "200", "PATH": ""})  # a process of its own
    assert r.returncode == 0, r.stderr
    tr = explain(TEXT, causal=True, window=3, init="default", dim=6, seed=4)
    d = json.loads(js.read_text())
    assert d["tokens"] == tr.tokens
    for step in d["steps"]:
        got = torch.tensor([[float(x) for x in row] for row in step["value"]], dtype=torch.float64)
        assert torch.equal(got, tr.steps[step["name"]]), step["name"]
    assert _png_info(png) == png_size(tr)
    _, text = _page(html.read_text(encoding="utf-8"))
    for x in tr.weights.flatten():
        assert fmt(float(x)) in text and fmt(float(x)) in r.stdout
    assert "window = 3 back, 0 ahead" in r.stdout and "causal" in r.stdout


# -- proportionate pictures for models with many heads -----------------------------------------------

def _many_heads(tmp_path, heads=8, layers=3):
    torch.manual_seed(0)
    model = AttentionStack(30, 16, [{"type": "MultiHeadAttention", "num_heads": heads}] * layers)
    save(tmp_path / "ck", model, model.config, vocab=[f"t{i}" for i in range(30)])
    return tmp_path / "ck"


def test_model_png_leaves_out_layers_past_its_height_cap_and_says_which(tmp_path, monkeypatch, capsys):
    """A picture taller than MAX_HEIGHT_PX stops before a layer; the picture, the CLI and the HTML
    name what was left out and the --layers that draws it, and --layers does."""
    from selfattn.explain import plot
    from selfattn import cli

    ck = _many_heads(tmp_path)
    mt = explain("t1 t2 t3 t4 t5 t1 t2", checkpoint=ck)
    full_h = png_size(mt)[1]
    monkeypatch.setattr(plot, "MAX_HEIGHT_PX", full_h - 100)  # one layer too many
    w, h = png_size(mt)
    assert h <= full_h - 100 and [(layer.name, hs) for layer, hs in plot.left_out(mt)] == [(mt.layers[2].name, list(range(8)))]
    note = plot.left_out_note(mt, plot.left_out(mt))
    assert f"layer 2 ({mt.layers[2].name})" in note and "--layers 2" in note, note
    png = tmp_path / "m.png"
    code = cli.main(["explain", "t1 t2 t3 t4 t5 t1 t2", "--checkpoint", str(ck), "--png", str(png), "--html", str(tmp_path / "m.html")])
    out = " ".join(capsys.readouterr().out.split())
    assert code == 0 and _png_info(png) == (w, h)
    assert "Left out to keep this picture under" in out and "--layers 2" in out
    assert "--layers 2" in (tmp_path / "m.html").read_text()
    # what the note says to do draws the layer left out
    two = explain("t1 t2 t3 t4 t5 t1 t2", checkpoint=ck, layers="2")
    assert [layer.name for layer in two.layers] == [mt.layers[2].name] and not plot.left_out(two)


def test_model_png_with_many_heads_is_proportionate(tmp_path):
    """16 heads a layer at 10 tokens: heads share token labels and cells shrink (it was ~5200 px tall for 2 layers)."""
    from selfattn.explain.plot import MAX_HEIGHT_PX

    ck = _many_heads(tmp_path, heads=16, layers=2)
    mt = explain(" ".join(f"t{i}" for i in range(10)), checkpoint=ck)
    w, h = png_size(mt)
    assert h <= 2000 and w <= 2700 and h <= MAX_HEIGHT_PX, (w, h)


def test_long_model_html_is_proportionate(tmp_path):
    """2000 tokens, 2 x 8 heads: row strips are pooled to their pixels and charts to two points a pixel
    column (the page was ~165 KB a head before, most of it invisible detail)."""
    import base64

    ck = _many_heads(tmp_path, heads=8, layers=2)
    mt = explain(" ".join(f"t{(i * 7) % 29}" for i in range(2000)), checkpoint=ck, rows="0,1000,-1")
    doc = mt.to_html()
    png = re.search(r'src="data:image/png;base64,([^"]+)"', doc).group(1)
    rest = len(doc) - len(png)
    assert rest < 45_000 * len(mt.heads), rest / len(mt.heads)
    assert len(base64.b64decode(png)) < 1_000_000
    from selfattn.explain.html import STRIP_LEVELS

    for svg in re.findall(r"<svg[^>]*attention weights over all keys.*?</svg>", doc):
        assert svg.count("<path") <= STRIP_LEVELS + 2 and svg.count("z") <= 400  # a path a colour, a run a pixel column at most


def test_html_strip_pools_keys_to_pixels_and_keeps_a_peak():
    from selfattn.explain.html import _colour, strip

    w = torch.full((2000,), 1e-4, dtype=torch.float64)
    w[1234] = 0.5  # one sharp peak among 2000 keys
    masked = torch.zeros(2000, dtype=torch.bool)
    masked[1500:] = True
    svg = strip(w, masked=masked, relative=True, width=400)
    peak = _colour(1.0, 0.0, 1.0, False)[0]
    assert svg.count("z") == 4 and 'fill="#d9d9d9"' in svg  # low run, peak, low run, masked run
    x = float(re.search(r'fill="' + peak + r'" d="M([0-9.]+) ', svg).group(1))
    assert abs(x - 1234 / 5) <= 1  # the peak's pixel column
