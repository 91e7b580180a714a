// The triage worklist page: fetches /worklist every few seconds and renders it; a study's
// detail (per-slice probabilities, the picture of what the model saw, deliveries) opens at
// /#study=<Study Instance UID>. Plain DOM, no framework; all text goes through textContent.
"use strict";

const REFRESH_MS = 5000;
const STATE_LABELS = {
  flagged: "FLAGGED",
  waiting: "waiting",
  routine: "routine",
  failed: "failed",
  not_analysed: "could not analyse",
  awaiting_roi: "awaiting ROI",
};

const page = { filter: "", timer: null, detailUid: null, previewSrc: null, csrfToken: null };

function $(id) {
  return document.getElementById(id);
}

function element(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (className) node.className = className;
  return node;
}

function patientName(value) {
  if (!value) return "—";
  const [family, given, middle] = value.split("^");
  const rest = [given, middle].filter(Boolean).join(" ");
  return rest ? `${family}, ${rest}` : family;
}

function localTime(iso) {
  if (!iso) return "—";
  const moment = new Date(iso);
  const pad = (n) => String(n).padStart(2, "0");
  return `${moment.getFullYear()}-${pad(moment.getMonth() + 1)}-${pad(moment.getDate())} ` +
    `${pad(moment.getHours())}:${pad(moment.getMinutes())}`;
}

function probabilityText(p) {
  return typeof p === "number" ? p.toFixed(3) : "—";
}

function deliveryCell(d) {
  const cell = element("td", null, "deliveries");
  if (!d || !d.total) {
    cell.textContent = "—";
    return cell;
  }
  cell.append(element("span", `${d.delivered}/${d.total} sent`));
  if (d.failed) cell.append(element("span", `${d.failed} failed`, "sub-line failed-text"));
  cell.title = `${d.delivered} delivered, ${d.pending + d.sending} in progress, ${d.failed} failed`;
  return cell;
}

async function getJson(url) {
  const response = await fetch(url, { headers: { Accept: "application/json" }, cache: "no-store" });
  if (response.status === 401) {
    window.location.assign("/login"); // the session has ended
    throw new Error("signed out");
  }
  if (!response.ok) throw new Error(`${url}: HTTP ${response.status}`);
  return response.json();
}

// Who is signed in, and the CSRF token every write from this page sends.
async function showSession() {
  const session = await getJson("/session");
  page.csrfToken = session.csrf_token;
  $("user-name").textContent = session.name;
  $("signed-in").hidden = false;
}

async function signOut() {
  await fetch("/logout", { method: "POST", headers: { "X-CSRF-Token": page.csrfToken || "" } });
  window.location.assign("/login");
}

function renderCounts(counts, total) {
  let all = 0;
  for (const [state, count] of Object.entries(counts)) {
    all += count;
    const badge = document.querySelector(`[data-count="${state}"]`);
    if (badge) badge.textContent = String(count);
  }
  document.querySelector('[data-count="all"]').textContent = String(all);
  return total;
}

const OUTSIDE_DOMAIN = "outside the model's training domain";

// The out-of-domain guard's verdict in words (null when the model has no guard).
function domainText(domain) {
  if (!domain) return null;
  const figures = `score ${domain.score.toFixed(2)}, threshold ${domain.threshold.toFixed(2)}`;
  return domain.in_domain ? `inside the model's training domain (${figures})`
    : `${OUTSIDE_DOMAIN} (${figures}): not flagged, whatever the probability`;
}

function renderRow(item) {
  const row = element("tr", null, `row row-${item.state}`);
  row.dataset.uid = item.study_instance_uid;
  row.tabIndex = 0;
  if (item.study_instance_uid === page.detailUid) row.classList.add("selected");
  const state = element("td");
  state.append(element("span", STATE_LABELS[item.state] || item.state, `badge badge-${item.state}`));
  if (["waiting", "failed", "not_analysed"].includes(item.state)) {
    state.append(element("span", item.activity, "activity"));
  }
  if (item.source === "automatic" && item.result_id) {
    const where = item.vertebra ? ` · ${item.vertebra}` : "";
    state.append(element("span", `automatic${where}`, "sub-line source-automatic"));
  }
  row.append(state);
  const probability = element("td", probabilityText(item.probability), "number");
  if (item.model) {
    // which model produced this result (name and version; the checkpoint's sha256 on hover)
    const model = element("span", `${item.model.name} ${item.model.version}`, "sub-line model");
    model.title = `${item.model.demonstration ? "demonstration model; " : ""}checkpoint sha256 ${item.model.sha256 || "not recorded"}`;
    probability.append(model);
  }
  if (item.domain && !item.domain.in_domain) {
    const outside = element("span", OUTSIDE_DOMAIN, "sub-line out-of-domain");
    outside.title = domainText(item.domain);
    probability.append(outside);
  }
  row.append(probability);
  const patient = element("td", patientName(item.patient_name), "patient");
  patient.append(element("span", item.patient_id || "—", "sub-line"));
  row.append(patient);
  row.append(element("td", item.accession_number || "—"));
  row.append(element("td", item.study_date || "—"));
  const [day, time] = localTime(item.received_at || item.annotated_at).split(" ");
  const received = element("td", day);
  if (time) received.append(element("span", time, "sub-line"));
  row.append(received);
  row.append(deliveryCell(item.deliveries));
  const open = () => { window.location.hash = `study=${encodeURIComponent(item.study_instance_uid)}`; };
  row.addEventListener("click", open);
  row.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") {
      event.preventDefault();
      open();
    }
  });
  return row;
}

