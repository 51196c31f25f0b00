// DICOMweb client for the pages: QIDO-RS searches, WADO-RS metadata and frames, STOW-RS upload.
// Same-origin requests: the session cookie authenticates them. Errors carry the HTTP status so
// that pages can say "session expired" (401/403) or "no longer in the archive" (404).

export const EXPLICIT_VR_LE = "1.2.840.10008.1.2.1";
const BASE = "/dicom-web";

export class HttpError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

/** Throw an HttpError with a sentence a person can act on when a response is not OK. */
export async function check(response, what) {
  if (response.ok) return response;
  let detail = "";
  try {
    const body = await response.clone().json();
    detail = typeof body.detail === "string" ? body.detail : body.error || "";
  } catch {
    detail = "";
  }
  let message;
  if (response.status === 401) message = "Your session has expired or you are not logged in: log in again.";
  else if (response.status === 403) message = detail || "You are not allowed to do this (admin only).";
  else if (response.status === 404) message = detail || `${what}: not found in the archive (deleted meanwhile?).`;
  else message = `${what}: ${detail || "HTTP " + response.status}`;
  throw new HttpError(response.status, message);
}

const enc = encodeURIComponent;

export async function qido(path, params = {}, signal) {
  const query = new URLSearchParams();
  for (const [key, value] of Object.entries(params)) {
    if (Array.isArray(value)) value.forEach((v) => query.append(key, v));
    else if (value !== undefined && value !== null && value !== "") query.append(key, value);
  }
  const qs = query.toString();
  const response = await fetch(`${BASE}${path}${qs ? "?" + qs : ""}`, {
    headers: { Accept: "application/dicom+json" },
    signal,
  });
  await check(response, "search");
  if (response.status === 204) return [];
  const text = await response.text();
  return text ? JSON.parse(text) : [];
}

export function studySeries(study, signal) {
  return qido(`/studies/${enc(study)}/series`, { includefield: "all" }, signal);
}

export async function seriesMetadata(study, series, signal) {
  const early = window.macpacsEarly;
  let response;
  if (early && early.series === series && early.metadata) {
    response = await early.metadata; // started by the page before the modules loaded
    early.metadata = null;
  } else {
    response = await fetch(`${BASE}/studies/${enc(study)}/series/${enc(series)}/metadata`, {
      headers: { Accept: "application/dicom+json" },
      signal,
    });
  }
  await check(response, "series");
  return response.json();
}

/** SOP Instance UID → stored transfer syntax (macpacs' /api/ui); {} when unavailable. */
export async function transferSyntaxes(study, series, signal) {
  try {
    const response = await fetch(`/api/ui/studies/${enc(study)}/series/${enc(series)}/transfer-syntaxes`, { signal });
    return response.ok ? await response.json() : {};
  } catch (err) {
    if (err.name === "AbortError") throw err;
    return {};
  }
}

export function thumbnailUrl(study, series, size = 128) {
  return `${BASE}/studies/${enc(study)}/series/${enc(series)}/thumbnail?viewport=${size},${size}`;
}

/** Index of `needle` (bytes) in `hay` from `start`; -1 when absent. */
function indexOf(hay, needle, start = 0) {
  const first = needle[0];
  const last = hay.length - needle.length;
  outer: for (let i = start; i <= last; i++) {
    if (hay[i] !== first) continue;
    for (let j = 1; j < needle.length; j++) if (hay[i + j] !== needle[j]) continue outer;
    return i;
  }
  return -1;
}

/** The last index of `needle` in `hay`, searching backwards (the closing boundary is at the end). */
function lastIndexOf(hay, needle) {
  outer: for (let i = hay.length - needle.length; i >= 0; i--) {
    for (let j = 0; j < needle.length; j++) if (hay[i + j] !== needle[j]) continue outer;
    return i;
  }
  return -1;
}

