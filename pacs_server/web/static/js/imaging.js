// Pixels: the stack of frames of a series, raw values → typed arrays, window/level through a
// lookup table, colour (RGB, YBR, palette), and ROI statistics in modality units (HU for CT).
// Everything works on the stored values, so window/level never goes back to the server.

import { TAG, num, val, vals } from "./dicomweb.js";

const UNCOMPRESSED = new Set(["1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99"]);
// Photometric interpretations that exist only in compressed data.
const COMPRESSED_ONLY_YBR = new Set(["YBR_FULL_422", "YBR_PARTIAL_422", "YBR_PARTIAL_420", "YBR_ICT", "YBR_RCT"]);

/**
 * Whether the server decoded this instance's frames: then they arrive interleaved, with YBR
 * already turned into RGB (pydicom's decoders do that), whatever the file's PlanarConfiguration
 * and PhotometricInterpretation say. Uncompressed files arrive exactly as stored. `storedTs`
 * comes from /api/ui/.../transfer-syntaxes; without it, YBR forms that only compressed data
 * has are the hint.
 */
function serverDecoded(storedTs, photometric) {
  if (storedTs) return !UNCOMPRESSED.has(storedTs);
  return COMPRESSED_ONLY_YBR.has(photometric);
}

/** One displayable frame of a series, with what is needed to draw and measure it. */
function frameEntry(ds, frameNumber, study, series, syntaxes) {
  const spacing = vals(ds, TAG.PixelSpacing).length ? vals(ds, TAG.PixelSpacing) : vals(ds, TAG.ImagerPixelSpacing);
  const position = vals(ds, TAG.ImagePositionPatient).map(Number);
  const orientation = vals(ds, TAG.ImageOrientationPatient).map(Number);
  const photometric = (val(ds, TAG.PhotometricInterpretation) || "MONOCHROME2").trim();
  const decoded = serverDecoded(syntaxes[val(ds, TAG.SOPInstanceUID)], photometric);
  const wc = vals(ds, TAG.WindowCenter).map(Number).filter(Number.isFinite);
  const ww = vals(ds, TAG.WindowWidth).map(Number).filter(Number.isFinite);
  return {
    study,
    series,
    sop: val(ds, TAG.SOPInstanceUID),
    frame: frameNumber,
    frames: num(ds, TAG.NumberOfFrames, 0, 1),
    instanceNumber: num(ds, TAG.InstanceNumber, 0, 0),
    rows: num(ds, TAG.Rows, 0, 0),
    cols: num(ds, TAG.Columns, 0, 0),
    samples: num(ds, TAG.SamplesPerPixel, 0, 1),
    photometric,
    decoded,
    planar: decoded ? 0 : num(ds, TAG.PlanarConfiguration, 0, 0),
    bitsAllocated: num(ds, TAG.BitsAllocated, 0, 16),
    bitsStored: num(ds, TAG.BitsStored, 0, num(ds, TAG.BitsAllocated, 0, 16)),
    signed: num(ds, TAG.PixelRepresentation, 0, 0) === 1,
    slope: num(ds, TAG.RescaleSlope, 0, 1),
    intercept: num(ds, TAG.RescaleIntercept, 0, 0),
    fileWindow: wc.length && ww.length && ww[0] > 0 ? { center: wc[0], width: ww[0] } : null,
    pixelSpacing: spacing.length === 2 ? spacing.map(Number) : null,
    sliceThickness: num(ds, TAG.SliceThickness),
    sliceLocation: num(ds, TAG.SliceLocation),
    position: position.length === 3 ? position : null,
    orientation: orientation.length === 6 ? orientation : null,
    frameTime: num(ds, TAG.FrameTime),
    palette: null,
    ds,
    pixels: null, // typed array once loaded
    error: null,
  };
}

/** Projection of the position on the slice normal: the order of an axial stack, head to feet. */
function slicePosition(f) {
  if (!f.position || !f.orientation) return null;
  const [a, b, c, d, e, g] = f.orientation;
  const normal = [b * g - c * e, c * d - a * g, a * e - b * d];
  return normal[0] * f.position[0] + normal[1] * f.position[1] + normal[2] * f.position[2];
}

