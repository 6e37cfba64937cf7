// Tidepool demo dashboard: plain JS against the same origin's API, no build step.
// Reads the users / daily_metrics / cohort_risk datasets, charts them with Plotly.js
// (tables when Plotly is not installed), shows data freshness from the response
// headers, and writes notes through the write-back API with an Idempotency-Key.
'use strict';

const $ = (id) => document.getElementById(id);
const hasPlotly = () => typeof window.Plotly === 'object' && window.Plotly !== null;

// One API call: resolves to {ok, status, headers, body, problem, notDeployed}; never
// throws (a network failure is status 0).
async function api(path, opts = {}) {
  let res;
  try {
    res = await fetch(path, Object.assign({ headers: { Accept: 'application/json' } }, opts));
  } catch (e) {
    return { ok: false, status: 0, headers: new Headers(), body: null,
             problem: { detail: 'network error: ' + e.message }, notDeployed: false };
  }
  const text = await res.text();
  let body = null;
  try { body = text ? JSON.parse(text) : null; } catch (e) { body = text; }
  const isProblem = (res.headers.get('Content-Type') || '').startsWith('application/problem+json');
  const problem = !res.ok ? (isProblem && body && typeof body === 'object' ? body
                                                                            : { detail: String(text).slice(0, 200) })
                          : null;
  // 404 unknown-route, 405 and 501 mean the endpoint is not deployed on this server.
  const code = problem && problem.code;
  const notDeployed = res.status === 501 || res.status === 405 ||
                      (res.status === 404 && (code === 'unknown-route' || code === 'unknown-table' ||
                                              code === 'unknown-dataset' || !isProblem));
  return { ok: res.ok, status: res.status, headers: res.headers, body, problem, notDeployed };
}

function describe(r, what) {
  if (r.status === 0) return `${what}: ${r.problem.detail}`;
  const detail = r.problem && (r.problem.detail || r.problem.title) || '';
  if (r.notDeployed) return `${what}: not available on this server (HTTP ${r.status}${detail ? ': ' + detail : ''})`;
  return `${what}: HTTP ${r.status}${r.problem && r.problem.code ? ' ' + r.problem.code : ''}${detail ? ' — ' + detail : ''}`;
}

function setStatus(el, text, bad) {
  el.textContent = text || '';
  el.classList.toggle('bad', !!bad);
}

function banner(text) {
  const b = $('banner');
  b.hidden = !text;
  b.textContent = text || '';
}

// ---- dates ----

function isoDay(d) { return d.toISOString().slice(0, 10); }

function defaultRange() {
  // The demo data covers the 90 days ending yesterday (UTC).
  const until = new Date(Date.now() - 86400000);
  const since = new Date(until.getTime() - 89 * 86400000);
  return [isoDay(since), isoDay(until)];
}

// ---- rendering: Plotly, or a table when Plotly is missing ----

function renderTable(el, cols, names, maxRows = 400) {
  const n = cols[names[0]] ? cols[names[0]].length : 0;
  const t = document.createElement('table');
  t.className = 'data';
  const head = t.createTHead().insertRow();
  for (const c of names) { const th = document.createElement('th'); th.textContent = c; head.appendChild(th); }
  const tb = t.createTBody();
  // A column with any fraction shows one decimal on every row, so digits line up.
  const frac = Object.fromEntries(names.map((c) => [c, (cols[c] || []).some(
    (v) => typeof v === 'number' && !Number.isInteger(v))]));
  for (let i = 0; i < Math.min(n, maxRows); i++) {
    const tr = tb.insertRow();
    for (const c of names) {
      const v = cols[c] ? cols[c][i] : null;
      tr.insertCell().textContent = v === null || v === undefined ? '' :
        typeof v === 'number' && frac[c] ? v.toFixed(1) : String(v);
    }
  }
  const wrap = document.createElement('div');
  wrap.className = 'table-wrap';
  wrap.appendChild(t);
  el.replaceChildren(wrap);
}

function plot(el, traces, layout) {
  const base = { margin: { l: 56, r: 16, t: 8, b: 40 }, legend: { orientation: 'h', y: 1.12 },
                 paper_bgcolor: '#fff', plot_bgcolor: '#fff', hovermode: 'x unified' };
  window.Plotly.react(el, traces, Object.assign(base, layout),
                      { displaylogo: false, responsive: true, displayModeBar: 'hover' });
}

function clearChart(el, text) {
  if (hasPlotly()) window.Plotly.purge(el);
  const p = document.createElement('p');
  p.className = 'status';
  p.textContent = text;
  el.replaceChildren(p);
}

function lineChart(el, cols, y, ma, label, color, fromZero) {
  if (!hasPlotly()) return renderTable(el, cols, ['day', y, ma]);
  plot(el, [
    { x: cols.day, y: cols[y], name: label, type: 'scatter', mode: 'lines+markers',
      line: { color, width: 1 }, marker: { size: 4 }, opacity: 0.55 },
    { x: cols.day, y: cols[ma], name: label + ' (7-day average)', type: 'scatter', mode: 'lines',
      line: { color, width: 3 } },
  ], { yaxis: { title: { text: label }, rangemode: fromZero ? 'tozero' : 'normal' },
       xaxis: { type: 'date' } });
}