/** The body of the first part of a multipart/related response (a single frame). */
export function firstPart(buffer, contentType) {
  const bytes = new Uint8Array(buffer);
  const match = /boundary="?([^";,]+)"?/i.exec(contentType || "");
  if (!match) return bytes; // a single-part answer: the body is the frame
  const boundary = new TextEncoder().encode("--" + match[1]);
  const open = indexOf(bytes, boundary);
  if (open < 0) throw new Error("malformed multipart frame response (no boundary)");
  const headerEnd = indexOf(bytes, new TextEncoder().encode("\r\n\r\n"), open);
  if (headerEnd < 0) throw new Error("malformed multipart frame response (no part headers)");
  const start = headerEnd + 4;
  // Frames are large: look for the next boundary from the end instead of scanning the pixels.
  let end = lastIndexOf(bytes, boundary);
  if (end <= start) throw new Error("malformed multipart frame response (no closing boundary)");
  if (bytes[end - 2] === 13 && bytes[end - 1] === 10) end -= 2;
  return bytes.subarray(start, end);
}

/** One frame as uncompressed little-endian bytes (the server decodes compressed files). */
export async function frame(study, series, sop, number, signal) {
  const url = `${BASE}/studies/${enc(study)}/series/${enc(series)}/instances/${enc(sop)}/frames/${number}`;
  const response = await fetch(url, {
    headers: { Accept: `multipart/related; type="application/octet-stream"; transfer-syntax=${EXPLICIT_VR_LE}` },
    // The viewer keeps frames in memory; writing 500 MB of them to the HTTP cache only costs time.
    cache: "no-store",
    signal,
  });
  await check(response, "image");
  const buffer = await response.arrayBuffer();
  return firstPart(buffer, response.headers.get("Content-Type"));
}

/**
 * The frames of a whole series in one streamed request (WADO-RS "pixeldata" resource).
 * `onFrame(sop, frameNumber, bytes)` is called as each part arrives. Resolves when the stream
 * ends; throws HttpError when the server does not offer the resource (the caller falls back to
 * one request per frame).
 */
export async function seriesPixelData(study, series, onFrame, signal) {
  const response = await fetch(`${BASE}/studies/${enc(study)}/series/${enc(series)}/pixeldata`, {
    headers: { Accept: `multipart/related; type="application/octet-stream"; transfer-syntax=${EXPLICIT_VR_LE}` },
    cache: "no-store",
    signal,
  });
  await check(response, "series pixel data");
  const match = /boundary="?([^";,]+)"?/i.exec(response.headers.get("Content-Type") || "");
  if (!match || !response.body) throw new HttpError(0, "series pixel data is not multipart");
  const crlf2 = new TextEncoder().encode("\r\n\r\n");
  const reader = response.body.getReader();
  let pending = new Uint8Array(0); // bytes of part headers not parsed yet
  let body = null; // the part being filled
  let filled = 0;
  let where = null;
  for (;;) {
    const { done, value } = await reader.read();
    if (done) return;
    let chunk = value;
    while (chunk.length) {
      if (body) {
        const take = Math.min(body.length - filled, chunk.length);
        body.set(chunk.subarray(0, take), filled);
        filled += take;
        chunk = chunk.subarray(take);
        if (filled === body.length) {
          onFrame(where.sop, where.frame, body);
          body = null;
        }
        continue;
      }
      const joined = new Uint8Array(pending.length + chunk.length);
      joined.set(pending);
      joined.set(chunk, pending.length);
      const end = indexOf(joined, crlf2);
      if (end < 0) {
        pending = joined;
        break;
      }
      const headers = new TextDecoder().decode(joined.subarray(0, end));
      const length = /content-length:\s*(\d+)/i.exec(headers);
      const location = /content-location:\s*\S*\/instances\/([^/\s]+)\/frames\/(\d+)/i.exec(headers);
      if (!length || !location) throw new HttpError(0, "series pixel data parts lack Content-Length/Location");
      where = { sop: decodeURIComponent(location[1]), frame: Number(location[2]) };
      body = new Uint8Array(Number(length[1]));
      filled = 0;
      pending = new Uint8Array(0);
      chunk = joined.subarray(end + 4);
      if (body.length === 0) {
        onFrame(where.sop, where.frame, body);
        body = null;
      }
    }
  }
}

