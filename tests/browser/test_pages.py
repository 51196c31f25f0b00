"""The pages in a real Chromium against a real server: login, search, viewer, nodes, register, upload.

Tests in this module share one server and run in file order (later ones delete a study).
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

from pydicom.data import get_testdata_file

from .conftest import ADMIN, Site, Storescp, login, shot


def viewer_ready(page) -> None:
    page.wait_for_function("window.macpacsViewer && window.macpacsViewer.stats.allLoadedMs !== null", timeout=30_000)


def to_screen(page, x: float, y: float) -> tuple[float, float]:
    """Page coordinates of image pixel (x, y) in the active viewport."""
    return tuple(
        page.evaluate(
            """([x, y]) => {
                const vp = window.macpacsViewer.active;
                const t = vp.transform();
                const r = vp.canvas.getBoundingClientRect();
                return [r.left + t.ox + x * t.scale, r.top + t.oy + y * t.scale];
            }""",
            [x, y],
        )
    )


def drag(page, start: tuple[float, float], end: tuple[float, float]) -> None:
    page.mouse.move(*start)
    page.mouse.down()
    page.mouse.move((start[0] + end[0]) / 2, (start[1] + end[1]) / 2, steps=3)
    page.mouse.move(*end, steps=3)
    page.mouse.up()


def snapshot(page) -> dict:
    return page.evaluate("window.macpacsViewer.snapshot()")


def test_login_wrong_password_then_right_then_logout(site: Site, page) -> None:
    login(page, site, password="wrong password")
    assert "Wrong user name or password" in page.inner_text("#login-error")
    login(page, site)
    page.wait_for_url(re.compile(r"/studies"))
    assert ADMIN in page.inner_text(".who")
    page.click(".who button")
    page.wait_for_url(re.compile(r"/login\?logged_out=1"))
    assert "logged out" in page.inner_text("#flash")


def test_expired_session_goes_to_login_with_a_message(site: Site, page) -> None:
    page.context.add_cookies([{"name": "macpacs_session", "value": "expired.or.forged", "url": site.url}])
    page.goto(f"{site.url}/nodes")
    page.wait_for_url(re.compile(r"/login\?next=%2Fnodes&expired=1"))
    assert "session has expired" in page.inner_text("#flash")


def test_form_without_csrf_token_is_refused(site: Site, page) -> None:
    response = page.request.post(f"{site.url}/login", form={"username": ADMIN, "password": "x"})
    assert response.status == 403
    assert "CSRF" in response.text()


def test_study_list_search_sort_and_presets(site: Site, page) -> None:
    page.goto(f"{site.url}/studies")
    page.wait_for_selector("#studies tbody tr")
    assert page.inner_text("#count") == "2 studies"
    shot(page, "study-list.png")
    page.fill("input[name=name]", "roe")
    page.click("button[type=submit]")
    page.wait_for_function("document.getElementById('count').textContent === '1 study'")
    assert "ROE^JANE" in page.inner_text("#studies tbody")
    page.click("button[type=reset]")
    page.wait_for_function("document.getElementById('count').textContent === '2 studies'")
    page.select_option("select[name=modality]", "MR")
    page.click("button[type=submit]")
    page.wait_for_function("document.getElementById('count').textContent === '1 study'")
    page.select_option("select[name=modality]", "")
    page.click("[data-preset=today]")  # the test studies are from 2024
    page.wait_for_function("document.getElementById('count').textContent === '0 studies'")
    assert "No study matches" in page.inner_text("#list-message")
    page.click("[data-preset=any]")
    page.wait_for_function("document.getElementById('count').textContent === '2 studies'")
    page.click("th[data-sort=PatientName]")
    page.wait_for_selector("th[data-sort=PatientName].asc")
    first = page.inner_text("#studies tbody tr:first-child td:first-child")
    page.click("th[data-sort=PatientName]")
    page.wait_for_selector("th[data-sort=PatientName].desc")
    page.wait_for_function(f"document.querySelector('#studies tbody tr td').textContent !== {first!r}")
    assert [first, page.inner_text("#studies tbody tr:first-child td:first-child")] == ["DOE^JOHN", "ROE^JANE"]


def test_viewer_scroll_window_level_measure(site: Site, page) -> None:
    page.goto(f"{site.url}/studies?name=doe")
    page.click("#studies tbody a >> text=DOE^JOHN")
    page.wait_for_selector("#open-viewer")
    assert "30" in page.inner_text(".series-card")
    with page.expect_download() as download:
        page.click("#download-zip")
    with zipfile.ZipFile(download.value.path()) as archive:
        names = archive.namelist()
    assert len(names) == 30 and all(
        n.startswith("DOE_JOHN_PID001/20240115_CT_CHEST/001_CT_AXIAL_5mm/IM") for n in names
    )
    page.click("#open-viewer")
    viewer_ready(page)
    state = snapshot(page)
    assert state["total"] == 30 and state["loaded"] == 30 and state["shown"]
    assert state["win"] == {"center": 40, "width": 400}  # the file's VOI
    assert page.evaluate("window.macpacsViewer.stats.firstImageMs") > 0

    # Scroll: wheel, arrows, slider.
    page.mouse.move(*to_screen(page, 128, 128))
    page.mouse.wheel(0, 120)
    page.wait_for_function("window.macpacsViewer.snapshot().index === 3")
    page.keyboard.press("ArrowDown")
    page.keyboard.press("ArrowDown")
    page.wait_for_function("window.macpacsViewer.snapshot().index === 5")
    page.keyboard.press("End")
    page.wait_for_function("window.macpacsViewer.snapshot().index === 29")
    page.fill(".viewport input[type=range]", "15")
    page.wait_for_function("window.macpacsViewer.snapshot().index === 15")

    # Window/level by dragging, then the lung preset from the keyboard.
    drag(page, to_screen(page, 128, 128), to_screen(page, 160, 150))
    win = snapshot(page)["win"]
    assert win["width"] > 400 and win["center"] > 40
    page.keyboard.press("2")
    page.wait_for_function("window.macpacsViewer.snapshot().win.center === -600")
    assert snapshot(page)["win"] == {"center": -600, "width": 1500}
    # The overlay is redrawn on the next animation frame after the state changes: wait for it.
    page.wait_for_function("document.querySelector('.ov-br').innerText.includes('WW 1500  WL -600')")
    assert "DOE, JOHN" in page.inner_text(".ov-tl") and "Im 16 / 30" in page.inner_text(".ov-bl")
    shot(page, "viewer-ct-lung.png")

    # Distance: 100 pixels of 0.8 mm.
    page.click("[data-tool=length]")
    drag(page, to_screen(page, 50, 200), to_screen(page, 150, 200))
    label = snapshot(page)["labels"][-1]
    assert re.fullmatch(r"\d+\.\d mm", label) and abs(float(label.split()[0]) - 80.0) < 1.5, label

    # Ellipse ROI inside the left lung: exactly -850 HU, SD 0.
    page.keyboard.press("e")
    drag(page, to_screen(page, 70, 113), to_screen(page, 86, 133))
    label = snapshot(page)["labels"][-1]
    assert label.startswith("mean -850.0 HU  SD 0.0  area "), label
    page.keyboard.press("t")
    drag(page, to_screen(page, 120, 100), to_screen(page, 136, 116))  # soft tissue between the lungs
    assert snapshot(page)["labels"][-1].startswith("mean 40.0 HU  SD 0.0"), snapshot(page)["labels"]
    shot(page, "viewer-ct-measure.png")

    # Zoom, invert, reset, cine.
    page.keyboard.press("i")
    page.wait_for_function("window.macpacsViewer.snapshot().invert === true")
    page.keyboard.press("r")
    page.wait_for_function("window.macpacsViewer.snapshot().invert === false")
    page.keyboard.press(" ")
    page.wait_for_function("window.macpacsViewer.snapshot().index !== 15")
    page.keyboard.press(" ")
    assert not page.errors


def test_viewer_series_layout_and_color(site: Site, page) -> None:
    page.goto(f"{site.url}/studies?name=roe")
    page.click("#studies tbody a >> text=View")
    viewer_ready(page)
    page.click("[data-layout='2x2']")
    assert page.locator(".viewport").count() == 4
    page.click("[data-layout='1x1']")
    assert snapshot(page)["total"] == 4
    assert not page.errors


def test_nodes_add_test_duplicate_and_unreachable(site: Site, page, storescp: Storescp) -> None:
    login(page, site, next_path="/nodes")
    page.wait_for_url(re.compile(r"/nodes$"))
    form = "#node-form"

    def add(name: str, ae: str, port: str) -> None:
        page.fill(f"{form} input[name=name]", name)
        page.fill(f"{form} input[name=ae_title]", ae)
        page.fill(f"{form} input[name=host]", "127.0.0.1")
        page.fill(f"{form} input[name=port]", port)
        page.click("#save-node")

    add("viewer-ws", storescp.ae_title, str(storescp.port))
    page.wait_for_selector("tr[data-node=viewer-ws]")
    page.click("tr[data-node=viewer-ws] button.test")
    page.wait_for_function(
        "document.querySelector('tr[data-node=viewer-ws] .echo-result').textContent.startsWith('OK')", timeout=30_000
    )
    assert re.fullmatch(r"OK, \d+\.\d ms", page.inner_text("tr[data-node=viewer-ws] .echo-result"))
    shot(page, "config-nodes.png")
    page.click("tr[data-node=viewer-ws] >> text=Edit")
    assert page.input_value(f"{form} input[name=ae_title]") == storescp.ae_title
    page.fill(f"{form} input[name=description]", "reading room 2")
    page.click("#save-node")
    page.wait_for_function("document.querySelector('tr[data-node=viewer-ws]').textContent.includes('reading room 2')")

    add("other", storescp.ae_title, "104")
    page.wait_for_function("document.getElementById('form-message').textContent.includes('already used')")
    add("other", "OTHER", "70000")
    page.wait_for_function("document.getElementById('form-message').textContent.includes('not a TCP port')")
    add("nobody", "NOBODY", "1")  # nothing listens on port 1
    page.wait_for_selector("tr[data-node=nobody]")
    page.click("tr[data-node=nobody] button.test")
    page.wait_for_function(
        "document.querySelector('tr[data-node=nobody] .echo-result').textContent.startsWith('Failed')", timeout=60_000
    )
    assert "is its DICOM listener running?" in page.inner_text("tr[data-node=nobody] .echo-result")
    page.on("dialog", lambda dialog: dialog.accept())
    page.click("tr[data-node=nobody] button.danger")
    page.wait_for_selector("tr[data-node=nobody]", state="detached")
    assert not page.errors


def test_register_workstation_pending_then_approved(site: Site, page, storescp: Storescp) -> None:
    page.goto(f"{site.url}/register")
    assert page.input_value("input[name=host]") == "127.0.0.1"
    assert "waits for an administrator" in page.inner_text("main")
    page.fill("input[name=ae_title]", "WS2")
    page.fill("input[name=port]", "1")
    page.click("form[action='/register'] button")
    assert "C-ECHO to WS2 at 127.0.0.1:1 failed" in page.inner_text("#register-result")
    assert "Nothing was saved" in page.inner_text("#register-result")
    page.evaluate("document.querySelector('input[name=port]').type = 'text'")
    page.fill("input[name=port]", "12x")
    page.click("form[action='/register'] button")
    assert "is not a number" in page.inner_text("#register-result")
    page.fill("input[name=port]", str(storescp.port))
    page.click("form[action='/register'] button")
    assert "waits for an administrator's approval" in page.inner_text("#register-result")

    login(page, site, next_path="/nodes")
    page.wait_for_selector("tr[data-node=WS2] .badge.pending")
    page.click("tr[data-node=WS2] >> text=Approve")
    page.wait_for_selector("tr[data-node=WS2] .badge.active")


def test_upload_dicom_and_non_dicom(site: Site, page, tmp_path: Path) -> None:
    junk = tmp_path / "notes.txt"
    junk.write_text("not an image")
    page.goto(f"{site.url}/upload")
    page.set_input_files("#files", [get_testdata_file("CT_small.dcm"), str(junk)])
    page.wait_for_function("document.getElementById('upload-status').textContent === 'done'")
    assert page.inner_text("#upload-message") == "1 file stored, 1 not DICOM (skipped)."
    assert "no DICM marker" in page.inner_text("#upload-problems")
    # Dropping goes through the same checks (a synthetic drop: Playwright cannot drag from the desktop).
    page.evaluate(
        """() => {
            const dt = new DataTransfer();
            dt.items.add(new File(["hello"], "readme.txt", { type: "text/plain" }));
            const zone = document.getElementById("dropzone");
            zone.dispatchEvent(new DragEvent("drop", { dataTransfer: dt, bubbles: true, cancelable: true }));
        }"""
    )
    page.wait_for_function("document.getElementById('upload-status').textContent === 'done'")
    assert page.inner_text("#upload-message") == "0 files stored, 1 not DICOM (skipped)."
    assert "readme.txt" in page.inner_text("#upload-problems")
    page.goto(f"{site.url}/studies")
    page.wait_for_function("document.getElementById('count').textContent === '3 studies'")


def test_status_page(site: Site, page) -> None:
    page.goto(f"{site.url}/status")
    text = page.inner_text("main")
    assert f"MACPACS\t127.0.0.1\t{site.server.dicom_port}\tmacpacs archive" == page.text_content("#locations-line")
    assert re.search(r"Studies\s+3", text) and re.search(r"Instances\s+35", text)
    assert "healthy" in text
    assert "the archive refuses images under" in page.inner_text("#disk-warning")
    assert page.inner_text("#supervisor") == (
        "healthy, last check 2026-11-26T00:00:00+00:00: all probes passed; 1 restart(s) in 24 h"
    )
    assert "C-ECHO viewer-ws" in page.inner_text("#associations")  # logged by the nodes test's echo
    assert "C-ECHO to WS2@127.0.0.1:1 failed" in page.inner_text("#errors")  # the failed registration


def test_send_then_delete_while_open(site: Site, page, storescp: Storescp) -> None:
    login(page, site)
    page.goto(f"{site.url}/studies?name=doe")
    page.click("#studies tbody a >> text=DOE^JOHN")
    page.select_option("#send-node", "viewer-ws")
    page.click("#send")
    page.wait_for_function("document.getElementById('study-message').textContent.startsWith('Sent')", timeout=60_000)
    assert page.inner_text("#study-message") == "Sent 30 images to viewer-ws."
    assert len(list(storescp.folder.glob("CT.*"))) == 30

    # A second tab has the viewer open on the study when the admin deletes it.
    study_url = page.url
    viewer = page.context.new_page()
    viewer.goto(site.url + page.get_attribute("#open-viewer", "href"))
    viewer_ready(viewer)
    page.on("dialog", lambda dialog: dialog.accept())
    page.click("#delete")
    page.click("#confirm-delete-button")
    page.wait_for_url(re.compile(r"/studies$"))
    page.wait_for_function("document.getElementById('list-message').textContent.startsWith('Study deleted')")
    assert page.inner_text("#list-message") == "Study deleted: 30 images in 1 series removed."
    # The open viewer keeps what it loaded; the next request to the server says the study is gone.
    viewer.keyboard.press("]")
    viewer.reload()
    viewer.wait_for_selector("#viewer-message:not([hidden])")
    assert "(deleted meanwhile?)" in viewer.inner_text("#viewer-message")
    page.goto(study_url)
    assert "is not in the archive (it may have been deleted)" in page.inner_text("#page-message")


def rendered_rgb(page, index: int, points: list[tuple[int, int]]) -> list[list[int]]:
    """The viewer's own RGB output for image ``index`` of the active viewport at (x, y) points."""
    page.evaluate(f"window.macpacsViewer.active.setIndex({index})")
    return page.evaluate(
        """(points) => {
            const vp = window.macpacsViewer.active;
            vp.render();
            return points.map(([x, y]) => {
                const v = vp.image32[y * vp.image.width + x];
                return [v & 255, (v >>> 8) & 255, (v >>> 16) & 255];
            });
        }""",
        points,
    )