function riskChart(el, cols, color) {
  if (!hasPlotly()) return renderTable(el, cols, ['cohort', 'users', 'avg_risk']);
  plot(el, [{
    x: cols.cohort, y: cols.avg_risk, type: 'bar', name: 'average risk',
    marker: { color }, text: cols.users.map((u) => u + (u === 1 ? ' user' : ' users')),
    textposition: 'outside', textangle: 0, textfont: { size: 10 }, cliponaxis: false,
    hovertemplate: '%{x}: risk %{y}<br>%{text}<extra></extra>',
  }], { yaxis: { title: { text: 'average risk' }, range: [0, Math.max(...cols.avg_risk) * 1.18] },
        xaxis: { automargin: true }, margin: { l: 56, r: 16, t: 30, b: 70 },
        hovermode: 'closest', showlegend: false });
}

// ---- freshness ----

function freshness(r, what) {
  const lm = r.headers.get('Last-Modified');
  const gen = r.headers.get('X-Tidepool-Generation');
  const src = r.headers.get('X-Tidepool-Source');
  const parts = [];
  if (lm) {
    const age = Math.max(0, Math.round((Date.now() - Date.parse(lm)) / 60000));
    parts.push(`synced ${lm} (${age < 120 ? age + ' min' : Math.round(age / 60) + ' h'} ago)`);
  } else {
    parts.push('never synced');
  }
  if (gen) parts.push('generation ' + gen);
  if (src) parts.push('answered from ' + src);
  return `${what}: ${parts.join(' · ')}`;
}

// ---- loaders ----

let loadSeq = 0;

async function loadUsers() {
  const sel = $('user');
  const r = await api('/api/v1/datasets/users?shape=columns');
  if (!r.ok) {
    sel.replaceChildren(new Option('(no users)', ''));
    banner(describe(r, 'users'));
    return false;
  }
  const c = r.body;
  const prev = new URLSearchParams(location.search).get('user_id');
  const opts = (c.user_id || []).map((id, i) => {
    const extra = [c.gender && c.gender[i], c.age && c.age[i] != null ? 'age ' + c.age[i] : null,
                   c.risk && c.risk[i] != null ? 'risk ' + c.risk[i] : null].filter(Boolean);
    return new Option(`User ${id}${extra.length ? ' — ' + extra.join(', ') : ''}`, String(id));
  });
  if (!opts.length) {
    sel.replaceChildren(new Option('(no users synced yet)', ''));
    banner('The users dataset is empty: the sync daemon has not filled iot.users yet.');
    return false;
  }
  sel.replaceChildren(...opts);
  if (prev && opts.some((o) => o.value === prev)) sel.value = prev;
  return true;
}

async function loadMetrics() {
  const seq = ++loadSeq;
  const user = $('user').value;
  const st = $('metrics-status');
  if (!user) { setStatus(st, 'pick a user'); return; }
  const q = new URLSearchParams({ user_id: user, since: $('since').value, until: $('until').value,
                                  shape: 'columns' });
  setStatus(st, 'loading…');
  const r = await api('/api/v1/datasets/daily_metrics?' + q);
  if (seq !== loadSeq) return; // a newer selection superseded this one
  if (!r.ok) {
    setStatus(st, describe(r, 'daily metrics'), true);
    clearChart($('steps-chart'), 'no data');
    clearChart($('calories-chart'), 'no data');
    return;
  }
  $('freshness').textContent = freshness(r, 'daily metrics');
  const c = r.body;
  const n = c.day ? c.day.length : 0;
  if (!n) {
    setStatus(st, `no days for user ${user} between ${q.get('since')} and ${q.get('until')}`);
    clearChart($('steps-chart'), 'no data in this range');
    clearChart($('calories-chart'), 'no data in this range');
    return;
  }
  lineChart($('steps-chart'), c, 'steps', 'steps_ma7', 'steps', '#1f6feb', true);
  // Calories hover around a basal ~1,400 a day: from zero the averages look flat.
  lineChart($('calories-chart'), c, 'calories', 'calories_ma7', 'calories', '#e36209', false);
  setStatus(st, `${n} days for user ${user}`);
}

async function loadRisk() {
  const st = $('risk-status');
  const msgs = [];
  for (const [metric, color] of [['weight', '#2da44e'], ['cholesterol', '#bf3989']]) {
    const el = $(`risk-${metric}-chart`);
    const r = await api('/api/v1/datasets/cohort_risk?shape=columns&metric=' + metric);
    if (!r.ok) { msgs.push(describe(r, 'cohort risk by ' + metric)); clearChart(el, 'no data'); continue; }
    if (!r.body.cohort || !r.body.cohort.length) { clearChart(el, 'no cohorts synced yet'); continue; }
    riskChart(el, r.body, color);
  }
  setStatus(st, msgs.join('; '), msgs.length > 0);
}

