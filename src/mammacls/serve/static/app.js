// The mammacls page: upload scans to /v1/predict, show each answer, keep a table to download as CSV.
// Everything is built with textContent (file names and reasons are never parsed as HTML).
"use strict";

const CLASSES = ["benign", "malignant", "normal"];
const STATUS_WORDS = { ok: "confident", uncertain: "uncertain", rejected: "refused", error: "unreadable" };
const rows = [];  // one per answer, for the table and the CSV

const $ = (id) => document.getElementById(id);

function element(tag, attributes = {}, text = "") {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes)) node.setAttribute(key, value);
  if (text) node.textContent = text;
  return node;
}

function authHeaders() {
  const token = $("token").value.trim();
  return token ? { Authorization: "Bearer " + token } : {};
}

async function loadModel() {
  const health = await (await fetch("/healthz")).json();
  $("token-row").hidden = !health.token_required;
  if (health.token_required && !$("token").value) return;
  const response = await fetch("/v1/model", { headers: authHeaders() });
  if (!response.ok) return;
  const model = await response.json();
  $("model-name").textContent = model.name + " (" + model.members + " × " + model.arch + ", " +
                                model.input.img_size + " px)";
  $("lesion").disabled = !model.mask_guided;
  $("lesion-label").title = model.mask_guided ? "" : "this model was not trained with masks: no lesion map";
}

function plainReason(record) {
  const word = STATUS_WORDS[record.status] || record.status;
  if (record.status === "error") return word + ": " + record.error;
  return record.reason ? word + ": " + record.reason : word;
}

function bars(probabilities, label) {
  const box = element("div", { class: "bars" });
  for (const name of CLASSES) {
    const p = probabilities ? probabilities[name] : 0;
    const bar = element("div", { class: "bar" + (name === label ? " top" : "") });
    bar.append(element("span", {}, name));
    const track = element("span", { class: "track", role: "meter", "aria-valuemin": "0", "aria-valuemax": "1",
                                     "aria-valuenow": p.toFixed(3), "aria-label": "p(" + name + ")" });
    const fill = element("span", { class: "fill" });
    fill.style.width = (100 * p).toFixed(1) + "%";
    track.append(fill);
    bar.append(track, element("span", {}, probabilities ? p.toFixed(3) : "—"));
    box.append(bar);
  }
  return box;
}

function overlayToggle(card, url, what) {
  const image = element("img", { alt: what + " of " + card.dataset.file, class: what.replace(/\W+/g, "-") });
  image.src = url;
  image.hidden = true;
  const button = element("button", { type: "button", class: "secondary", "aria-pressed": "false" }, "show " + what);
  button.addEventListener("click", () => {
    image.hidden = !image.hidden;
    button.setAttribute("aria-pressed", String(!image.hidden));
    button.textContent = (image.hidden ? "show " : "hide ") + what;
  });
  return [button, image];
}

function showRecord(record, isLoop) {
  const card = element("article", { class: "card" + (record.status === "rejected" ? " rejected-card" : "") });
  card.dataset.file = record.path;
  const name = isLoop ? record.path + " (cine loop, " + record.frames + " frames)" : record.path;
  card.append(element("h3", {}, name));
  const shown = record.status === "rejected" || record.status === "error" ? "—" : record.label;
  const head = element("p", {});
  head.append(element("span", { class: "label" }, shown),
              element("span", { class: "badge " + record.status }, STATUS_WORDS[record.status] || record.status));
  card.append(head);
  if (record.status !== "ok") card.append(element("p", { class: "reason" }, plainReason(record)));
  if (record.status !== "error") card.append(bars(record.probabilities, record.label));
  const toggles = element("div", { class: "toggles" });
  const images = [];
  if (record.explanation) { const [b, i] = overlayToggle(card, record.explanation, "Grad-CAM"); toggles.append(b); images.push(i); }
  if (record.lesion_map) { const [b, i] = overlayToggle(card, record.lesion_map, "lesion map"); toggles.append(b); images.push(i); }
  if (images.length) card.append(toggles, ...images);
  $("cards").prepend(card);
  addRow(record, name, shown);
}

function addRow(record, name, shown) {
  const p = record.probabilities || {};
  const values = [name, shown, ...CLASSES.map((c) => (p[c] === undefined ? "" : p[c].toFixed(6))),
                  record.status, record.status === "error" ? record.error : record.reason || ""];
  rows.push(values);
  const tr = element("tr");
  values.forEach((value, k) => tr.append(element("td", k >= 2 && k <= 4 ? { class: "num" } : {}, value)));
  $("table").tBodies[0].append(tr);
  $("table").hidden = false;
}

async function classify(files) {
  if (!files.length) return;
  const body = new FormData();
  for (const file of files) body.append("files", file, file.name);
  const query = new URLSearchParams();
  if ($("explain").checked) query.set("explain", "gradcam");
  if ($("lesion").checked && !$("lesion").disabled) query.set("lesion_map", "true");
  $("status").textContent = "Classifying " + files.length + (files.length === 1 ? " file…" : " files…");
  let response, document_;
  try {
    response = await fetch("/v1/predict" + (query.toString() ? "?" + query : ""),
                           { method: "POST", body, headers: authHeaders() });
    document_ = await response.json();
  } catch (error) {
    $("status").textContent = "The server did not answer: " + error;
    return;
  }
  if (!response.ok && !document_.predictions) {
    $("status").textContent = "Refused (" + response.status + "): " + document_.error;
    return;
  }
  const loops = new Set((document_.cine || []).map((c) => c.path));
  for (const record of document_.predictions) if (record.frame === undefined || !loops.has(record.file)) showRecord(record, false);
  for (const loop of document_.cine || []) showRecord(loop, true);
  for (const error of document_.errors) showRecord({ ...error, status: "error" }, false);
  const counts = document_.status_counts;
  $("status").textContent = "Done: " + counts.ok + " confident, " + counts.uncertain + " uncertain, " +
                            counts.rejected + " refused, " + document_.errors.length + " unreadable.";
}

function csvCell(value) {
  const text = String(value);
  return /[",\n]/.test(text) ? '"' + text.replace(/"/g, '""') + '"' : text;
}

function downloadCsv() {
  const header = ["file", "prediction", ...CLASSES.map((c) => "p_" + c), "status", "reason"];
  const text = [header, ...rows].map((r) => r.map(csvCell).join(",")).join("\n") + "\n";
  const link = element("a", { download: "mammacls-results.csv" });
  link.href = URL.createObjectURL(new Blob([text], { type: "text/csv" }));
  document.body.append(link);
  link.click();
  setTimeout(() => { URL.revokeObjectURL(link.href); link.remove(); }, 1000);
}

function wire() {
  const drop = $("drop");
  $("files").addEventListener("change", (event) => { classify([...event.target.files]); event.target.value = ""; });
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    classify([...event.dataTransfer.files]);
  });
  $("download").addEventListener("click", downloadCsv);
  $("clear").addEventListener("click", () => {
    rows.length = 0;
    $("cards").replaceChildren();
    $("table").tBodies[0].replaceChildren();
    $("table").hidden = true;
  });
  $("token").addEventListener("change", loadModel);
  // the "choose files…" label is a button for the keyboard too
  document.querySelector("label.button").setAttribute("tabindex", "0");
  document.querySelector("label.button").addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") { event.preventDefault(); $("files").click(); }
  });
  loadModel();
}

document.addEventListener("DOMContentLoaded", wire);