/** Every frame of the series' instances, sorted along the slice normal (else instance number). */
export function buildStack(metadata, study, series, syntaxes = {}) {
  const frames = [];
  for (const ds of metadata) {
    const count = num(ds, TAG.NumberOfFrames, 0, 1) || 1;
    for (let n = 1; n <= count; n++) frames.push(frameEntry(ds, n, study, series, syntaxes));
  }
  const images = frames.filter((f) => f.rows > 0 && f.cols > 0);
  const positions = images.map(slicePosition);
  const sortable = images.length > 1 && positions.every((p) => p !== null) && new Set(positions).size === images.length;
  images.forEach((f, i) => (f.location = positions[i]));
  images.sort((x, y) => {
    if (x.sop === y.sop) return x.frame - y.frame;
    if (sortable) return y.location - x.location;
    return x.instanceNumber - y.instanceNumber;
  });
  return images;
}

/** Raw frame bytes → a typed array of stored values (Int16, Uint16, Uint8...). */
export function decodePixels(f, bytes) {
  const expected = f.rows * f.cols * f.samples * (f.bitsAllocated / 8);
  if (f.bitsAllocated === 1) throw new Error("1-bit images are not supported by the viewer");
  if (bytes.byteLength < expected) {
    throw new Error(`frame is ${bytes.byteLength} bytes, ${expected} expected (${f.rows}×${f.cols})`);
  }
  // Typed arrays need an aligned start: copy when the frame sits at an odd offset of a larger body.
  const exact = bytes.byteOffset === 0 && bytes.buffer.byteLength === expected;
  const buffer = exact ? bytes.buffer : bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + expected);
  if (f.bitsAllocated === 8) return new Uint8Array(buffer);
  if (f.bitsAllocated === 32) return f.signed ? new Int32Array(buffer) : new Uint32Array(buffer);
  let out = f.signed ? new Int16Array(buffer) : new Uint16Array(buffer);
  if (f.bitsStored < 16) {
    // Mask away bits above BitsStored; sign-extend signed values.
    const shift = 16 - f.bitsStored;
    if (f.signed) for (let i = 0; i < out.length; i++) out[i] = (out[i] << shift) >> shift;
    else {
      const mask = (1 << f.bitsStored) - 1;
      for (let i = 0; i < out.length; i++) out[i] &= mask;
    }
  }
  return out;
}

export const isColor = (f) => f.samples === 3 || f.photometric === "PALETTE COLOR";

/** Min and max stored values (for an automatic window when the file has none). */
export function range(pixels) {
  let lo = Infinity;
  let hi = -Infinity;
  for (let i = 0; i < pixels.length; i++) {
    const v = pixels[i];
    if (v < lo) lo = v;
    if (v > hi) hi = v;
  }
  return [lo, hi];
}

/** The window a frame opens with: the file's VOI, else its full modality value range. */
export function defaultWindow(f) {
  if (f.fileWindow) return { ...f.fileWindow };
  if (!f.pixels || isColor(f)) return { center: 127.5, width: 256 };
  const [lo, hi] = range(f.pixels);
  const a = lo * f.slope + f.intercept;
  const b = hi * f.slope + f.intercept;
  return { center: (a + b) / 2, width: Math.max(1, Math.abs(b - a)) };
}

const littleEndian = new Uint8Array(new Uint32Array([1]).buffer)[0] === 1;
const rgba = littleEndian ? (r, g, b) => 0xff000000 | (b << 16) | (g << 8) | r : (r, g, b) => (r << 24) | (g << 16) | (b << 8) | 0xff;

/**
 * Stored value → packed RGBA for a window (DICOM PS3.3 C.11.2.1.2 linear function).
 * Cached on the parameters, so scrolling through a stack reuses one table.
 */
export class GrayLut {
  constructor() {
    this.key = "";
    this.table = null;
    this.offset = 0;
  }

