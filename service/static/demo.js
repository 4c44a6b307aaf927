// The demo page: plain JS against the service's own API (/model, /classify). No build step, no CDN.
"use strict";
const $ = (id) => document.getElementById(id);
let file = null;

function headers() {
  const key = $("api-key").value.trim();
  return key ? { "X-API-Key": key } : {};
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

async function errorMessage(resp) {
  try {
    const body = await resp.json();
    if (body && body.error) return typeof body.error === "string" ? body.error : body.error.message;
  } catch (e) { /* not JSON */ }
  return `HTTP ${resp.status}`;
}

let chosen = "";  // "" = the service's default model; else "model=...&version=..."

async function loadModel() {
  const resp = await fetch(`/model${chosen ? "?" + chosen : ""}`, { headers: headers() });
  if (resp.status === 401) {
    $("key-row").hidden = false;
    $("model-name").textContent = "enter the API key to see the model";
    return;
  }
  if (!resp.ok) { $("model-name").textContent = await errorMessage(resp); return; }
  const m = await resp.json();
  $("model-name").textContent = m.name;
  $("model-version").textContent = `version ${m.version} · ${m.providers[0] || ""}`;
  $("trained-on").textContent = m.trained_on || "";
  const models = m.models || [];
  if (models.length > 1 && !$("model-pick").options.length) {  // a repository: let the user pick
    $("model-pick").replaceChildren(...models.map((x) => {
      const o = document.createElement("option");
      o.value = `model=${encodeURIComponent(x.name)}&version=${encodeURIComponent(x.version)}`;
      o.textContent = `${x.name} ${x.version}${x.default && x.name === m.default_model ? " (default)" : ""}`;
      o.selected = x.name === m.name && x.version === m.version;
      return o;
    }));
    $("model-row").hidden = false;
  }
  if (m.example_caption) $("description").placeholder = m.example_caption;  // this model's own kind of caption
  const abstention = m.abstention || {};
  $("min-confidence").value = Math.round(100 * (abstention.min_confidence || 0));
  $("labels").replaceChildren(...m.labels.map((l) => {
    const s = document.createElement("span"); s.className = "label-chip"; s.textContent = l; return s;
  }));
  showError("");
}

function setFile(f) {
  if (!f) return;
  file = f;
  $("preview").src = URL.createObjectURL(f);
  $("preview").hidden = false;
  $("drop-text").textContent = f.name;
}

function verdict(result) {
  const pct = (x) => `${(100 * x).toFixed(1)}%`;
  if (!result.abstained) return { text: `${result.label} (${pct(result.confidence)})`, unsure: false };
  if (result.abstain_reason === "out_of_distribution") {
    return { text: `Not sure: this image is unlike anything the model was trained on (out-of-distribution score ${result.ood_score.toFixed(2)}, above 1 is unlike). Its best guess is below.`, unsure: true };
  }
  return { text: `Not sure: the best guess has ${pct(result.confidence)} confidence, under the ${$("min-confidence").value}% asked for.`, unsure: true };
}

function render(result) {
  const v = verdict(result);
  $("verdict").textContent = v.text;
  $("verdict").classList.toggle("unsure", v.unsure);
  const bars = result.predictions.map((p) => {
    const li = document.createElement("li"); li.className = "bar";
    const name = document.createElement("span"); name.className = "label"; name.textContent = p.label;
    const track = document.createElement("span"); track.className = "track";
    const fill = document.createElement("span"); fill.className = "fill"; fill.style.width = `${(100 * p.score).toFixed(1)}%`;
    fill.style.display = "block"; track.appendChild(fill);
    const score = document.createElement("span"); score.className = "score"; score.textContent = `${(100 * p.score).toFixed(1)}%`;
    li.append(name, track, score); return li;
  });
  $("bars").replaceChildren(...bars);
  const top = Math.max(...(result.text_attention || []).map((t) => t.weight), 1e-9);
  $("tokens").replaceChildren(...(result.text_attention || []).map((t) => {
    const s = document.createElement("span"); s.className = "token"; s.textContent = t.token;
    s.style.setProperty("--w", (t.weight / top).toFixed(3));
    s.title = `attention ${t.weight.toFixed(3)}`; s.dataset.weight = t.weight; return s;
  }));
  $("request-id").textContent = result.request_id;
  $("result").hidden = false;
}

async function classify(event) {
  event.preventDefault();
  showError("");
  if (!file) { showError("Choose an image first."); return; }
  const form = new FormData();
  form.append("image", file, file.name || "image");
  form.append("description", $("description").value);
  $("submit").disabled = true;
  try {
    const minConfidence = Math.min(100, Math.max(0, Number($("min-confidence").value) || 0)) / 100;
    const query = `top_k=${$("top-k").value}&explain=true&min_confidence=${minConfidence}${chosen ? "&" + chosen : ""}`;
    const resp = await fetch(`/classify?${query}`, { method: "POST", body: form, headers: headers() });
    if (!resp.ok) {
      if (resp.status === 401) $("key-row").hidden = false;
      showError(await errorMessage(resp));
      return;
    }
    render(await resp.json());
  } catch (e) {
    showError(`The service could not be reached: ${e.message}`);
  } finally {
    $("submit").disabled = false;
  }
}

$("image").addEventListener("change", (e) => setFile(e.target.files[0]));
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); setFile(e.dataTransfer.files[0]); });
$("api-key").addEventListener("change", loadModel);
$("form").addEventListener("submit", classify);
$("model-pick").addEventListener("change", () => { chosen = $("model-pick").value; loadModel(); });
loadModel();
