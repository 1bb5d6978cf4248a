// voxplain report viewer: slices through the input and overlays one attribution map.
// Volumes are uint8, zlib-compressed, base64; C order over (X, Y, Z) in RAS voxel order.
"use strict";
(function () {
  const DATA = JSON.parse(document.getElementById("voxplain-data").textContent);
  const VIEWS = [
    // fixed axis, horizontal axis, vertical axis (drawn bottom-up)
    { id: "axial", fixed: 2, h: 0, v: 1 },
    { id: "coronal", fixed: 1, h: 0, v: 2 },
    { id: "sagittal", fixed: 0, h: 1, v: 2 },
  ];
  const cache = new Map();
  const $ = (id) => document.getElementById(id);
  const state = { study: 0, target: null, method: null, channel: 0, opacity: 0.6, pos: [0, 0, 0],
                  showTruth: true, showPredicted: true };
  const TRUTH = [60, 240, 60], PREDICTED = [32, 208, 255];

  async function decode(b64) {
    if (cache.has(b64)) return cache.get(b64);
    const raw = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
    const stream = new Blob([raw]).stream().pipeThrough(new DecompressionStream("deflate"));
    const out = new Uint8Array(await new Response(stream).arrayBuffer());
    cache.set(b64, out);
    return out;
  }

  function study() { return DATA.studies[state.study]; }

  // a 2D image (one axial slice) has no coronal or sagittal view
  function shown(s, view) { return view.id === "axial" || s.dims[2] > 1; }

  function fillSelect(sel, values, current) {
    sel.innerHTML = "";
    for (const v of values) {
      const o = document.createElement("option");
      o.value = v; o.textContent = v.replace(/_/g, " ");
      sel.appendChild(o);
    }
    sel.value = values.includes(current) ? current : values[0];
    return sel.value;
  }

  // the viewer opens on the target's region (ground truth when known, else the prediction)
  function focusTarget() {
    const s = study();
    const t = (s.targets || {})[state.target] || {};
    const focus = t.focus || s.focus;
    state.pos = s.dims.map((d, i) => (focus ? focus[i] : Math.floor(d / 2)));
    for (const view of VIEWS) $("slice-" + view.id).value = state.pos[view.fixed];
    $("target-info").textContent = t.pooling ? "Explained score: " + t.pooling : "";
  }

  function fillPrediction(table) {
    const box = $("prediction");
    box.innerHTML = "";
    if (!table) return;
    const tbl = document.createElement("table");
    const head = document.createElement("tr");
    for (const c of table.columns) {
      const th = document.createElement("th"); th.textContent = c; head.appendChild(th);
    }
    tbl.appendChild(head);
    for (const row of table.rows) {
      const tr = document.createElement("tr");
      for (const c of row) { const td = document.createElement("td"); td.textContent = c; tr.appendChild(td); }
      tbl.appendChild(tr);
    }
    box.appendChild(tbl);
    for (const note of table.notes || []) {
      const p = document.createElement("p");
      p.className = table.disagree ? "disagree" : "agree";
      p.textContent = note;
      box.appendChild(p);
    }
  }

  function setupStudy() {
    const s = study();
    state.target = fillSelect($("target"), Object.keys(s.overlays), state.target);
    state.method = fillSelect($("method"), Object.keys(s.overlays[state.target] || {}), state.method);
    state.channel = Math.min(state.channel, s.channels.length - 1);
    const chSel = $("channel");
    chSel.innerHTML = "";
    s.channels.forEach((c, i) => {
      const o = document.createElement("option"); o.value = i; o.textContent = c; chSel.appendChild(o);
    });
    chSel.value = state.channel;
    for (const view of VIEWS) {
      const n = s.dims[view.fixed];
      $("box-" + view.id).style.display = shown(s, view) ? "" : "none";
      const slider = $("slice-" + view.id);
      slider.style.visibility = n > 1 ? "" : "hidden";
      slider.max = n - 1;
      const w = s.dims[view.h], h = s.dims[view.v];
      const canvas = $("view-" + view.id);
      canvas.width = w; canvas.height = h;
      const sw = s.spacing[view.h], sh = s.spacing[view.v];
      const scale = 280 / Math.max(w * sw, h * sh);
      canvas.style.width = Math.round(w * sw * scale) + "px";
      canvas.style.height = Math.round(h * sh * scale) + "px";
    }
    focusTarget();
    const skipped = Object.entries(s.skipped || {});
    $("skipped").textContent = skipped.length
      ? "Not explained: " + skipped.map(([t, why]) => t + " (" + why + ")").join("; ") : "";
    fillPrediction(s.prediction_table);
  }

  function drawColourbar(ov) {
    const c = $("colourbar");
    const ctx = c.getContext("2d");
    const img = ctx.createImageData(256, 1);
    for (let i = 0; i < 256; i++) {
      img.data.set([DATA.lut[3 * i], DATA.lut[3 * i + 1], DATA.lut[3 * i + 2], 255], 4 * i);
    }
    c.width = 256; c.height = 1;
    ctx.putImageData(img, 0, 0);
    const box = $("colourbar-box"), label = $("cb-label");
    // an empty or constant map has no scale: say so instead of a meaningless "0 ... >= 0" bar
    const flat = ov && ov.state;
    for (const el of box.children) if (el !== label) el.style.display = flat || !ov ? "none" : "";
    label.className = flat ? "error" : "caption";
    label.textContent = !ov ? "" : flat ? "map is " + ov.state + ": nothing to colour"
      : "|attribution| / its 99th percentile (" + Number(ov.vmax).toPrecision(3) + ")";
  }

  function drawNotes(ov) {
    const list = $("map-notes");
    list.innerHTML = "";
    for (const note of (ov && ov.notes) || []) {
      const li = document.createElement("li"); li.textContent = note; list.appendChild(li);
    }
  }

  // a voxel of the mask with a neighbour outside it, within the view's plane
  function onEdge(mask, p, view, dims, strides) {
    const idx = p[0] * strides[0] + p[1] * strides[1] + p[2];
    if (!mask[idx]) return false;
    for (const axis of [view.h, view.v]) {
      for (const step of [-1, 1]) {
        const q = p[axis] + step;
        if (q < 0 || q >= dims[axis] || !mask[idx + step * strides[axis]]) return true;
      }
    }
    return false;
  }

  async function render() {
    const s = study();
    const ov = (s.overlays[state.target] || {})[state.method];
    const t = (s.targets || {})[state.target] || {};
    const base = await decode(s.images[state.channel]);
    const over = ov && !ov.state ? await decode(ov.data) : null;
    const truth = t.truth && state.showTruth ? await decode(t.truth) : null;
    const predicted = t.predicted && state.showPredicted ? await decode(t.predicted) : null;
    drawColourbar(ov);
    drawNotes(ov);
    $("map-info").textContent = ov ? ov.info : "";
    const [X, Y, Z] = s.dims;
    const strides = [Y * Z, Z, 1];
    const lut = DATA.lut;
    for (const view of VIEWS) {
      if (!shown(s, view)) continue;
      const canvas = $("view-" + view.id);
      const w = canvas.width, h = canvas.height;
      const ctx = canvas.getContext("2d");
      const img = ctx.createImageData(w, h);
      const p = [0, 0, 0];
      p[view.fixed] = state.pos[view.fixed];
      for (let row = 0; row < h; row++) {
        p[view.v] = h - 1 - row;
        for (let col = 0; col < w; col++) {
          p[view.h] = col;
          const idx = (p[0] * Y + p[1]) * Z + p[2];
          const g = base[idx];
          let r = g, gg = g, b = g;
          if (over) {
            const m = over[idx];
            const a = state.opacity * Math.sqrt(m / 255);
            r = (1 - a) * g + a * lut[3 * m];
            gg = (1 - a) * g + a * lut[3 * m + 1];
            b = (1 - a) * g + a * lut[3 * m + 2];
          }
          if (truth && onEdge(truth, p, view, s.dims, strides)) [r, gg, b] = TRUTH;
          else if (predicted && (row + col) % 4 < 2 && onEdge(predicted, p, view, s.dims, strides)) {
            [r, gg, b] = PREDICTED;  // dashed
          }
          const o = 4 * (row * w + col);
          img.data[o] = r; img.data[o + 1] = gg; img.data[o + 2] = b; img.data[o + 3] = 255;
        }
      }
      ctx.putImageData(img, 0, 0);
      $("pos-" + view.id).textContent = state.pos[view.fixed] + " / " + (s.dims[view.fixed] - 1);
    }
    document.body.dataset.rendered = String(Number(document.body.dataset.rendered || 0) + 1);
  }

  function bind() {
    $("study").addEventListener("change", (e) => { state.study = Number(e.target.value); setupStudy(); render(); });
    $("target").addEventListener("change", (e) => {
      state.target = e.target.value;
      state.method = fillSelect($("method"), Object.keys(study().overlays[state.target]), state.method);
      focusTarget();
      render();
    });
    $("method").addEventListener("change", (e) => { state.method = e.target.value; render(); });
    $("channel").addEventListener("change", (e) => { state.channel = Number(e.target.value); render(); });
    $("opacity").addEventListener("input", (e) => { state.opacity = Number(e.target.value) / 100; render(); });
    $("show-truth").addEventListener("change", (e) => { state.showTruth = e.target.checked; render(); });
    $("show-predicted").addEventListener("change", (e) => { state.showPredicted = e.target.checked; render(); });
    for (const view of VIEWS) {
      $("slice-" + view.id).addEventListener("input", (e) => {
        state.pos[view.fixed] = Number(e.target.value); render();
      });
      // a click moves the other two views to the clicked point
      $("view-" + view.id).addEventListener("click", (e) => {
        const canvas = e.currentTarget, box = canvas.getBoundingClientRect();
        const col = Math.floor((e.clientX - box.left) / box.width * canvas.width);
        const row = Math.floor((e.clientY - box.top) / box.height * canvas.height);
        state.pos[view.h] = Math.min(Math.max(col, 0), canvas.width - 1);
        state.pos[view.v] = Math.min(Math.max(canvas.height - 1 - row, 0), canvas.height - 1);
        for (const other of VIEWS) $("slice-" + other.id).value = state.pos[other.fixed];
        render();
      });
    }
  }

  async function start() {
    const sel = $("study");
    DATA.studies.forEach((s, i) => {
      const o = document.createElement("option"); o.value = i; o.textContent = s.name; sel.appendChild(o);
    });
    bind();
    setupStudy();
    await render();
    window.voxplainReady = true;
  }

  start().catch((err) => {
    $("viewer-error").textContent = "The viewer could not start: " + err;
    throw err;
  });
})();
