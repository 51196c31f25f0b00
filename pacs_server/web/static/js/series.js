// A series being viewed: metadata once, then every frame over WADO-RS. All frames stream in one
// request (the series "pixeldata" resource) while one more request at a time fetches the slice
// on screen if it has not arrived yet; a server without that resource gets one request per
// frame, several in flight, nearest to the current slice first. Shared by the viewports showing
// the same series.

import {
  HttpError,
  firstPart,
  frame as fetchFrame,
  seriesMetadata,
  seriesPixelData,
  TAG,
  transferSyntaxes,
} from "./dicomweb.js";
import { buildStack, decodePixels, paletteFrom } from "./imaging.js";

const CONCURRENCY = 6; // Chromium's HTTP/1.1 connections per host: more would only queue.
const NEAR = 2; // while streaming, slices this close to the shown one are also fetched on their own

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
    this.streaming = false;
    this.wakeUp = null;
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
        const [metadata, syntaxes] = await Promise.all([
          seriesMetadata(this.study, this.series, this.controller.signal),
          transferSyntaxes(this.study, this.series, this.controller.signal),
        ]);
        this.frames = buildStack(metadata, this.study, this.series, syntaxes);
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
      this.stream();
    })();
    return this.ready;
  }

  /** The whole series in one request, plus a worker for the slice on screen; else per frame. */
  async stream() {
    const byKey = new Map(this.frames.map((f, i) => [`${f.sop}/${f.frame}`, i]));
    // The slice on screen first, alone: the stream would otherwise slow its request down.
    await this.load(this.nextIndex(0));
    if (this.controller.signal.aborted) return;
    this.streaming = true;
    this.focusWorker();
    try {
      await seriesPixelData(
        this.study,
        this.series,
        (sop, number, bytes) => {
          const i = byKey.get(`${sop}/${number}`);
          if (i === undefined || this.frames[i].pixels) return;
          this.requested[i] = 1;
          this.accept(i, bytes);
        },
        this.controller.signal,
      );
    } catch (err) {
      if (err.name === "AbortError") return;
      if (err instanceof HttpError && err.status === 401) {
        this.fail(err);
        return;
      }
      // No such resource here (another DICOMweb server) or a broken stream: per-frame requests.
    } finally {
      this.streaming = false;
      this.wake();
    }
    for (let i = 0; i < Math.min(CONCURRENCY, this.frames.length); i++) this.worker();
  }

  /** While the series streams: fetch the shown slice (and its neighbours) on their own. */
  async focusWorker() {
    while (this.streaming) {
      const i = this.nextIndex(NEAR);
      if (i < 0) {
        await new Promise((resolve) => (this.wakeUp = resolve));
        continue;
      }
      await this.load(i);
    }
  }

  wake() {
    if (this.wakeUp) {
      const resolve = this.wakeUp;
      this.wakeUp = null;
      resolve();
    }
  }

  /** Decode a frame that arrived; a frame that cannot be decoded is reported on its own. */
  accept(i, bytes) {
    const f = this.frames[i];
    try {
      f.pixels = decodePixels(f, bytes);
    } catch (err) {
      f.error = err;
      this.failed++;
      this.emit("frame-error", i);
      this.checkDone();
      return;
    }
    this.loaded++;
    if (this.timing.first === null) this.timing.first = performance.now() - this.timing.start;
    this.emit("frame", i);
    this.checkDone();
  }

  checkDone() {
    if (this.loaded + this.failed === this.frames.length && this.timing.all === null) {
      this.timing.all = performance.now() - this.timing.start;
      this.emit("done", -1);
    }
  }

  fail(err) {
    this.error = err;
    this.emit("error", -1);
    this.controller.abort();
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
    this.wake();
  }

  /** The unrequested slice nearest to the focus (within `limit` slices), or -1. */
  nextIndex(limit = Infinity) {
    const n = this.frames.length;
    for (let d = 0; d < Math.min(n, limit + 1); d++) {
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
      if (i < 0 || this.controller.signal.aborted) return;
      await this.load(i);
    }
  }

  /** Fetch one frame on its own request. */
  async load(i) {
    this.requested[i] = 1;
    const f = this.frames[i];
    let bytes;
    try {
      bytes = await fetchFrame(f.study, f.series, f.sop, f.frame, this.controller.signal);
    } catch (err) {
      if (err.name === "AbortError") return;
      if (f.pixels) return; // the stream brought it meanwhile
      f.error = err;
      this.failed++;
      this.emit("frame-error", i);
      // Deleted study or expired session: every other request would fail the same way.
      if (err instanceof HttpError && (err.status === 404 || err.status === 401)) this.fail(err);
      else this.checkDone();
      return;
    }
    if (!f.pixels) this.accept(i, bytes); // unless the stream was faster
  }

  cancel() {
    this.controller.abort();
  }
}