async function refreshList() {
  const query = page.filter ? `?state=${encodeURIComponent(page.filter)}` : "";
  try {
    const data = await getJson(`/worklist${query}`);
    const body = document.querySelector("#worklist tbody");
    body.replaceChildren(...data.items.map(renderRow));
    $("empty").hidden = data.items.length > 0;
    renderCounts(data.counts, data.total);
    const demo = data.items.some((item) => item.model && item.model.demonstration);
    $("demo-banner").hidden = !demo;
    const shown = data.items.length < data.total ? `${data.items.length} of ${data.total}` : `${data.total}`;
    $("status").textContent = `${shown} studies · updated ${new Date().toLocaleTimeString()}`;
    $("status").classList.remove("error");
  } catch (error) {
    $("status").textContent = `cannot reach the node, retrying (${error.message})`;
    $("status").classList.add("error");
  }
}

function fact(list, term, value) {
  list.append(element("dt", term));
  list.append(element("dd", value === null || value === undefined || value === "" ? "—" : value));
}

function renderChart(detail) {
  const chart = $("slice-chart");
  chart.replaceChildren();
  const threshold = typeof detail.threshold === "number" ? detail.threshold : null;
  const summary = detail.slices
    .map((s) => `x ${s.x_mm.toFixed(1)} mm: ${s.probability.toFixed(3)}`)
    .join("; ");
  chart.setAttribute("aria-label", `Per-slice probabilities: ${summary || "none"}`);
  for (const slice of detail.slices) {
    const line = element("div", null, "bar-line");
    line.append(element("span", `${slice.x_mm.toFixed(1)} mm`, "bar-label"));
    const track = element("div", null, "bar-track");
    const bar = element("div", null, "bar");
    bar.style.width = `${Math.max(0, Math.min(1, slice.probability)) * 100}%`;
    if (threshold !== null && slice.probability >= threshold) bar.classList.add("over");
    track.append(bar);
    if (threshold !== null) {
      const mark = element("div", null, "threshold");
      mark.style.left = `${threshold * 100}%`;
      mark.title = `threshold ${threshold}`;
      track.append(mark);
    }
    line.append(track);
    line.append(element("span", slice.probability.toFixed(3), "bar-value"));
    chart.append(line);
  }
  const rows = detail.slices.map((s) => {
    const row = element("tr");
    row.append(element("td", s.x_mm.toFixed(1), "number"));
    row.append(element("td", s.probability.toFixed(3), "number"));
    return row;
  });
  document.querySelector("#slice-table tbody").replaceChildren(...rows);
  $("slice-table").hidden = rows.length === 0;
}

function renderPreview(detail) {
  const figure = $("preview-figure");
  const image = $("preview");
  if (!detail.preview_url) {
    figure.hidden = true;
    $("no-preview").hidden = false;
    return;
  }
  $("no-preview").hidden = true;
  figure.hidden = false;
  if (page.previewSrc !== detail.preview_url) {
    page.previewSrc = detail.preview_url;
    image.src = detail.preview_url;
    $("preview-link").href = detail.preview_url;
  }
  image.alt = `What the model saw for this study: ${detail.slices.length} sagittal slices of the ` +
    `ROI${detail.vertebra ? ` on ${detail.vertebra}` : ""}, three input channels each, ` +
    `with per-slice probabilities and the ROI box on a sagittal view.`;
}

function renderDeliveries(detail) {
  const rows = detail.delivery_list.map((d) => {
    const row = element("tr", null, `delivery-${d.state}`);
    row.append(element("td", d.destination));
    row.append(element("td", d.kind));
    row.append(element("td", d.state));
    row.append(element("td", `${d.attempts}/${d.max_attempts}`, "number"));
    row.append(element("td", d.last_error || ""));
    return row;
  });
  document.querySelector("#delivery-table tbody").replaceChildren(...rows);
  $("delivery-table").hidden = rows.length === 0;
}