async function loadNotes() {
  const st = $('notes-status');
  const list = $('notes-list');
  const user = $('user').value;
  if (!user) { list.replaceChildren(); return; }
  const q = new URLSearchParams({ user_id: 'eq.' + user, order: 'created_at.desc', limit: '20' });
  const r = await api('/api/v1/tables/app.user_notes?' + q);
  let rows;
  if (r.ok) {
    rows = Array.isArray(r.body) ? r.body : [];
    setStatus(st, rows.length ? '' : 'no notes for this user yet');
  } else {
    // Without a readable table (its comment lacks @expose) show what this page wrote.
    rows = written.filter((row) => String(row.user_id) === user);
    setStatus(st, describe(r, 'reading notes') +
                  (rows.length ? ' — showing the notes written from this page' : ''), !r.notDeployed);
  }
  list.replaceChildren(...rows.map((row) => {
    const li = document.createElement('li');
    li.textContent = row.note;
    const t = document.createElement('time');
    t.textContent = `${row.author || ''} ${row.created_at || ''} v${row.version ?? ''}`.trim();
    li.appendChild(t);
    return li;
  }));
}

// ---- the notes form ----

function uuid() {
  if (window.crypto && typeof crypto.randomUUID === 'function') return crypto.randomUUID();
  // crypto.randomUUID needs a secure context; plain http on a LAN address lacks it.
  const b = crypto.getRandomValues(new Uint8Array(16));
  b[6] = (b[6] & 0x0f) | 0x40; b[8] = (b[8] & 0x3f) | 0x80;
  const h = [...b].map((x) => x.toString(16).padStart(2, '0')).join('');
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

// The key stays with the same body until the server answers, so a retry after a
// network failure cannot write the note twice.
let pending = null; // {body, key}
const written = []; // rows the server answered for this page's writes, newest first

function clearFieldErrors() {
  for (const el of document.querySelectorAll('#note-form .field-error')) el.textContent = '';
  for (const el of document.querySelectorAll('[aria-invalid]')) el.removeAttribute('aria-invalid');
}

function showProblem(r) {
  const errs = (r.problem && Array.isArray(r.problem.errors)) ? r.problem.errors : [];
  let placed = false;
  for (const e of errs) {
    const slot = document.querySelector(`#note-form .field-error[data-field="${CSS.escape(String(e.field || ''))}"]`);
    if (!slot) continue;
    slot.textContent = `${e.field}: ${e.message}`;
    const input = e.field === 'user_id' ? $('user') : $(e.field);
    if (input) input.setAttribute('aria-invalid', 'true');
    placed = true;
  }
  const others = errs.filter((e) => !document.querySelector(`#note-form .field-error[data-field="${CSS.escape(String(e.field || ''))}"]`));
  const extra = others.map((e) => `${e.field}: ${e.message}`).join('; ');
  if (!placed || extra) $('form-error').textContent = describe(r, 'saving the note') + (extra ? ` (${extra})` : '');
}

async function submitNote(ev) {
  ev.preventDefault();
  clearFieldErrors();
  const user = Number($('user').value);
  const body = JSON.stringify({ user_id: user, note: $('note').value });
  if (!pending || pending.body !== body) pending = { body, key: uuid() };
  const btn = $('note-submit');
  btn.disabled = true;
  const r = await api('/api/v1/tables/app.user_notes', {
    method: 'POST', body,
    headers: { 'Content-Type': 'application/json', Accept: 'application/json',
               'Idempotency-Key': pending.key },
  });
  btn.disabled = false;
  if (r.status !== 0) pending = null; // answered: the next submit is a new write
  if (!r.ok) { showProblem(r); return; }
  $('write-result').hidden = false;
  $('write-etag').textContent = 'ETag ' + (r.headers.get('ETag') || '(none)') +
    (r.headers.get('Idempotent-Replayed') ? ' · replayed' : '');
  $('write-row').textContent = JSON.stringify(r.body, null, 2);
  if (r.body && typeof r.body === 'object' && !written.some((w) => w.id === r.body.id))
    written.unshift(r.body);
  $('note').value = '';
  loadNotes();
}

// ---- wiring ----

function reloadUser() {
  const u = new URL(location.href);
  if ($('user').value) u.searchParams.set('user_id', $('user').value);
  history.replaceState(null, '', u);
  loadMetrics();
  loadNotes();
}

async function main() {
  const [since, until] = defaultRange();
  $('since').value = since;
  $('until').value = until;
  if (!hasPlotly())
    banner('Plotly.js is not installed on this server (/web/vendor/plotly.min.js is missing; ' +
           'run scripts/fetch-web-vendor.sh), so the figures are shown as tables.');
  $('user').addEventListener('change', reloadUser);
  $('since').addEventListener('change', loadMetrics);
  $('until').addEventListener('change', loadMetrics);
  $('refresh').addEventListener('click', () => { loadMetrics(); loadRisk(); loadNotes(); });
  $('note-form').addEventListener('submit', submitNote);
  loadRisk();
  if (await loadUsers()) reloadUser();
  else setStatus($('metrics-status'), 'no user to show');
}

document.addEventListener('DOMContentLoaded', main);