def test_viewer_compressed_color_palette_multiframe(site: Site, page) -> None:
    """JPEG YBR_FULL_422 multi-frame, RLE planar RGB, palette colour and JPEG 2000 as the viewer shows them.

    The colours drawn must be those pydicom decodes from the same files: this is what proves the
    viewer reads server-decoded frames as interleaved RGB and applies palettes itself.
    """
    import numpy as np
    import pydicom
    from pydicom.pixels import apply_color_lut

    names = ["examples_ybr_color.dcm", "SC_rgb_rle_2frame.dcm", "examples_palette.dcm", "JPEG2000.dcm"]
    files = [get_testdata_file(n) for n in names]
    page.goto(f"{site.url}/upload")
    page.set_input_files("#files", files)
    page.wait_for_function("document.getElementById('upload-status').textContent === 'done'")
    assert page.inner_text("#upload-message") == "4 files stored."
    for name, path in zip(names, files, strict=True):
        ds = pydicom.dcmread(path)
        page.goto(f"{site.url}/viewer/{ds.StudyInstanceUID}?series={ds.SeriesInstanceUID}")
        viewer_ready(page)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        state = snapshot(page)
        assert state["total"] == frames and state["loaded"] == frames and state["shown"], (name, state)
        if ds.PhotometricInterpretation.startswith("MONOCHROME"):
            continue
        arr = ds.pixel_array if frames > 1 else ds.pixel_array[np.newaxis]
        if ds.PhotometricInterpretation == "PALETTE COLOR":
            arr = apply_color_lut(arr, ds) >> 8
        elif arr.dtype.itemsize > 1:
            arr = arr >> (ds.BitsStored - 8)
        frame = frames - 1
        rng = np.random.default_rng(7)
        points = [
            (int(x), int(y)) for x, y in zip(rng.integers(0, ds.Columns, 12), rng.integers(0, ds.Rows, 12), strict=True)
        ]
        got = rendered_rgb(page, frame, points)
        want = [[int(v) for v in arr[frame][y, x]] for x, y in points]
        assert np.abs(np.array(got) - np.array(want)).max() <= 2, (name, got, want)
    assert not page.errors


