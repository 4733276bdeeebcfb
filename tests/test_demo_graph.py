"""make run's graphite-web: the page it prints, opened in a real browser.

tools/demo.py (what make run runs) starts in a temporary directory with short
intervals; Debian's headless chromium opens the one URL it prints, waits for
the dashboard's graph images, and the test reads the very bytes the browser
got: PNGs of the dashboard's size, each with a legend and coloured lines
plotted above it (not graphite-web's "No Data" image). The render API must return
the points the demo's device sent, and the rejections the demo provoked.
"""
import json
import os
import re
import signal
import struct
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import zlib
from collections import Counter

import pytest
import whisper

from conftest import ROOT, stop_process_group, wait_for

import demo  # tools/demo.py (conftest puts tools/ on the path)
from browser import Chromium, find_chromium
from graphiteweb import missing_requirement

URL_LINE = re.compile(r"^\s+(http://127\.0\.0\.1:\d+/dashboard/\S+)$", re.M)
# How long the demo runs before the page is opened: its dashboard shows the last
# 5 minutes, 10 s of points a line some 10 pixels long.
SPAN = 10
SENT = re.compile(r'msg="sent a data point" metric=metric1 value=(\d+)')


def require(problem):
    """Skip for a missing tool, unless CI (AMPROXY_CI=1) says it must be there."""
    if problem is None:
        return
    if os.environ.get("AMPROXY_CI") == "1":
        pytest.fail(problem + " (AMPROXY_CI=1: .ci/run installs it)")
    pytest.skip(problem)


@pytest.fixture
def running_demo(tmp_path):
    """tools/demo.py in tmp_path, as make run starts it; Ctrl-C at the end."""
    require(None if find_chromium() else "no chromium on PATH: apt-get install chromium")
    require(missing_requirement())
    env = dict(os.environ)
    env.pop("AMPROXY_CONFIG")  # as a user's shell: make run must not need it
    out_path = tmp_path / "demo.out"
    run_dir = tmp_path / "run"
    with open(out_path, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, os.path.join(ROOT, "tools", "demo.py"), "--run-dir", str(run_dir),
             "--interval", "1s", "--stats-interval", "2s", "--bad-interval", "2"],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True)

    def output():
        return out_path.read_text(errors="replace")

    try:
        wait_for(lambda: process.poll() is not None or URL_LINE.search(output()), 90,
                 interval=0.2, what="the demo to print its URL")
        assert process.poll() is None, output()
        yield URL_LINE.search(output()).group(1), run_dir, output
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGINT)  # Ctrl-C in the terminal
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                pass
        stop_process_group(process.pid)
    assert "stopped; the whisper files stay in" in output(), output()


def render_json(base, target, since="-5minutes"):
    query = urllib.parse.urlencode({"target": target, "from": since, "format": "json"})
    with urllib.request.urlopen(base + "render?" + query, timeout=30) as response:
        return {series["target"]: {ts: v for v, ts in series["datapoints"] if v is not None}
                for series in json.load(response)}


