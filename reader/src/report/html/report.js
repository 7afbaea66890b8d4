// memtrack's report page: every view of every window is computed here from the embedded data
// (see reader/src/report/html/data.rs for its layout and why it is exact).
"use strict";
(function () {
  const timing = { script: performance.now() };
  const D = JSON.parse(document.getElementById("memtrack-data").textContent);
  timing.parsed = performance.now();
  const N = D.heap.length;
  const NEVER = 4294967295;
  const NS = D.stack_node.length;
  const NN = D.node_frame.length;
  // The compact columns (see data.rs) back to plain ones.
  D.node_parent = new Uint32Array(NN);
  D.node_python = new Uint8Array(NN);
  for (let i = 1; i < NN; i++) D.node_parent[i] = i - D.node_up[i];
  for (const n of D.python_nodes) D.node_python[n] = 1;
  {
    const R = D.row_stack.length, alloc = new Uint32Array(R), free = new Uint32Array(R);
    const count = new Float64Array(R).fill(1), flags = new Uint8Array(R);
    let a = 0;
    for (let i = 0; i < R; i++) {
      a += D.row_alloc[i]; alloc[i] = a;
      free[i] = D.row_free[i] === 0 ? NEVER : a + D.row_free[i] - 1;
    }
    for (let i = 0; i < D.row_count.length; i += 2) count[D.row_count[i]] = D.row_count[i + 1];
    for (let i = 0; i < D.row_flags.length; i += 2) flags[D.row_flags[i]] = D.row_flags[i + 1];
    D.row_alloc = alloc; D.row_free = free; D.row_count = count; D.row_flags = flags;
    if (D.row_thread.length !== R) D.row_thread = new Uint32Array(R);
  }
  const $ = (id) => document.getElementById(id);
  const S = { k0: 0, k1: N - 1, view: "peak", shape: "icicle", py: D.summary.python_only,
    thread: -1, search: "", zoom: 0, sort: "bytes" };

  // ---- words and numbers ----
  const UNITS = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
  function human(n) {
    if (n < 1024) return n + " B";
    let v = n, u = 0;
    while (v >= 1024 && u < UNITS.length - 1) { v /= 1024; u++; }
    return v.toFixed(2) + " " + UNITS[u];
  }
  const grouped = (n) => Math.round(n).toString().replace(/\B(?=(\d{3})+(?!\d))/g, ",");
  const exact = (n) => grouped(n) + " bytes";
  const plural = (n, w) => grouped(n) + " " + w + (Math.round(n) === 1 ? "" : "s");
  const secs = (s) => (s < 10 ? s.toFixed(3) : s.toFixed(2)) + " s";
  const esc = (t) => t.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;").replace(/"/g, "&quot;");
  const tOf = (k) => (k / N) * D.span_seconds; // start of bucket k
  const kOf = (t) => Math.max(0, Math.min(N - 1, Math.floor((t / D.span_seconds) * N)));

  // ---- the call tree's children, once (CSR: kids[kidStart[n] .. kidStart[n+1]]) ----
  const kidStart = new Uint32Array(NN + 1);
  for (let i = 1; i < NN; i++) kidStart[D.node_parent[i] + 1]++;
  for (let i = 0; i < NN; i++) kidStart[i + 1] += kidStart[i];
  const kids = new Uint32Array(Math.max(NN - 1, 0));
  { const fill = kidStart.slice(0, NN);
    for (let i = 1; i < NN; i++) kids[fill[D.node_parent[i]]++] = i; }
  const depthOf = new Uint16Array(NN);
  for (let i = 1; i < NN; i++) depthOf[i] = depthOf[D.node_parent[i]] + 1;

  // ---- the selection: per stack bytes and counts of the view in the window ----
  function select() {
    const bytes = new Float64Array(NS), counts = new Float64Array(NS);
    const lo = 2 * S.k0, hi = 2 * S.k1 + 1;
    let snap = -1, peakK = S.k0;
    for (let k = S.k0; k <= S.k1; k++) if (D.heap[k] > D.heap[peakK]) peakK = k;
    snap = 2 * peakK;
    const rs = D.row_stack, rt = D.row_thread, ra = D.row_alloc, rf = D.row_free,
      rc = D.row_count, rb = D.row_bytes, fl = D.row_flags, th = S.thread;
    const n = rs.length;
    for (let i = 0; i < n; i++) {
      const a = ra[i];
      let take;
      switch (S.view) {
        case "peak":
          if (a > snap) { i = n; continue; } // rows are sorted by allocation position
          take = rf[i] > snap; break;
        case "allocated": take = a >= lo && a <= hi; break;
        case "leaks": take = (fl[i] & 2) !== 0 && a >= lo && a <= hi; break;
        default: take = (fl[i] & 1) !== 0 && a >= lo && a <= hi;
      }
      if (take && (th < 0 || rt[i] === th)) { bytes[rs[i]] += rb[i]; counts[rs[i]] += rc[i]; }
    }
    let total = 0, count = 0;
    for (let s = 0; s < NS; s++) { total += bytes[s]; count += counts[s]; }
    return { bytes, counts, total, count, peakK };
  }

  // ---- summary header ----
  function header() {
    const h = D.summary;
    $("cmd").textContent = h.command + "  [pid " + h.pid + "]";
    $("cmd").title = h.command;
    const tile = (k, v, s, title, cls) => `<div class="tile ${cls || ""}" title="${esc(title || "")}"><div class="k">${k}</div><div class="v">${v}</div><div class="s">${s}</div></div>`;
    let t = tile("Peak heap", human(h.peak_bytes), "at " + secs(h.peak_time_seconds), exact(h.peak_bytes));
    t += h.peak_rss_bytes == null ? tile("Peak RSS", "n/a", "no samples") :
      tile("Peak RSS", human(h.peak_rss_bytes), "at " + secs(h.peak_rss_time_seconds), exact(h.peak_rss_bytes));
    if (h.peak_mapped_bytes > 0)
      t += tile("Peak mapped", human(h.peak_mapped_bytes), "at " + secs(h.peak_mapped_time_seconds), exact(h.peak_mapped_bytes));
    // A recording stopped in a running process: its live blocks are not leaks.
    const stopped = h.end_reason === "detach";
    t += tile(stopped ? "Live at stop" : "Leaked", human(h.leaked_bytes),
      plural(h.leaked_allocations, "allocation") +
      (h.leaks_measured_at === "python_program_end" ? " (at Python's end)" : ""), exact(h.leaked_bytes),
      stopped ? "" : h.leaked_bytes > 0 ? "bad" : "ok");
    t += tile("Allocated", human(h.total_bytes), plural(h.total_allocations, "allocation"), exact(h.total_bytes));
    t += tile("Duration", secs(h.duration_seconds), h.threads + (h.threads === 1 ? " thread" : " threads"));
    t += tile("Capture", h.complete ? "complete" : "cut off",
      h.complete ? "ended by " + (h.end_reason || "exit") : "the process did not finish writing it", "",
      h.complete ? "ok" : "bad");
    $("tiles").innerHTML = t;
  }

  // ---- the timeline ----
  const SERIES = [
    { key: "heap", name: "Heap (high-water mark)", color: "var(--heap)" },
    { key: "mapped", name: "Mapped (mmap, high-water mark)", color: "var(--mapped)" },
    { key: "rss", name: "Resident (RSS)", color: "var(--rss)" },
  ].filter((s) => D[s.key] && D[s.key].some((v) => v > 0));
  const ML = 72, MR = 12, MT = 8, MB = 20;
  let TW = 0, TH = 170;
  const xOfK = (k) => ML + (k / N) * (TW - ML - MR);
  function niceStep(range, ticks) {
    if (!(range > 0)) return 1;
    const raw = range / ticks, mag = Math.pow(10, Math.floor(Math.log10(raw))), m = raw / mag;
    return (m <= 1 ? 1 : m <= 2 ? 2 : m <= 5 ? 5 : 10) * mag;
  }
  function byteStep(max) { // a step that reads well in binary units
    let unit = 1; while (max / unit >= 1024 * 4 && unit < Math.pow(1024, 5)) unit *= 1024;
    return niceStep(max / unit, 4) * unit;
  }
  function timeline() {
    const box = $("timeline");
    TW = box.clientWidth;
    const ymax = Math.max(1, ...SERIES.map((s) => Math.max(...D[s.key]))) * 1.08;
    const y = (v) => MT + (1 - v / ymax) * (TH - MT - MB);
    let svg = `<svg width="${TW}" height="${TH}" id="tsvg">`;
    const step = byteStep(ymax);
    for (let v = 0; v <= ymax; v += step) {
      svg += `<line x1="${ML}" x2="${TW - MR}" y1="${y(v)}" y2="${y(v)}" stroke="#eaeef2"/>`;
      svg += `<text x="${ML - 6}" y="${y(v) + 4}" text-anchor="end">${v === 0 ? "0" : human(v)}</text>`;
    }
    const ts = niceStep(D.span_seconds, 8);
    for (let t = 0; t <= D.span_seconds + 1e-9; t += ts) {
      const x = ML + (t / D.span_seconds) * (TW - ML - MR);
      svg += `<line x1="${x}" x2="${x}" y1="${TH - MB}" y2="${TH - MB + 4}" stroke="#8c959f"/>`;
      svg += `<text x="${x}" y="${TH - 4}" text-anchor="middle">${+t.toFixed(6)} s</text>`;
    }
    svg += `<line x1="${ML}" x2="${TW - MR}" y1="${TH - MB}" y2="${TH - MB}" stroke="#8c959f"/>`;
    for (const s of SERIES) {
      const v = D[s.key];
      let d = `M${xOfK(0)},${y(v[0])}`;
      for (let k = 0; k < N; k++) d += `V${y(v[k]).toFixed(1)}H${xOfK(k + 1).toFixed(1)}`;
      svg += `<path d="${d}" fill="none" stroke="${s.color}" stroke-width="1.6"/>`;
    }
    svg += `<rect id="selrect" y="${MT}" height="${TH - MT - MB}" fill="var(--sel)" stroke="var(--accent)" stroke-width="1"/>`;
    svg += `<line id="peakline" y1="${MT}" y2="${TH - MB}" stroke="var(--heap)" stroke-dasharray="3,3"/>`;
    svg += `<rect id="hit" x="${ML}" y="0" width="${TW - ML - MR}" height="${TH}" fill="transparent"/></svg>`;
    box.innerHTML = svg;
    $("legend").innerHTML = SERIES.map((s) => `<span><i style="background:${s.color}"></i>${s.name}</span>`).join("");
    drag();
  }
  function showWindow(peakK) {
    const r = $("selrect"), whole = S.k0 === 0 && S.k1 === N - 1;
    r.setAttribute("x", xOfK(S.k0)); r.setAttribute("width", Math.max(1, xOfK(S.k1 + 1) - xOfK(S.k0)));
    r.style.display = whole ? "none" : "";
    const pl = $("peakline"), x = (xOfK(peakK) + xOfK(peakK + 1)) / 2;
    pl.setAttribute("x1", x); pl.setAttribute("x2", x);
    pl.style.display = S.view === "peak" ? "" : "none";
  }
  function drag() {
    const hit = $("hit");
    let from = null;
    const kAt = (e) => {
      const x = e.clientX - hit.getBoundingClientRect().left;
      return Math.max(0, Math.min(N - 1, Math.floor((x / (TW - ML - MR)) * N)));
    };
    hit.addEventListener("mousedown", (e) => { from = kAt(e); e.preventDefault(); });
    window.addEventListener("mousemove", (e) => {
      if (from === null) return;
      const k = kAt(e);
      S.k0 = Math.min(from, k); S.k1 = Math.max(from, k);
      showWindow(S.k0);
    });
    window.addEventListener("mouseup", (e) => {
      if (from === null) return;
      const k = kAt(e);
      if (k !== from) { S.k0 = Math.min(from, k); S.k1 = Math.max(from, k); S.zoom = 0; }
      from = null;
      update();
    });
    hit.addEventListener("dblclick", reset);
    hit.addEventListener("mousemove", (e) => {
      if (from !== null) return;
      const k = kAt(e);
      hit.innerHTML = `<title>${secs(tOf(k))} to ${secs(tOf(k + 1))}\n` +
        SERIES.map((s) => `${s.name}: ${human(D[s.key][k])} (${exact(D[s.key][k])})`).join("\n") + "</title>";
    });
  }
  function reset() { S.k0 = 0; S.k1 = N - 1; S.zoom = 0; update(); }

  // ---- the flamegraph ----
  const ROW = 18;
  const MIN_W = 1; // frames narrower than a pixel are not drawn (search still counts them)
  function color(label, python) {
    let h = 0;
    for (let i = 0; i < label.length; i++) h = (h * 31 + label.charCodeAt(i)) >>> 0;
    const f = (h % 1000) / 1000;
    return python ? `hsl(${190 + f * 30},60%,${72 + f * 10}%)` : `hsl(${18 + f * 30},85%,${64 + f * 12}%)`;
  }
  function flame(sel) {
    const val = new Float64Array(NN), cnt = new Float64Array(NN);
    const nodeOf = S.py ? D.stack_py_node : D.stack_node;
    for (let s = 0; s < NS; s++) if (sel.bytes[s] > 0) { val[nodeOf[s]] += sel.bytes[s]; cnt[nodeOf[s]] += sel.counts[s]; }
    for (let i = NN - 1; i > 0; i--) { val[D.node_parent[i]] += val[i]; cnt[D.node_parent[i]] += cnt[i]; }
    const box = $("flame");
    const W = box.clientWidth - 2;
    let re = null;
    if (S.search) { try { re = new RegExp(S.search, "i"); } catch (e) { re = null; } }
    let zoom = S.zoom;
    if (val[zoom] <= 0) zoom = S.zoom = 0;
    const total = val[zoom];
    if (total <= 0) { box.innerHTML = `<div class="empty">Nothing in this selection.</div>`; $("details").innerHTML = "&nbsp;"; return 0; }
    // The path down to the zoomed frame, drawn full width.
    const up = [];
    for (let n = zoom; n !== 0; n = D.node_parent[n]) up.push(n);
    up.push(0); up.reverse();
    const items = []; // [node, x, width, depth, matched, faded]
    for (let i = 0; i < up.length - 1; i++) items.push([up[i], 0, W, i, false, true]);
    let matched = 0, maxDepth = up.length - 1;
    const stack = [[zoom, 0, up.length - 1, false]];
    while (stack.length) {
      const [n, x, d, inMatch] = stack.pop();
      const w = (val[n] / total) * W;
      const label = D.frames[D.node_frame[n]];
      const m = re !== null && n !== 0 && re.test(label);
      if (m && !inMatch) matched += val[n];
      items.push([n, x, w, d, m, false]);
      if (d > maxDepth) maxDepth = d;
      const ks = [];
      for (let j = kidStart[n]; j < kidStart[n + 1]; j++) { const c = kids[j]; if (val[c] > 0 && (val[c] / total) * W >= MIN_W) ks.push(c); }
      ks.sort((a, b) => val[b] - val[a] || a - b);
      let cx = x;
      for (const c of ks) { stack.push([c, cx, d + 1, inMatch || m]); cx += (val[c] / total) * W; }
      if (re !== null && !m && !inMatch) { // matches too narrow to draw still count
        const sub = [];
        for (let j = kidStart[n]; j < kidStart[n + 1]; j++) { const c = kids[j]; if (val[c] > 0 && (val[c] / total) * W < MIN_W) sub.push(c); }
        while (sub.length) {
          const c = sub.pop();
          if (re.test(D.frames[D.node_frame[c]])) { matched += val[c]; continue; }
          for (let j = kidStart[c]; j < kidStart[c + 1]; j++) if (val[kids[j]] > 0) sub.push(kids[j]);
        }
      }
    }
    const height = (maxDepth + 1) * ROW;
    let html = `<div style="position:relative;height:${height}px;width:${W}px">`;
    for (const [n, x, w, d, m, faded] of items) {
      const label = D.frames[D.node_frame[n]];
      const top = S.shape === "flame" ? (maxDepth - d) * ROW : d * ROW;
      const pct = ((val[n] / val[0]) * 100).toFixed(2);
      const title = `${label}\n${human(val[n])} (${exact(val[n])}), ${pct}% of the selection\n${plural(cnt[n], "allocation")}`;
      html += `<div class="fr${m ? " m" : ""}${faded ? " up" : ""}" data-n="${n}" data-name="${esc(label)}" data-bytes="${val[n]}" title="${esc(title)}" ` +
        `style="left:${x.toFixed(1)}px;top:${top}px;width:${Math.max(w - 1, 0.5).toFixed(1)}px;background:${color(label, D.node_python[n] === 1)}">` +
        (w > 28 ? esc(label) : "") + `</div>`;
    }
    box.innerHTML = html + "</div>";
    if (S.shape === "flame") box.scrollTop = box.scrollHeight;
    $("details").innerHTML = re === null ? (zoom ? `Zoomed into <b>${esc(D.frames[D.node_frame[zoom]])}</b>: click the top frame to zoom out.` : "Click a frame to zoom in; hover for exact figures.")
      : `Matched <b>${human(matched)}</b> (${exact(matched)}), ${((matched / val[0]) * 100).toFixed(2)}% of the selection`;
    return items.length;
  }

  // ---- the table of allocating locations ----
  function table(sel) {
    const nl = D.locs.length, b = new Float64Array(nl), c = new Float64Array(nl);
    for (let s = 0; s < NS; s++) if (sel.bytes[s] > 0 || sel.counts[s] > 0) { b[D.stack_loc[s]] += sel.bytes[s]; c[D.stack_loc[s]] += sel.counts[s]; }
    const rows = [];
    for (let l = 0; l < nl; l++) if (b[l] > 0) rows.push(l);
    const key = { bytes: (l) => -b[l], count: (l) => -c[l], avg: (l) => -(b[l] / c[l]), loc: (l) => D.locs[l] }[S.sort];
    rows.sort((x, y) => { const a = key(x), z = key(y); return a < z ? -1 : a > z ? 1 : b[y] - b[x] || x - y; });
    const shown = rows.slice(0, 300);
    let re = null;
    if (S.search) { try { re = new RegExp(S.search, "i"); } catch (e) { re = null; } }
    const max = shown.reduce((m, l) => Math.max(m, b[l]), 1);
    $("table").tBodies[0].innerHTML = shown.map((l) =>
      `<tr class="${re && re.test(D.locs[l]) ? "m" : ""}"><td class="loc">${esc(D.locs[l])}</td>` +
      `<td class="num" title="${exact(b[l])}" data-bytes="${b[l]}"><span class="bar" style="width:${Math.round((b[l] / max) * 60)}px"></span>${human(b[l])}</td>` +
      `<td class="num">${((b[l] / sel.total) * 100).toFixed(1)}%</td><td class="num">${grouped(c[l])}</td>` +
      `<td class="num" title="${exact(Math.round(b[l] / c[l]))}">${human(Math.round(b[l] / c[l]))}</td></tr>`).join("");
    $("tablenote").textContent = rows.length > shown.length ? `the ${shown.length} largest of ${rows.length} locations` : plural(rows.length, "location");
    for (const th of document.querySelectorAll("#table th")) th.classList.toggle("on", th.dataset.sort === S.sort && th.textContent !== "Share");
  }

  // ---- putting it together ----
  const WORDS = { peak: "live at the high-water mark", leaks: "leaked (allocated in the window, never freed)",
    allocated: "allocated in the window", temporary: "temporary (freed before the thread allocated again), allocated in the window" };
  function update() {
    const sel = select();
    showWindow(sel.peakK);
    const whole = S.k0 === 0 && S.k1 === N - 1;
    const t0 = tOf(S.k0), t1 = tOf(S.k1 + 1);
    let w = whole ? `Whole run (0 to ${secs(D.span_seconds)})` : `Window <b>${secs(t0)}</b> to <b>${secs(t1)}</b>`;
    const hw = D.heap[sel.peakK];
    const at = D.peak_time[sel.peakK], from = tOf(sel.peakK);
    w += `: heap high-water mark <b title="${exact(hw)}">${human(hw)}</b> ` +
      (at < from ? `at ${secs(from)} (held since ${secs(at)})` : `at ${secs(at)}`);
    $("selection").innerHTML = w;
    let what = `<b>${WORDS[S.view]}</b>: <b title="${exact(sel.total)}">${human(sel.total)}</b> in ${plural(sel.count, "allocation")}`;
    if (S.thread >= 0) what += `, thread ${D.threads[S.thread]} only` + (S.view === "peak" ? " (at the whole heap's high-water mark)" : "");
    if (S.py) what += ", Python frames only";
    if (D.pruned_stacks > 0) what += ` &middot; <span class="hint">${grouped(D.pruned_stacks)} stacks that each held under ${D.pruned_below_percent.toPrecision(2)}% of every view are merged into one frame; totals stay exact</span>`;
    $("what").innerHTML = what;
    for (const b of document.querySelectorAll("#views button")) b.classList.toggle("on", b.dataset.view === S.view);
    for (const b of document.querySelectorAll("#shape button")) b.classList.toggle("on", b.dataset.shape === S.shape);
    flame(sel);
    table(sel);
  }
  function controls() {
    for (const b of document.querySelectorAll("#views button")) b.onclick = () => { S.view = b.dataset.view; S.zoom = 0; update(); };
    for (const b of document.querySelectorAll("#shape button")) b.onclick = () => { S.shape = b.dataset.shape; update(); };
    $("python").checked = S.py;
    $("python").onchange = (e) => { S.py = e.target.checked; S.zoom = 0; update(); };
    $("reset").onclick = reset;
    const th = $("thread");
    th.innerHTML = `<option value="-1">All threads</option>` + D.threads.map((t, i) => `<option value="${i}">Thread ${t}</option>`).join("");
    th.disabled = D.threads.length < 2;
    th.onchange = () => { S.thread = +th.value; update(); };
    let timer = 0;
    $("search").oninput = (e) => { clearTimeout(timer); timer = setTimeout(() => { S.search = e.target.value.trim(); update(); }, 150); };
    for (const h of document.querySelectorAll("#table th")) h.onclick = () => { S.sort = h.dataset.sort; update(); };
    $("flame").addEventListener("click", (e) => {
      const f = e.target.closest(".fr");
      if (!f) return;
      const n = +f.dataset.n;
      S.zoom = n === S.zoom ? D.node_parent[n] : n;
      update();
    });
    let rt = 0;
    window.addEventListener("resize", () => { clearTimeout(rt); rt = setTimeout(() => { timeline(); update(); }, 100); });
  }

  timing.decoded = performance.now();
  header();
  controls();
  timeline();
  update();
  timing.rendered = performance.now();
  // For tests and scripts: where a time is on the page, how long the page took to show (from
  // navigation to the first frame painted after the first render), and a window picked by code.
  window.memtrack = {
    loadMs: null, timing, buckets: N, span: D.span_seconds, state: S,
    xOf(t) { const r = $("hit").getBoundingClientRect(); return r.left + (t / D.span_seconds) * r.width; },
    yMid() { const r = $("hit").getBoundingClientRect(); return r.top + r.height / 2; },
    path(n) { const p = []; for (; n !== 0; n = D.node_parent[n]) p.push(D.frames[D.node_frame[n]]); return p.reverse().join(";"); },
    select(t0, t1) { const s = performance.now(); S.k0 = kOf(t0); S.k1 = kOf(t1); S.zoom = 0; update(); return performance.now() - s; },
  };
  requestAnimationFrame(() => setTimeout(() => {
    const loadMs = window.memtrack.loadMs = performance.now();
    $("footer").textContent = `memtrack report; ${grouped(NS)} stacks, ${grouped(D.row_stack.length)} intervals, ` +
      `${N} time buckets (${secs(D.span_seconds / N)} each); ` + (D.summary.note ? D.summary.note + "; " : "") +
      `shown in ${Math.round(loadMs)} ms.`;
    timing.shown = loadMs;
    timing.frames = document.querySelectorAll("#flame .fr").length;
    document.body.dataset.timing = JSON.stringify(timing, (k, v) => (typeof v === "number" ? Math.round(v) : v));
    document.body.dataset.ready = "1";
  }, 0));
})();