  get(f, center, width, invert) {
    const bits = f.bitsAllocated === 8 ? 8 : 16;
    const key = `${bits}|${f.signed}|${f.slope}|${f.intercept}|${center}|${width}|${invert}|${f.photometric}`;
    if (key === this.key) return this;
    const size = 1 << bits;
    const offset = f.signed ? size / 2 : 0;
    const table = this.table && this.table.length === size ? this.table : new Uint32Array(size);
    const flip = invert !== (f.photometric === "MONOCHROME1");
    const low = center - 0.5 - (width - 1) / 2;
    const high = center - 0.5 + (width - 1) / 2;
    for (let i = 0; i < size; i++) {
      const v = (i - offset) * f.slope + f.intercept;
      let y = v <= low ? 0 : v > high ? 255 : Math.round(((v - (center - 0.5)) / Math.max(width - 1, 1e-6) + 0.5) * 255);
      if (!(y >= 0)) y = 0;
      if (y > 255) y = 255;
      if (flip) y = 255 - y;
      table[i] = rgba(y, y, y);
    }
    this.key = key;
    this.table = table;
    this.offset = offset;
    return this;
  }
}

function clamp8(v) {
  return v < 0 ? 0 : v > 255 ? 255 : v | 0;
}

/** Paint one frame into `out` (a Uint32Array view of an ImageData of rows×cols). */
export function paint(f, out, lut, win, invert) {
  const p = f.pixels;
  const n = f.rows * f.cols;
  if (!isColor(f)) {
    if (f.bitsAllocated === 32) {
      // Rare (RT dose, parametric maps): window computed per pixel.
      const lo = win.center - 0.5 - (win.width - 1) / 2;
      const flip = invert !== (f.photometric === "MONOCHROME1");
      for (let i = 0; i < n; i++) {
        const v = p[i] * f.slope + f.intercept;
        let y = clamp8(((v - lo) / Math.max(win.width - 1, 1e-6)) * 255);
        if (flip) y = 255 - y;
        out[i] = rgba(y, y, y);
      }
      return;
    }
    const { table, offset } = lut.get(f, win.center, win.width, invert);
    if (offset === 0) for (let i = 0; i < n; i++) out[i] = table[p[i]];
    else for (let i = 0; i < n; i++) out[i] = table[p[i] + offset];
    return;
  }
  if (f.photometric === "PALETTE COLOR") {
    const pal = f.palette;
    if (!pal) throw new Error("palette colour image without usable palette tables");
    for (let i = 0; i < n; i++) {
      let k = p[i] - pal.first;
      k = k < 0 ? 0 : k >= pal.length ? pal.length - 1 : k;
      const r = pal.red[k], g = pal.green[k], b = pal.blue[k];
      out[i] = invert ? rgba(255 - r, 255 - g, 255 - b) : rgba(r, g, b);
    }
    return;
  }
  const ybr = f.photometric.startsWith("YBR") && !f.decoded;
  const planar = f.planar === 1;
  const shift = Math.max(0, f.bitsStored - 8); // 16-bit colour shown with its top 8 bits
  for (let i = 0; i < n; i++) {
    let a, b, c;
    if (planar) {
      a = p[i];
      b = p[i + n];
      c = p[i + 2 * n];
    } else {
      a = p[3 * i];
      b = p[3 * i + 1];
      c = p[3 * i + 2];
    }
    if (shift) {
      a >>= shift;
      b >>= shift;
      c >>= shift;
    }
    let r = a, g = b, bl = c;
    if (ybr) {
      // PS3.3 C.7.6.3.1.2 YBR_FULL → RGB, for uncompressed YBR_FULL as stored.
      r = clamp8(a + 1.402 * (c - 128));
      g = clamp8(a - 0.344136 * (b - 128) - 0.714136 * (c - 128));
      bl = clamp8(a + 1.772 * (b - 128));
    }
    out[i] = invert ? rgba(255 - r, 255 - g, 255 - bl) : rgba(r, g, bl);
  }
}

