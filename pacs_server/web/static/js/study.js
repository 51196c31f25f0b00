// Study page actions: send to a node (with progress) and delete (admin, after confirmation).

import { api, loginIfExpired, show } from "./page.js";

const root = document.getElementById("study");
const study = root.dataset.study;
const message = document.getElementById("study-message");
const enc = encodeURIComponent;

const sendButton = document.getElementById("send");
sendButton?.addEventListener("click", async () => {
  const node = document.getElementById("send-node").value;
  if (!node) return;
  const box = document.getElementById("send-progress");
  const bar = box.querySelector("progress");
  const status = document.getElementById("send-status");
  sendButton.disabled = true;
  box.hidden = false;
  show(message, "");
  try {
    let job = await api("POST", `/api/ui/studies/${enc(study)}/send`, { node });
    // A job queued again after a failed attempt is retried by the server: stop waiting here.
    while ((job.state === "running" || job.state === "queued") && !job.retrying) {
      bar.max = Math.max(1, job.total);
      bar.value = job.done;
      status.textContent = `${job.done} / ${job.total} images sent to ${job.node}`;
      await new Promise((r) => setTimeout(r, 400));
      job = await api("GET", `/api/ui/jobs/${enc(job.id)}`);
    }
    bar.max = Math.max(1, job.total);
    bar.value = job.done;
    status.textContent = `${job.done} / ${job.total} images sent to ${job.node}`;
    const retry = job.retrying ? ` The server retries it (job ${job.id}, on the Status page).` : "";
    show(message, job.message + retry, job.state === "done" ? "ok" : "error");
  } catch (err) {
    if (!loginIfExpired(err)) show(message, err.message, "error");
  } finally {
    sendButton.disabled = false;
  }
});

const deleteButton = document.getElementById("delete");
const dialog = document.getElementById("confirm-delete");
deleteButton?.addEventListener("click", () => dialog.showModal());
dialog?.addEventListener("close", async () => {
  if (dialog.returnValue !== "delete") return;
  try {
    const result = await api("DELETE", `/api/ui/studies/${enc(study)}`);
    sessionStorage.setItem("macpacs-flash", result.message);
    location.assign("/studies");
  } catch (err) {
    if (!loginIfExpired(err)) show(message, err.message, "error");
  }
});
