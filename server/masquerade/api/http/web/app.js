// The web page: picks a photo, streams POST /v1/anonymize:stream (Server-Sent Events over fetch,
// since EventSource cannot POST), and shows before/after with each face's box and receipt.
// Plain JavaScript, no build step, no request leaves this server.
"use strict";

const TOKEN_KEY = "masquerade.token"; // sessionStorage only: gone when the tab closes
const MEDIA = { JPEG: "image/jpeg", PNG: "image/png", WEBP: "image/webp" };
const LABELS = {
  REVERSE_PERSONALIZATION: "reverse personalization",
  BLUR: "blur",
  PIXELATE: "pixelate",
  SOLID: "solid",
};

const $ = (id) => document.getElementById(id);
let chosen = null; // the File to send
let beforeUrl = null;
let afterUrl = null;

function token() {
  return $("token").value.trim();
}

function authHeaders() {
  return token() ? { Authorization: `Bearer ${token()}` } : {};
}

function setStatus(text) {
  $("status").textContent = text;
}

function showError(text) {
  const box = $("error");
  box.textContent = text;
  box.hidden = !text;
}

async function problemText(response) {
  try {
    const problem = await response.json();
    return `${problem.title || response.status}: ${problem.detail || "request refused"}`;
  } catch {
    return `HTTP ${response.status}`;
  }
}

async function loadInfo() {
  const select = $("method");
  let info;
  try {
    const response = await fetch("/v1/info", { headers: authHeaders() });
    if (!response.ok) {
      showError(await problemText(response));
      return;
    }
    info = await response.json();
  } catch (error) {
    showError(`cannot reach the server: ${error}`);
    return;
  }
  showError("");
  select.replaceChildren();
  for (const entry of info.methods) {
    const option = document.createElement("option");
    option.value = entry.method;
    option.textContent = LABELS[entry.method] || entry.method;
    option.disabled = !entry.available;
    if (!entry.available && entry.reason) option.title = entry.reason;
    option.selected = entry.method === info.default_method && entry.available;
    select.append(option);
  }
  if (info.defaults && info.defaults.guidance_scale !== undefined) {
    $("guidance").placeholder = `server default ${info.defaults.guidance_scale}`;
  }
  showMethodOptions();
}

function showMethodOptions() {
  const generative = $("method").value === "REVERSE_PERSONALIZATION";
  for (const element of document.querySelectorAll(".rp-only")) element.hidden = !generative;
}

function choose(file) {
  if (!file) return;
  chosen = file;
  if (beforeUrl) URL.revokeObjectURL(beforeUrl);
  beforeUrl = URL.createObjectURL(file);
  $("before-img").src = beforeUrl;
  $("drop-text").textContent = `${file.name} (${Math.round(file.size / 1024)} KiB)`;
  $("run").disabled = false;
  setStatus("Ready.");
  showError("");
  clearResult();
  $("results").hidden = false;
}

function clearResult() {
  $("after-img").removeAttribute("src");
  $("faces").tBodies[0].replaceChildren();
  $("summary").textContent = "";
  for (const old of document.querySelectorAll(".box")) old.remove();
}

function query() {
  const fields = new URLSearchParams();
  fields.set("method", $("method").value || "METHOD_UNSPECIFIED");
  fields.set("request_id", `web-${Date.now().toString(36)}`);
  if ($("method").value === "REVERSE_PERSONALIZATION") {
    if ($("prompt").value.trim()) fields.set("params.attribute_prompt", $("prompt").value.trim());
    if ($("guidance").value !== "") fields.set("params.guidance_scale", $("guidance").value);
  }
  return fields.toString();
}

// One SSE frame ("event: x\ndata: y") -> {event, data}.
function parseFrame(frame) {
  let event = "message";
  const data = [];
  for (const line of frame.split("\n")) {
    if (line.startsWith("event:")) event = line.slice(6).trim();
    else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
  }
  return { event, data: data.length ? JSON.parse(data.join("\n")) : null };
}

async function run(event) {
  event.preventDefault();
  if (!chosen) return;
  $("run").disabled = true;
  showError("");
  clearResult();
  $("progress").value = 0;
  setStatus("Uploading…");
  try {
    const response = await fetch(`/v1/anonymize:stream?${query()}`, {
      method: "POST",
      headers: { "Content-Type": chosen.type || "application/octet-stream", Accept: "text/event-stream", ...authHeaders() },
      body: chosen,
    });
    if (!response.ok) {
      showError(await problemText(response));
      setStatus("Refused.");
      return;
    }
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffered = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffered += decoder.decode(value, { stream: true }).replace(/\r\n/g, "\n");
      let end;
      while ((end = buffered.indexOf("\n\n")) >= 0) {
        const frame = buffered.slice(0, end);
        buffered = buffered.slice(end + 2);
        if (frame.trim()) handle(parseFrame(frame));
      }
    }
  } catch (error) {
    showError(`the request failed: ${error}`);
    setStatus("Failed.");
  } finally {
    $("run").disabled = false;
  }
}

