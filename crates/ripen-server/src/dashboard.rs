//! The dashboard at `/`: one static page that reads the public API.

use axum::response::Html;

pub async fn page() -> Html<&'static str> {
    Html(PAGE)
}

const PAGE: &str = r##"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Ripen</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{font:14px system-ui,sans-serif;margin:0;background:#fafaf7;color:#222}
header{background:#2f5d3a;color:#fff;padding:10px 20px;display:flex;gap:20px;align-items:center}
header h1{font-size:18px;margin:0}
main{display:grid;grid-template-columns:minmax(420px,1fr) 1fr;gap:16px;padding:16px}
table{border-collapse:collapse;width:100%;background:#fff}
td,th{padding:4px 8px;border-bottom:1px solid #eee;text-align:left;white-space:nowrap}
tr.row{cursor:pointer} tr.row:hover{background:#f0f5ef}
.pending{color:#b7791f}.ready{color:#2f855a}.failed{color:#c53030}.cancelled{color:#718096}
.succeeded{color:#2f855a}.running,.queued{color:#2b6cb0}.retrying{color:#b7791f}.skipped,.blocked{color:#718096}
section{background:#fff;padding:12px;border:1px solid #eee}
code{font-size:12px} button{margin-right:8px}
</style></head><body>
<header><h1>Ripen</h1>
<label>status <select id="status"><option value="">all</option><option>pending</option><option>ready</option><option>failed</option><option>cancelled</option></select></label>
<span id="counts"></span></header>
<main><div><table><thead><tr><th>id</th><th>type</th><th>status</th><th>steps</th><th>created</th></tr></thead><tbody id="rows"></tbody></table></div>
<section id="detail">Select an entity.</section></main>
<script>
let selected = null;
const esc = s => String(s ?? "").replace(/[&<>"']/g, c => ({"&":"&amp;","<":"&lt;",">":"&gt;",'"':"&quot;","'":"&#39;"}[c]));
async function refresh() {
  const st = document.getElementById("status").value;
  const r = await fetch("/v1/entities?limit=100" + (st ? "&status=" + st : ""));
  if (!r.ok) return;
  const page = await r.json();
  document.getElementById("rows").innerHTML = page.items.map(e =>
    `<tr class="row" data-id="${esc(e.id)}"><td><code>${esc(e.id)}</code></td><td>${esc(e.type)}</td>` +
    `<td class="${esc(e.status)}">${esc(e.status)}${e.degraded ? " (degraded)" : ""}</td>` +
    `<td>${e.steps.map(s => `<span class="${esc(s.status)}" title="${esc(s.name)}: ${esc(s.status)}">&#9679;</span>`).join("")}</td>` +
    `<td>${esc(e.created_at.slice(11, 23))}</td></tr>`).join("");
  document.querySelectorAll("tr.row").forEach(tr => tr.onclick = () => { selected = tr.dataset.id; detail(); });
  if (selected) detail();
}
async function act(verb) {
  await fetch(`/v1/entities/${selected}/${verb}`, {method: "POST"});
  detail();
}
async function detail() {
  const [e, ev] = await Promise.all([
    fetch(`/v1/entities/${selected}`).then(r => r.json()),
    fetch(`/v1/entities/${selected}/events`).then(r => r.json())]);
  document.getElementById("detail").innerHTML =
    `<h3><code>${esc(e.id)}</code> <span class="${esc(e.status)}">${esc(e.status)}</span></h3>` +
    `<button onclick="act('retry')">retry</button><button onclick="act('cancel')">cancel</button>` +
    `<table><tr><th>step</th><th>executor</th><th>status</th><th>attempts</th><th>last error</th></tr>` +
    e.steps.map(s => `<tr><td>${esc(s.name)}${s.critical ? "" : " (non-critical)"}</td>` +
      `<td>${esc(s.executor)}${s.worker ? ` (held by ${esc(s.worker)})` : ""}</td><td class="${esc(s.status)}">${esc(s.status)}</td>` +
      `<td>${s.attempts}</td><td>${esc(s.last_error)}</td></tr>`).join("") + `</table>` +
    `<h4>history</h4><table>` + (Array.isArray(ev) ? ev : []).map(x =>
      `<tr><td>${x.seq}</td><td>${esc(x.at.slice(11, 26))}</td><td>${esc(x.kind)}</td><td>${esc(x.step)}</td>` +
      `<td>${esc(x.attempt)}</td><td>${esc(x.error || x.to || "")}</td></tr>`).join("") + `</table>`;
}
document.getElementById("status").onchange = refresh;
refresh(); setInterval(refresh, 1000);
</script></body></html>
"##;