def _parts(body: bytes, content_type: str) -> list[tuple[dict[str, str], bytes]]:
    boundary = re.search(r"boundary=([^;]+)", content_type).group(1).strip('"').encode()
    out = []
    for chunk in body.split(b"--" + boundary)[1:-1]:
        head, _, data = chunk.lstrip(b"\r\n").partition(b"\r\n\r\n")
        headers = dict(line.split(": ", 1) for line in head.decode().split("\r\n"))
        out.append(({k.lower(): v for k, v in headers.items()}, data[:-2]))
    return out


def test_series_pixeldata_is_every_frame_as_frames_gives_it(site: Site, page) -> None:
    """The series "pixeldata" stream the viewer uses: same bytes as /frames, bad requests refused."""
    import pydicom

    ds = pydicom.dcmread(get_testdata_file("examples_ybr_color.dcm"), stop_before_pixels=True)
    series_url = f"{site.url}/dicom-web/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
    accept = {"Accept": 'multipart/related; type="application/octet-stream"; transfer-syntax=1.2.840.10008.1.2.1'}
    response = page.request.get(f"{series_url}/pixeldata", headers=accept)
    assert response.status == 200
    parts = _parts(response.body(), response.headers["content-type"])
    assert len(parts) == 30
    for n in (1, 17, 30):
        headers, data = parts[n - 1]
        assert headers["content-location"].endswith(f"/instances/{ds.SOPInstanceUID}/frames/{n}")
        assert int(headers["content-length"]) == len(data) == 240 * 320 * 3
        single = page.request.get(headers["content-location"], headers=accept)
        assert _parts(single.body(), single.headers["content-type"])[0][1] == data
    assert page.request.get(f"{series_url}/pixeldata", headers={"Accept": "image/jpeg"}).status == 406
    missing = page.request.get(f"{site.url}/dicom-web/studies/1.2.3/series/4.5.6/pixeldata", headers=accept)
    assert missing.status == 404 and "not in the archive" in missing.text()
    assert page.request.get(f"{site.url}/dicom-web/studies/1.2.3/series/x'or/pixeldata").status == 400
