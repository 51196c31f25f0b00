// A series being viewed: metadata once, then every frame over WADO-RS, several requests in
// flight, nearest-to-the-current-slice first. Shared by the viewports showing the same series.

import { HttpError, firstPart, frame as fetchFrame, seriesMetadata, TAG } from "./dicomweb.js";
import { buildStack, decodePixels, paletteFrom } from "./imaging.js";

const CONCURRENCY = 6; // Chromium's HTTP/1.1 connections per host: more would only queue.

export class SeriesStack {
  constructor(study, series) {
    this.study = study;
    this.series = series;
    this.frames = [];
    this.loaded = 0;
    this.failed = 0;
    this.error = null;
    this.focus = 0;
    this.listeners = new Set();
    this.controller = new AbortController();
    this.requested = null;
    this.ready = null; // promise: metadata known
    this.timing = { start: performance.now(), metadata: null, first: null, all: null };
  }

  /** `fn(event, index)` with event "metadata", "frame", "error", "done". */
  subscribe(fn) {
    this.listeners.add(fn);
    return () => this.listeners.delete(fn);
  }

  emit(event, index) {
    for (const fn of this.listeners) fn(event, index);
  }

  start(focus = 0) {
    if (this.ready) return this.ready;
    this.ready = (async () => {
      try {
        const metadata = await seriesMetadata(this.study, this.series, this.controller.signal);
        this.frames = buildStack(metadata, this.study, this.series);
        if (!this.frames.length) throw new Error("this series has no images the viewer can show");
        await this.loadPalettes();
      } catch (err) {
        this.error = err;
        this.emit("error", -1);
        throw err;
      }
      this.timing.metadata = performance.now() - this.timing.start;
      this.focus = Math.min(focus, this.frames.length - 1);
      this.requested = new Uint8Array(this.frames.length);
      this.emit("metadata", -1);
      for (let i = 0; i < Math.min(CONCURRENCY, this.frames.length); i++) this.worker();
    })();
    return this.ready;
  }

  /** Palette colour tables given as bulk data: fetched once per distinct URI. */
  async loadPalettes() {
    const cache = new Map();
    for (const f of this.frames) {
      if (f.photometric !== "PALETTE COLOR") continue;
      const fetched = {};
      for (const tag of [TAG.RedPaletteData, TAG.GreenPaletteData, TAG.BluePaletteData]) {
        const uri = f.ds[tag] && f.ds[tag].BulkDataURI;
        if (!uri) continue;
        if (!cache.has(uri)) {
          cache.set(
            uri,
            fetch(uri, { headers: { Accept: "multipart/related; type=\"application/octet-stream\"" }, signal: this.controller.signal }).then(
              async (r) => firstPart(await r.arrayBuffer(), r.headers.get("Content-Type")),
            ),
          );
        }
        fetched[tag] = await cache.get(uri);
      }
      f.palette = paletteFrom(f.ds, fetched);
    }
  }

  /** Move the loading front to `index` (the user scrolled somewhere not loaded yet). */
  prioritize(index) {
    this.focus = index;
  }

  nextIndex() {
    const n = this.frames.length;
    for (let d = 0; d < n; d++) {
      const ahead = this.focus + d;
      if (ahead < n && !this.requested[ahead]) return ahead;
      const behind = this.focus - d - 1;
      if (behind >= 0 && !this.requested[behind]) return behind;
    }
    return -1;
  }

  async worker() {
    for (;;) {
      const i = this.nextIndex();
      if (i < 0) return;
      this.requested[i] = 1;
      const f = this.frames[i];
      try {
        const bytes = await fetchFrame(f.study, f.series, f.sop, f.frame, this.controller.signal);
        f.pixels = decodePixels(f, bytes);
        this.loaded++;
        if (this.timing.first === null) this.timing.first = performance.now() - this.timing.start;
        this.emit("frame", i);
      } catch (err) {
        if (err.name === "AbortError") return;
        f.error = err;
        this.failed++;
        this.emit("frame-error", i);
        if (err instanceof HttpError && (err.status === 404 || err.status === 401)) {
          // Deleted study or expired session: every other request would fail the same way.
          this.error = err;
          this.emit("error", i);
          this.controller.abort();
          return;
        }
      }
      if (this.loaded + this.failed === this.frames.length) {
        this.timing.all = performance.now() - this.timing.start;
        this.emit("done", -1);
      }
    }
  }

  cancel() {
    this.controller.abort();
  }
}