/** STOW-RS one or more Part-10 files in one request; reports upload progress; resolves to JSON. */
export function stow(files, csrfToken, onProgress) {
  const boundary = "macpacs-" + Math.random().toString(16).slice(2) + Date.now().toString(16);
  const parts = [];
  for (const file of files) {
    parts.push(`--${boundary}\r\nContent-Type: application/dicom\r\n\r\n`, file, "\r\n");
  }
  parts.push(`--${boundary}--\r\n`);
  const body = new Blob(parts);
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", `${BASE}/studies`);
    xhr.setRequestHeader("Content-Type", `multipart/related; type="application/dicom"; boundary=${boundary}`);
    xhr.setRequestHeader("Accept", "application/dicom+json");
    if (csrfToken) xhr.setRequestHeader("X-CSRF-Token", csrfToken);
    xhr.upload.onprogress = (e) => e.lengthComputable && onProgress && onProgress(e.loaded, e.total);
    xhr.onerror = () => reject(new HttpError(0, "upload failed: the server could not be reached"));
    xhr.onload = () => {
      let json = null;
      try {
        json = xhr.responseText ? JSON.parse(xhr.responseText) : null;
      } catch {
        json = null;
      }
      resolve({ status: xhr.status, json });
    };
    xhr.send(body);
  });
}

// -- DICOM JSON helpers ---------------------------------------------------------------------

/** First value (or `i`-th) of a DICOM JSON attribute, or undefined. */
export function val(ds, tag, i = 0) {
  const a = ds && ds[tag];
  if (!a || !a.Value || a.Value.length <= i) return undefined;
  return a.Value[i];
}

export function vals(ds, tag) {
  const a = ds && ds[tag];
  return a && a.Value ? a.Value : [];
}

export function num(ds, tag, i = 0, fallback = undefined) {
  const v = val(ds, tag, i);
  if (v === undefined || v === null || v === "") return fallback;
  const n = Number(v);
  return Number.isFinite(n) ? n : fallback;
}

/** Person name as "FAMILY, Given" from DICOM JSON's {Alphabetic: "FAMILY^Given"}. */
export function personName(ds, tag) {
  const v = val(ds, tag);
  if (!v) return "";
  const alpha = typeof v === "string" ? v : v.Alphabetic || "";
  const [family = "", given = ""] = alpha.split("^");
  return given ? `${family}, ${given}` : family;
}

/** "20240115" → "2024-01-15". */
export function formatDate(da) {
  if (!da || da.length < 8) return da || "";
  return `${da.slice(0, 4)}-${da.slice(4, 6)}-${da.slice(6, 8)}`;
}

export const TAG = {
  PatientName: "00100010",
  PatientID: "00100020",
  PatientBirthDate: "00100030",
  PatientSex: "00100040",
  StudyInstanceUID: "0020000D",
  StudyDate: "00080020",
  StudyTime: "00080030",
  StudyDescription: "00081030",
  AccessionNumber: "00080050",
  ModalitiesInStudy: "00080061",
  NumberOfStudyRelatedSeries: "00201206",
  NumberOfStudyRelatedInstances: "00201208",
  SeriesInstanceUID: "0020000E",
  SeriesNumber: "00200011",
  SeriesDescription: "0008103E",
  NumberOfSeriesRelatedInstances: "00201209",
  Modality: "00080060",
  SOPInstanceUID: "00080018",
  SOPClassUID: "00080016",
  InstanceNumber: "00200013",
  NumberOfFrames: "00280008",
  Rows: "00280010",
  Columns: "00280011",
  SamplesPerPixel: "00280002",
  PhotometricInterpretation: "00280004",
  PlanarConfiguration: "00280006",
  BitsAllocated: "00280100",
  BitsStored: "00280101",
  HighBit: "00280102",
  PixelRepresentation: "00280103",
  RescaleSlope: "00281053",
  RescaleIntercept: "00281052",
  RescaleType: "00281054",
  WindowCenter: "00281050",
  WindowWidth: "00281051",
  PixelSpacing: "00280030",
  ImagerPixelSpacing: "00181164",
  SliceThickness: "00180050",
  SliceLocation: "00201041",
  ImagePositionPatient: "00200032",
  ImageOrientationPatient: "00200037",
  RedPaletteDescriptor: "00281101",
  GreenPaletteDescriptor: "00281102",
  BluePaletteDescriptor: "00281103",
  RedPaletteData: "00281201",
  GreenPaletteData: "00281202",
  BluePaletteData: "00281203",
  FrameTime: "00181063",
  PerFrameFunctionalGroups: "52009230",
  SharedFunctionalGroups: "52009229",
};
