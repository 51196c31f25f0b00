// Drag-and-drop upload: files and whole folders → STOW-RS in batches, with a progress bar.
// Every file is sent as received; the server's ingest path says which ones it refused and why.

import { stow } from "./dicomweb.js";
import { csrfToken, el, loginIfExpired, show } from "./page.js";

const zone = document.getElementById("dropzone");
const bar = document.getElementById("bar");
const box = document.getElementById("upload-progress");
const status = document.getElementById("upload-status");
const message = document.getElementById("upload-message");
const problems = document.getElementById("upload-problems");
const BATCH_BYTES = 32 * 1024 * 1024;
const BATCH_FILES = 200;

/** All files under a dropped entry (folders are walked). */
async function walk(entry, out) {
  if (entry.isFile) {
    out.push(await new Promise((resolve, reject) => entry.file(resolve, reject)));
  } else if (entry.isDirectory) {
    const reader = entry.createReader();
    for (;;) {
      const batch = await new Promise((resolve, reject) => reader.readEntries(resolve, reject));
      if (!batch.length) break;
      for (const child of batch) await walk(child, out);
    }
  }
}

function batches(files) {
  const out = [];
  let current = [];
  let size = 0;
  for (const f of files) {
    if (current.length && (size + f.size > BATCH_BYTES || current.length >= BATCH_FILES)) {
      out.push(current);
      current = [];
      size = 0;
    }
    current.push(f);
    size += f.size;
  }
  if (current.length) out.push(current);
  return out;
}

/** Does the file look like DICOM (Part-10 "DICM" at 128)? Others are reported, not sent. */
async function looksDicom(file) {
  if (file.size < 132) return false;
  const head = new Uint8Array(await file.slice(128, 132).arrayBuffer());
  return String.fromCharCode(...head) === "DICM";
}

function problem(name, text) {
  problems.hidden = false;
  problems.tBodies[0].append(el("tr", {}, el("td", {}, name), el("td", {}, text)));
}

async function upload(files) {
  problems.hidden = true;
  problems.tBodies[0].replaceChildren();
  box.hidden = false;
  status.textContent = "checking files…";
  bar.value = 0;
  show(message, "");
  const dicom = [];
  for (const f of files) {
    if (await looksDicom(f)) dicom.push(f);
    else problem(f.webkitRelativePath || f.name, "not a DICOM file (no DICM marker): skipped");
  }
  const total = dicom.reduce((s, f) => s + f.size, 0);
  let sentBytes = 0;
  let stored = 0;
  let failed = 0;
  for (const batch of batches(dicom)) {
    const batchBytes = batch.reduce((s, f) => s + f.size, 0);
    let result;
    try {
      result = await stow(batch, csrfToken(), (loaded, all) => {
        bar.max = Math.max(1, total);
        bar.value = sentBytes + (loaded / all) * batchBytes;
        status.textContent = `${Math.round((100 * bar.value) / bar.max)}% of ${(total / 1e6).toFixed(1)} MB`;
      });
    } catch (err) {
      show(message, err.message, "error");
      return;
    }
    sentBytes += batchBytes;
    if (result.status === 401 && loginIfExpired({ status: 401 })) return;
    const json = result.json || {};
    const ok = (json["00081199"] && json["00081199"].Value) || [];
    const bad = (json["00081198"] && json["00081198"].Value) || [];
    stored += ok.length;
    failed += bad.length;
    for (const item of bad) {
      const reason = item["00081197"] ? `failure 0x${Number(item["00081197"].Value[0]).toString(16)}` : "refused";
      const uid = item["00081155"] && item["00081155"].Value ? item["00081155"].Value[0] : "?";
      problem(uid, `refused by the archive (${reason})`);
    }
    if (!ok.length && !bad.length && result.status >= 400) {
      failed += batch.length;
      const detail = json.detail || `HTTP ${result.status}`;
      batch.forEach((f) => problem(f.webkitRelativePath || f.name, `refused: ${detail}`));
    }
  }
  bar.value = bar.max;
  const skipped = files.length - dicom.length;
  const parts = [`${stored} file${stored === 1 ? "" : "s"} stored`];
  if (failed) parts.push(`${failed} refused`);
  if (skipped) parts.push(`${skipped} not DICOM (skipped)`);
  show(message, parts.join(", ") + ".", failed || skipped ? (stored ? "" : "error") : "ok");
  status.textContent = "done";
}

zone.addEventListener("dragover", (e) => {
  e.preventDefault();
  zone.classList.add("over");
});
zone.addEventListener("dragleave", () => zone.classList.remove("over"));
zone.addEventListener("drop", async (e) => {
  e.preventDefault();
  zone.classList.remove("over");
  const files = [];
  const items = [...(e.dataTransfer.items || [])].map((i) => i.webkitGetAsEntry && i.webkitGetAsEntry()).filter(Boolean);
  if (items.length) for (const entry of items) await walk(entry, files);
  else files.push(...e.dataTransfer.files);
  upload(files);
});
for (const id of ["files", "folder"]) {
  const input = document.getElementById(id);
  input.addEventListener("change", () => {
    upload([...input.files]);
    input.value = "";
  });
}