function handle({ event, data }) {
  if (event === "queued") {
    setStatus(`Queued (${data.queued.position || 0} ahead)…`);
  } else if (event === "faces_found") {
    const boxes = data.faces_found.boxes || [];
    setStatus(`Found ${boxes.length} face${boxes.length === 1 ? "" : "s"}; anonymizing…`);
  } else if (event === "progress") {
    const { phase, step, total } = data.progress;
    $("progress").value = total ? step / total : 0;
    setStatus(`${phase.toLowerCase()} ${step}/${total}`);
  } else if (event === "result") {
    show(data.result);
  } else if (event === "error") {
    showError(`${data.title}: ${data.detail}`);
    setStatus("Failed.");
  }
}

function base64Bytes(text) {
  const binary = atob(text);
  const bytes = new Uint8Array(binary.length);
  for (let i = 0; i < binary.length; i += 1) bytes[i] = binary.charCodeAt(i);
  return bytes;
}

function drawBoxes(frameId, faces, width, height) {
  const frame = $(frameId);
  for (const old of frame.querySelectorAll(".box")) old.remove();
  for (const face of faces) {
    const box = face.box || { x0: 0, y0: 0, x1: 0, y1: 0 };
    const div = document.createElement("div");
    div.className = `box ${String(face.status).toLowerCase()}`;
    div.style.left = `${(100 * box.x0) / width}%`;
    div.style.top = `${(100 * box.y0) / height}%`;
    div.style.width = `${(100 * (box.x1 - box.x0)) / width}%`;
    div.style.height = `${(100 * (box.y1 - box.y0)) / height}%`;
    const label = document.createElement("span");
    label.textContent = String(face.index);
    div.append(label);
    frame.append(div);
  }
}

function number(value, digits = 3) {
  return value === undefined || value === null ? "–" : Number(value).toFixed(digits);
}

function show(result) {
  const media = MEDIA[result.format] || "application/octet-stream";
  if (afterUrl) URL.revokeObjectURL(afterUrl);
  afterUrl = URL.createObjectURL(new Blob([base64Bytes(result.image)], { type: media }));
  $("after-img").src = afterUrl;
  const download = $("download");
  download.href = afterUrl;
  download.download = `anonymized.${result.format === "JPEG" ? "jpg" : String(result.format).toLowerCase()}`;

  const faces = result.faces || [];
  drawBoxes("before-frame", faces, result.width, result.height);
  drawBoxes("after-frame", faces, result.width, result.height);
  const rows = faces.map((face) => {
    const row = document.createElement("tr");
    const box = face.box || { x0: 0, y0: 0, x1: 0, y1: 0 };
    row.dataset.box = [box.x0, box.y0, box.x1, box.y1].join(",");
    row.dataset.status = face.status;
    const cells = [
      String(face.index),
      `${Math.round(box.x0)}, ${Math.round(box.y0)}, ${Math.round(box.x1)}, ${Math.round(box.y1)}`,
      String(face.status).toLowerCase(),
      LABELS[face.method_applied] || face.method_applied,
      number(face.identity_similarity_before),
      number(face.identity_similarity_after),
      number(face.verifier_distance),
      face.reason || "",
    ];
    cells.forEach((text, column) => {
      const cell = document.createElement("td");
      cell.textContent = text;
      if (column >= 4 && column <= 6) cell.className = "num";
      row.append(cell);
    });
    return row;
  });
  $("faces").tBodies[0].replaceChildren(...rows);
  const seconds = result.timings ? Number(result.timings.total_seconds).toFixed(2) : "?";
  $("summary").textContent =
    `${faces.length} face${faces.length === 1 ? "" : "s"}; ` +
    `${result.complete ? "complete" : "INCOMPLETE: some faces were left as they were"}; ` +
    `${seconds} s on ${result.served_by}`;
  $("progress").value = 1;
  setStatus("Done.");
  $("results").hidden = false;
}

function start() {
  $("token").value = sessionStorage.getItem(TOKEN_KEY) || "";
  $("token").addEventListener("change", () => {
    if (token()) sessionStorage.setItem(TOKEN_KEY, token());
    else sessionStorage.removeItem(TOKEN_KEY);
    loadInfo();
  });
  $("method").addEventListener("change", showMethodOptions);
  $("file").addEventListener("change", () => choose($("file").files[0]));
  const drop = $("drop");
  drop.addEventListener("dragover", (event) => {
    event.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    choose(event.dataTransfer.files[0]);
  });
  $("form").addEventListener("submit", run);
  loadInfo();
}

start();