/** Palette tables from the metadata: inline values or InlineBinary (BulkDataURI is fetched by the caller). */
export function paletteFrom(ds, fetched = {}) {
  const channel = (descTag, dataTag) => {
    const desc = vals(ds, descTag).map(Number);
    if (desc.length !== 3) return null;
    const [count, first, bits] = [desc[0] || 65536, desc[1], desc[2]];
    let data = fetched[dataTag] || null;
    const attr = ds[dataTag];
    if (!data && attr && attr.InlineBinary) {
      const raw = Uint8Array.from(atob(attr.InlineBinary), (ch) => ch.charCodeAt(0));
      data = raw;
    }
    if (!data) return null;
    const values = new Uint8Array(count);
    const words = bits > 8 || data.length >= 2 * count;
    for (let i = 0; i < count; i++) {
      values[i] = words ? data[2 * i + 1] : data[i]; // high byte of a 16-bit entry
    }
    return { values, first, count };
  };
  const r = channel(TAG.RedPaletteDescriptor, TAG.RedPaletteData);
  const g = channel(TAG.GreenPaletteDescriptor, TAG.GreenPaletteData);
  const b = channel(TAG.BluePaletteDescriptor, TAG.BluePaletteData);
  if (!r || !g || !b) return null;
  return { red: r.values, green: g.values, blue: b.values, first: r.first, length: r.count };
}

/** Modality value at (x, y): slope/intercept applied; luminance for colour images. */
export function valueAt(f, x, y) {
  if (!f.pixels || x < 0 || y < 0 || x >= f.cols || y >= f.rows) return null;
  const i = y * f.cols + x;
  if (!isColor(f)) return f.pixels[i] * f.slope + f.intercept;
  if (f.samples !== 3) return f.pixels[i];
  const n = f.rows * f.cols;
  const [r, g, b] = f.planar === 1 ? [f.pixels[i], f.pixels[i + n], f.pixels[i + 2 * n]] : [f.pixels[3 * i], f.pixels[3 * i + 1], f.pixels[3 * i + 2]];
  return 0.299 * r + 0.587 * g + 0.114 * b;
}

/** Mean, SD and area of an ellipse or rectangle given by two corners in image coordinates. */
export function roiStats(f, shape, p1, p2) {
  const x0 = Math.min(p1.x, p2.x), x1 = Math.max(p1.x, p2.x);
  const y0 = Math.min(p1.y, p2.y), y1 = Math.max(p1.y, p2.y);
  const cx = (x0 + x1) / 2, cy = (y0 + y1) / 2;
  const rx = (x1 - x0) / 2, ry = (y1 - y0) / 2;
  let count = 0, sum = 0, sum2 = 0, lo = Infinity, hi = -Infinity;
  for (let y = Math.max(0, Math.floor(y0)); y <= Math.min(f.rows - 1, Math.ceil(y1)); y++) {
    for (let x = Math.max(0, Math.floor(x0)); x <= Math.min(f.cols - 1, Math.ceil(x1)); x++) {
      const px = x + 0.5, py = y + 0.5;
      if (px < x0 || px > x1 || py < y0 || py > y1) continue;
      if (shape === "ellipse") {
        if (rx <= 0 || ry <= 0) continue;
        const dx = (px - cx) / rx, dy = (py - cy) / ry;
        if (dx * dx + dy * dy > 1) continue;
      }
      const v = valueAt(f, x, y);
      count++;
      sum += v;
      sum2 += v * v;
      if (v < lo) lo = v;
      if (v > hi) hi = v;
    }
  }
  const mean = count ? sum / count : 0;
  const sd = count > 1 ? Math.sqrt(Math.max(0, (sum2 - count * mean * mean) / (count - 1))) : 0;
  const [rowMm, colMm] = f.pixelSpacing || [1, 1];
  const w = x1 - x0, h = y1 - y0;
  const area = (shape === "ellipse" ? (Math.PI * w * h) / 4 : w * h) * rowMm * colMm;
  return { count, mean, sd, min: count ? lo : 0, max: count ? hi : 0, area, mm: !!f.pixelSpacing };
}

/** Distance between two image points: mm with PixelSpacing (row, column), else pixels. */
export function distance(f, p1, p2) {
  const dx = p2.x - p1.x, dy = p2.y - p1.y;
  if (!f.pixelSpacing) return { value: Math.hypot(dx, dy), unit: "px" };
  const [rowMm, colMm] = f.pixelSpacing;
  return { value: Math.hypot(dx * colMm, dy * rowMm), unit: "mm" };
}

export function unitFor(f) {
  const modality = f.ds && val(f.ds, TAG.Modality);
  if (modality === "CT" || (f.ds && val(f.ds, TAG.RescaleType) === "HU")) return "HU";
  return "";
}