function renderDetail(detail) {
  $("detail").hidden = false;
  $("detail").dataset.state = detail.state;
  $("detail-title").textContent =
    `${patientName(detail.patient_name)} · ${STATE_LABELS[detail.state] || detail.state}`;
  $("detail-demo").hidden = !(detail.model && detail.model.demonstration);
  const facts = $("detail-facts");
  facts.replaceChildren();
  fact(facts, "Patient ID", detail.patient_id);
  fact(facts, "Accession", detail.accession_number);
  fact(facts, "Study date", detail.study_date);
  fact(facts, "Description", detail.study_description);
  fact(facts, "Study UID", detail.study_instance_uid);
  fact(facts, "State", `${STATE_LABELS[detail.state] || detail.state} — ${detail.activity}`);
  fact(facts, "Probability", detail.probability === null ? null :
    `${probabilityText(detail.probability)} (threshold ${detail.threshold}; ${detail.label}, priority ${detail.priority})`);
  fact(facts, "Training domain", domainText(detail.domain));
  fact(facts, "Vertebra", detail.vertebra);
  fact(facts, "Source", detail.source === "automatic"
    ? "automatic analysis (ROI placed by the localiser)" : "reader's ROI");
  if (detail.reader && detail.automatic) {
    fact(facts, "Reader's ROI", `${STATE_LABELS[detail.reader.state]} ${probabilityText(detail.reader.probability)}`);
    fact(facts, "Automatic", `${STATE_LABELS[detail.automatic.state]} ${probabilityText(detail.automatic.probability)}`);
  }
  if (detail.bodies && detail.bodies.length) {
    fact(facts, "Bodies", detail.bodies
      .map((b, i) => `${b.vertebra || `#${i + 1}`} ${probabilityText(b.probability)}` +
        (b.in_domain === false ? ` (${OUTSIDE_DOMAIN})` : "")).join(" · "));
  }
  fact(facts, "Model", detail.model ?
    `${detail.model.name} ${detail.model.version}${detail.model.demonstration ? " (demonstration)" : ""}` : null);
  fact(facts, "Checkpoint sha256", detail.model ? detail.model.sha256 : null);
  for (const candidate of detail.shadow || []) {
    fact(facts, "Shadow candidate", `${candidate.model_name} ${candidate.model_version}: ` +
      `${probabilityText(candidate.patient_probability)} (${candidate.priority}; recorded only, never delivered)`);
  }
  if (detail.shadow_failure) fact(facts, "Shadow candidate failed", detail.shadow_failure);
  fact(facts, "Received", localTime(detail.received_at));
  fact(facts, "Result", localTime(detail.result_at));
  renderChart(detail);
  renderPreview(detail);
  renderDeliveries(detail);
  for (const row of document.querySelectorAll("#worklist tbody tr")) {
    row.classList.toggle("selected", row.dataset.uid === detail.study_instance_uid);
  }
}

function uidFromHash() {
  const match = /^#study=(.+)$/.exec(window.location.hash);
  return match ? decodeURIComponent(match[1]) : null;
}

async function refreshDetail() {
  const uid = uidFromHash();
  page.detailUid = uid;
  if (!uid) {
    $("detail").hidden = true;
    page.previewSrc = null;
    return;
  }
  try {
    renderDetail(await getJson(`/worklist/${encodeURIComponent(uid)}`));
  } catch (error) {
    $("detail").hidden = false;
    $("detail-title").textContent = `Study not found (${error.message})`;
  }
}

function setFilter(state) {
  page.filter = state;
  for (const button of document.querySelectorAll(".filters button")) {
    button.setAttribute("aria-pressed", String(button.dataset.state === state));
  }
  refreshList();
}

async function tick() {
  await Promise.all([refreshList(), page.detailUid ? refreshDetail() : Promise.resolve()]);
}

document.addEventListener("DOMContentLoaded", () => {
  for (const button of document.querySelectorAll(".filters button")) {
    button.addEventListener("click", () => setFilter(button.dataset.state));
  }
  $("close-detail").addEventListener("click", () => {
    history.replaceState(null, "", window.location.pathname + window.location.search);
    refreshDetail();
  });
  $("sign-out").addEventListener("click", signOut);
  showSession().catch(() => {});
  window.addEventListener("hashchange", refreshDetail);
  page.detailUid = uidFromHash();
  tick();
  page.timer = setInterval(tick, REFRESH_MS);
});