def decode_png(data):
    """(width, height, rows of (r, g, b)) of an 8-bit, non-interlaced PNG, with zlib."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG: %r" % data[:40]
    pos, idat, header = 8, [], None
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        chunk = data[pos + 8:pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", chunk)
        elif kind == b"IDAT":
            idat.append(chunk)
        elif kind == b"IEND":
            break
    width, height, depth, color, _, _, interlace = header
    channels = {0: 1, 2: 3, 4: 2, 6: 4}[color]
    assert depth == 8 and interlace == 0, header
    raw = zlib.decompress(b"".join(idat))
    stride = width * channels
    rows, previous = [], bytearray(stride)
    for y in range(height):
        start = y * (stride + 1)
        kind, line = raw[start], bytearray(raw[start + 1:start + 1 + stride])
        for i in range(stride):
            a = line[i - channels] if i >= channels else 0
            b = previous[i]
            if kind == 1:
                line[i] = (line[i] + a) & 255
            elif kind == 2:
                line[i] = (line[i] + b) & 255
            elif kind == 3:
                line[i] = (line[i] + ((a + b) >> 1)) & 255
            elif kind == 4:
                c = previous[i - channels] if i >= channels else 0
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        if channels >= 3:
            rows.append([tuple(line[x * channels:x * channels + 3]) for x in range(width)])
        else:
            rows.append([(line[x * channels],) * 3 for x in range(width)])
        previous = line
    return width, height, rows


def saturated(pixel):
    return max(pixel) - min(pixel) >= 100


def plotted_lines(rows):
    """What graphite drew: the legend's colours (its swatches are solid squares at the
    bottom) and how many pixel columns above the legend hold a plotted line."""
    height, width = len(rows), len(rows[0])
    swatches = {}  # colour -> top row of a 5x5 block of it
    for y in range(height - 4):
        for x in range(width - 4):
            pixel = rows[y][x]
            if saturated(pixel) and all(rows[y + dy][x + dx] == pixel
                                        for dy in range(5) for dx in range(5)):
                swatches[pixel] = min(swatches.get(pixel, height), y)
    if not swatches:
        return {}, 0  # "No Data", or no series with a value: no legend
    legend_top = min(swatches.values()) - 2

    # Above the legend, graphite draws its title, axes, labels and grid in greys and
    # faint tints; anything clearly coloured is a series' line (where several lines
    # overlap, and at an antialiased edge, a blend of their colours and the white).
    columns = {x for y in range(legend_top) for x in range(width)
               if max(rows[y][x]) - min(rows[y][x]) >= 40}
    return swatches, len(columns)


def test_the_demo_page_shows_its_graphs_in_a_browser(running_demo, tmp_path):
    url, run_dir, output = running_demo
    assert re.findall(r"https?://\S+", output()) == [url], "make run prints one URL"
    base = url.split("dashboard/")[0]
    state = demo.demo_dashboard()
    graphs = state["graphs"]
    size = (state["graphSize"]["width"], state["graphSize"]["height"])

    # The render API: every graph has a series with points over SPAN seconds at
    # least (a line that long is a few pixels wide on the page)...
    def every_graph_has_a_line():
        for _, params, _ in graphs:
            for target in params["target"]:
                spans = [max(points) - min(points)
                         for points in render_json(base, target).values() if points]
                if max(spans, default=0) < SPAN:
                    return False
        return True
    wait_for(every_graph_has_a_line, 60, interval=0.5,
             what="%d s of points in every graph of the dashboard" % SPAN)
    # ... and the rejections the demo provokes are counted, by reason.
    rejected = render_json(base, "groupByNode(amproxy.*.rejected.*,3,'sumSeries')")
    for reason in ("badSignature", "skew", "metricNotAllowed"):
        assert sum(rejected[reason].values()) >= 1, (reason, rejected)
    for reason in ("malformed", "unknownKey", "badMetric"):
        assert sum(rejected.get(reason, {}).values()) == 0, (reason, rejected)
    forwarded = render_json(base, "sumSeries(amproxy.*.linesForwarded)")
    assert sum(next(iter(forwarded.values())).values()) >= 2, forwarded

    # The device's points: what whisper holds, and the values the test client sent.
    whisper_file = os.path.join(str(run_dir), "carbon", "storage", "whisper", "metric1.wsp")
    sent = [float(v) for v in SENT.findall(output())]
    wait_for(lambda: len(render_json(base, "metric1")["metric1"]) >= len(sent) >= 2, 10,
             what="the test client's points in the render API")
    points = render_json(base, "metric1")["metric1"]
    (start, _, step), values = whisper.fetch(whisper_file, time.time() - 300)
    stored = {start + i * step: v for i, v in enumerate(values) if v is not None}
    assert stored and set(stored.items()) <= set(points.items()), (stored, points)
    assert not Counter(sent) - Counter(points.values()), (sent, points)

    # graphite-web's "No Data" image (a series nobody sends) passes for no graph.
    query = urllib.parse.urlencode({"target": "nobody.sends.this", "width": size[0],
                                    "height": size[1]})
    with urllib.request.urlopen(base + "render?" + query, timeout=30) as response:
        width, height, rows = decode_png(response.read())
    assert (width, height) == size and plotted_lines(rows) == ({}, 0)

    # The page, in chromium.
    with Chromium(width=1280, height=900) as browser:
        browser.navigate(url)
        images = browser.wait_images("/render?", len(graphs), timeout=30)
        assert len(images) == len(graphs), images
        # It refreshes itself, every 10 s, as the shipped dashboard says.
        assert browser.evaluate("Ext.getCmp('auto-refresh-button').pressed") is True
        assert browser.evaluate("refreshTask.interval") == state["refreshConfig"]["interval"]
        responses = browser.responses()
        (tmp_path / "page.png").write_bytes(browser.screenshot())
        titles = browser.evaluate(
            "Array.from(document.images).filter(i => i.src.indexOf('/render?') >= 0)"
            ".map(i => new URLSearchParams(i.src.split('?')[1]).get('title'))")
        assert titles == [params["title"] for _, params, _ in graphs], titles
        for image in images:
            assert (image["width"], image["height"]) == size, image
            assert image["src"] in responses, (image["src"], sorted(responses))
            request_id, status, mime = responses[image["src"]]
            assert (status, mime) == (200, "image/png"), (image["src"], status, mime)
            body = browser.body(request_id)
            # Kept for a failure's post-mortem, with the page's screenshot.
            (tmp_path / ("graph-%d.png" % images.index(image))).write_bytes(body)
            width, height, rows = decode_png(body)
            assert (width, height) == size
            swatches, columns = plotted_lines(rows)
            title = urllib.parse.parse_qs(urllib.parse.urlsplit(image["src"]).query)["title"]
            assert swatches, "%s: no legend, no series (graphite's No Data image?)" % title
            assert columns >= 5, "%s: a legend but no line plotted (%d columns)" % (title, columns)
