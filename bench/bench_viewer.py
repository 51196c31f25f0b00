"""The browser viewer on a 1,000-slice 512×512 CT series, next to Orthanc's Web Viewer plugin.

    .venv/bin/python bench/bench_viewer.py [--slices 1000] [--runs 3]

For each run a fresh headless Chromium context (empty cache) opens the viewer on loopback:

- macpacs: time to the first image drawn and until every slice is loaded and decoded
  (``window.macpacsViewer.stats``, ms since navigation start); scroll rate through the loaded
  stack, one slice per requestAnimationFrame for 3 s; and the cost of drawing one slice.
- Orthanc 1.10 + Debian's ``orthanc-webviewer`` plugin (when installed): the same series opened
  in its viewer; first image and slices loaded are read from the browser's resource timings of
  its ``/web-viewer/instances/`` requests (it has no hook for "drawn"). It loads slices only when
  shown, so the script scrolls with the mouse wheel (one step per ~16 ms) until every slice has
  been fetched: "all loaded" then means "scrolled through the whole stack".

Both servers hold the same files, loaded before timing starts. Medians of the runs are printed
and written to bench/results/viewer.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import DATA, MACPACS, ORTHANC_PLUGINS, ROOT, Macpacs, Orthanc, ct_series, send_parallel, split
from tests.chromium import CHROMIUM, CHROMIUM_ARGS

WEBVIEWER = ORTHANC_PLUGINS / "libOrthancWebViewer.so"

SCROLL_JS = """async (seconds) => {
    const vp = window.macpacsViewer.active;
    const n = vp.stack.frames.length;
    // Cost of one slice: window/level through the LUT, putImageData, drawImage.
    const t = performance.now();
    for (let i = 0; i < 100; i++) { vp.index = i % n; vp.render(); }
    const drawMs = (performance.now() - t) / 100;
    // Scroll: a new slice every animation frame, as fast as the browser paints.
    return await new Promise((resolve) => {
        let frames = 0;
        const start = performance.now();
        const step = (now) => {
            if (now - start >= seconds * 1000) {
                resolve({ fps: frames / ((now - start) / 1000), drawMs });
                return;
            }
            vp.index = (vp.index + 1) % n;
            vp.render();
            frames++;
            requestAnimationFrame(step);
        };
        requestAnimationFrame(step);
    });
}"""

ORTHANC_JS = """() => performance.getEntriesByType("resource")
    .filter((e) => e.name.includes("/web-viewer/instances/"))
    .map((e) => e.responseEnd)"""


class OrthancWebViewer(Orthanc):
    name = "orthanc-webviewer"

    def __init__(self, workdir: Path) -> None:
        webviewer = {"CachePath": str(workdir / "webviewer-cache"), "Threads": 2}
        super().__init__(workdir, Plugins=[str(WEBVIEWER)], WebViewer=webviewer)


def uids(folder: Path) -> tuple[str, str]:
    import pydicom

    ds = pydicom.dcmread(next(folder.glob("*.dcm")), stop_before_pixels=True)
    return ds.StudyInstanceUID, ds.SeriesInstanceUID


def bench_macpacs(browser, folder: Path, runs: int, count: int) -> dict:
    work = DATA / "viewer-macpacs"
    server = Macpacs(work)
    subprocess.run(["rm", "-rf", str(work)], check=True)
    subprocess.run(
        [MACPACS, "import", "--data-dir", str(server.data_dir), str(folder)], check=True, capture_output=True
    )
    server.start(fresh=False)
    study, series = uids(folder)
    url = f"http://127.0.0.1:{server.web_port}/viewer/{study}?series={series}"
    results = []
    try:
        for run in range(-1, runs):  # run -1 warms the server up (imports, page cache) and is not counted
            context = browser.new_context(viewport={"width": 1280, "height": 900})
            page = context.new_page()
            page.goto(url)
            page.wait_for_function(
                "window.macpacsViewer && window.macpacsViewer.stats.allLoadedMs !== null", timeout=300_000
            )
            stats = page.evaluate("window.macpacsViewer.stats")
            assert stats["total"] == count and stats["loaded"] == count, stats
            # Measured like Orthanc's below: when the first frame's response ended.
            stats["firstResponseMs"] = page.evaluate(
                """() => Math.min(...performance.getEntriesByType("resource")
                    .filter((e) => e.name.includes("/frames/")).map((e) => e.responseEnd))"""
            )
            scroll = page.evaluate(SCROLL_JS, 3)
            context.close()
            if run < 0:
                continue
            results.append({**stats, **scroll})
            print(
                f"macpacs run {run + 1}: first image {stats['firstImageMs']:.0f} ms (response "
                f"{stats['firstResponseMs']:.0f} ms), all {count} loaded "
                f"{stats['allLoadedMs']:.0f} ms, scroll {scroll['fps']:.1f} fps, draw {scroll['drawMs']:.2f} ms"
            )
    finally:
        server.stop()
    return {
        "first_image_ms": statistics.median(r["firstImageMs"] for r in results),
        "first_image_response_ms": statistics.median(r["firstResponseMs"] for r in results),
        "metadata_ms": statistics.median(r["metadataMs"] for r in results),
        "all_loaded_ms": statistics.median(r["allLoadedMs"] for r in results),
        "scroll_fps": statistics.median(r["fps"] for r in results),
        "draw_ms": statistics.median(r["drawMs"] for r in results),
    }


def bench_orthanc(browser, folder: Path, runs: int, count: int, wait_s: float) -> dict | None:
    if not WEBVIEWER.exists():
        print("Orthanc Web Viewer plugin not installed (apt-get install orthanc-webviewer): skipped")
        return None
    server = OrthancWebViewer(DATA / "viewer-orthanc").start()
    try:
        send_parallel(server.port, server.aet, split(folder, 4))
        base = f"http://127.0.0.1:{server.http_port}"
        series_ids = json.load(urllib.request.urlopen(f"{base}/series"))
        url = f"{base}/web-viewer/app/viewer.html?series={series_ids[0]}"
        results = []
        for run in range(runs):
            context = browser.new_context(viewport={"width": 1280, "height": 900})
            context.add_init_script("performance.setResourceTimingBufferSize(100000)")
            page = context.new_page()
            page.goto(url)
            page.wait_for_function(f"({ORTHANC_JS})().length > 0", timeout=60_000)
            # It loads slices on demand: scroll through the stack with the wheel, as a reader would.
            box = page.locator("canvas").first.bounding_box()
            page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
            deadline = time.monotonic() + wait_s
            ends: list[float] = []
            while time.monotonic() < deadline:
                page.mouse.wheel(0, 100)
                page.wait_for_timeout(16)
                ends = page.evaluate(ORTHANC_JS)
                if len(ends) >= count:
                    break
            ends = sorted(page.evaluate(ORTHANC_JS))
            result = {
                "first": ends[0] if ends else None,
                "loaded": len(ends),
                "all": ends[count - 1] if len(ends) >= count else None,
            }
            results.append(result)
            print(
                f"orthanc run {run + 1}: first image response {result['first']} ms, "
                f"{result['loaded']} of {count} slices fetched within {wait_s:.0f} s, all: {result['all']}"
            )
            context.close()
    finally:
        server.stop()
    firsts = [r["first"] for r in results if r["first"] is not None]
    alls = [r["all"] for r in results if r["all"] is not None]
    return {
        "first_image_response_ms": statistics.median(firsts) if firsts else None,
        "slices_fetched_in_window": statistics.median(r["loaded"] for r in results),
        "all_loaded_ms": statistics.median(alls) if len(alls) == len(results) else None,
        "window_s": wait_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--orthanc-wait", type=float, default=240.0, help="seconds to let Orthanc's viewer load")
    parser.add_argument("--no-orthanc", action="store_true", help="measure macpacs only")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    folder = ct_series(args.slices)
    out = {"slices": args.slices, "runs": args.runs}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        out["macpacs"] = bench_macpacs(browser, folder, args.runs, args.slices)
        if not args.no_orthanc:
            out["orthanc_webviewer"] = bench_orthanc(browser, folder, args.runs, args.slices, args.orthanc_wait)
        browser.close()
    print(json.dumps(out, indent=2))
    results = ROOT / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / "viewer.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
