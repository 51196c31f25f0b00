// The study list: search form → /api/ui/studies (the one matcher) → sortable, paged table.
// The search lives in the URL, so Back and reload show the same list.

import { formatDate } from "./dicomweb.js";
import { api, el, loginIfExpired, show } from "./page.js";

const form = document.getElementById("search");
const tbody = document.querySelector("#studies tbody");
const message = document.getElementById("list-message");
const count = document.getElementById("count");
const pageLabel = document.getElementById("page");
const prev = document.getElementById("prev");
const next = document.getElementById("next");
const PAGE = 50;
const FIELDS = ["name", "patient_id", "accession", "description", "modality", "date_from", "date_to"];

const state = { sort: "StudyDate", order: "desc", offset: 0 };

function isoDay(offsetDays) {
  const d = new Date();
  d.setDate(d.getDate() - offsetDays);
  return `${d.getFullYear()}-${String(d.getMonth() + 1).padStart(2, "0")}-${String(d.getDate()).padStart(2, "0")}`;
}

function readUrl() {
  const params = new URLSearchParams(location.search);
  for (const f of FIELDS) if (params.has(f)) form.elements[f].value = params.get(f);
  state.sort = params.get("sort") || state.sort;
  state.order = params.get("order") || state.order;
  state.offset = Number(params.get("offset")) || 0;
}

function params() {
  const p = new URLSearchParams();
  for (const f of FIELDS) if (form.elements[f].value) p.set(f, form.elements[f].value);
  p.set("sort", state.sort);
  p.set("order", state.order);
  if (state.offset) p.set("offset", String(state.offset));
  return p;
}

async function search() {
  const p = params();
  history.replaceState(null, "", `${location.pathname}?${p}`);
  p.set("limit", String(PAGE));
  show(message, "Searching…");
  let result;
  try {
    result = await api("GET", `/api/ui/studies?${p}`);
  } catch (err) {
    if (loginIfExpired(err)) return;
    show(message, err.message, "error");
    return;
  }
  show(message, "");
  const total = result.total;
  count.textContent = `${total} ${total === 1 ? "study" : "studies"}`;
  const pages = Math.max(1, Math.ceil(total / PAGE));
  pageLabel.textContent = `page ${Math.floor(state.offset / PAGE) + 1} of ${pages}`;
  prev.disabled = state.offset === 0;
  next.disabled = state.offset + PAGE >= total;
  document.querySelectorAll("th[data-sort]").forEach((th) => {
    th.classList.toggle("asc", th.dataset.sort === state.sort && state.order === "asc");
    th.classList.toggle("desc", th.dataset.sort === state.sort && state.order === "desc");
  });
  tbody.replaceChildren(
    ...result.studies.map((s) => {
      const href = `/studies/${encodeURIComponent(s.StudyInstanceUID)}`;
      const row = el(
        "tr",
        { "data-study": s.StudyInstanceUID },
        el("td", {}, el("a", { href }, s.PatientName || "(no name)")),
        el("td", {}, s.PatientID),
        el("td", {}, formatDate(s.StudyDate)),
        el("td", {}, s.StudyDescription),
        el("td", {}, s.AccessionNumber),
        el("td", {}, (s.ModalitiesInStudy || "").replaceAll("\\", ", ")),
        el("td", { class: "num" }, String(s.NumberOfStudyRelatedSeries ?? "")),
        el("td", { class: "num" }, String(s.NumberOfStudyRelatedInstances ?? "")),
        el("td", {}, el("a", { href: `/viewer/${encodeURIComponent(s.StudyInstanceUID)}` }, "View")),
      );
      row.addEventListener("dblclick", () => location.assign(href));
      return row;
    }),
  );
  if (!total) show(message, "No study matches this search.");
}

form.addEventListener("submit", (e) => {
  e.preventDefault();
  state.offset = 0;
  search();
});
form.addEventListener("reset", () => {
  setTimeout(() => {
    state.offset = 0;
    search();
  });
});
document.querySelectorAll("[data-preset]").forEach((b) =>
  b.addEventListener("click", () => {
    const p = b.dataset.preset;
    const [from, to] =
      p === "today" ? [isoDay(0), isoDay(0)] : p === "yesterday" ? [isoDay(1), isoDay(1)] : p === "any" ? ["", ""] : [isoDay(Number(p) - 1), isoDay(0)];
    form.elements.date_from.value = from;
    form.elements.date_to.value = to;
    state.offset = 0;
    search();
  }),
);
document.querySelectorAll("th[data-sort]").forEach((th) =>
  th.addEventListener("click", () => {
    if (state.sort === th.dataset.sort) state.order = state.order === "asc" ? "desc" : "asc";
    else {
      state.sort = th.dataset.sort;
      state.order = th.dataset.sort === "StudyDate" ? "desc" : "asc";
    }
    state.offset = 0;
    search();
  }),
);
prev.addEventListener("click", () => {
  state.offset = Math.max(0, state.offset - PAGE);
  search();
});
next.addEventListener("click", () => {
  state.offset += PAGE;
  search();
});

readUrl();
search().then(() => {
  // A message left by the page before (e.g. "study deleted") is shown once.
  const flash = sessionStorage.getItem("macpacs-flash");
  if (flash) {
    sessionStorage.removeItem("macpacs-flash");
    show(message, flash, "ok");
  }
});
