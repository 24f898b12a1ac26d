"use strict";
// The page of `attrib serve`: uploads through the API with fetch() and shows the verdict, the top results and
// the server's HTML report (evidence bars, highlighted caption terms, patch heatmaps) in a script-less frame.
// Every text that comes from the server goes in through textContent, never as HTML.
(function () {
  const $ = (id) => document.getElementById(id);
  const state = { file: null, preview: null, json: null, maxUpload: 0 };

  function authHeaders() {
    const t = $("token").value.trim();
    return t ? { Authorization: "Bearer " + t } : {};
  }

  function setStatus(text, kind) {
    const s = $("status");
    s.textContent = text;
    s.className = "status " + (kind || "");
  }

  function showBanner(text) {
    const b = $("banner");
    b.textContent = "";
    if (!text) {
      b.hidden = true;
      return;
    }
    const strong = document.createElement("strong");
    strong.textContent = "\u26a0 Untrained weights: not a real attribution";
    b.append(strong, document.createTextNode(text));
    b.hidden = false;
  }

  function untrainedText(res) {
    const m = res.models || {};
    if (m.warning) return m.warning;
    for (const w of res.warnings || []) if (String(w).includes("UNTRAINED")) return String(w);
    return m.pretrained === false ? "The index uses untrained (randomly initialised) encoders." : null;
  }

  async function loadInfo() {
    try {
      const h = await fetch("/healthz").then((r) => r.json());
      if (h.auth) $("token-row").hidden = false;
    } catch (e) {
      setStatus("The server does not answer.", "error");
      return;
    }
    const r = await fetch("/v1/info", { headers: authHeaders() });
    if (r.status === 401) {
      $("token-row").hidden = false;
      setStatus("This server needs an API token: enter it above.", "busy");
      return;
    }
    if (!r.ok) return;
    const info = await r.json();
    const sel = $("weights");
    sel.textContent = "";
    for (const w of info.service.weights) {
      const o = document.createElement("option");
      o.value = w;
      o.textContent = w;
      sel.append(o);
    }
    const lim = info.service.limits;
    $("k").max = String(lim.max_k);
    $("prompt").maxLength = lim.max_prompt_chars;
    state.maxUpload = lim.max_upload_bytes;
    const m = info.index.manifest || {};
    const counts = m.counts || {};
    $("index-line").textContent = "Index: " + (counts.records || "?") + " records, models '" +
      ((m.models || {}).profile || "?") + "'. ";
    showBanner(info.warning || null);
  }

  function pick(file) {
    if (state.preview) URL.revokeObjectURL(state.preview);
    state.file = file || null;
    state.preview = null;
    const img = $("preview");
    if (state.file) {
      state.preview = URL.createObjectURL(state.file);
      img.src = state.preview;
      img.hidden = false;
      $("drop-text").hidden = true;
    } else {
      img.removeAttribute("src");
      img.hidden = true;
      $("drop-text").hidden = false;
    }
  }

  function bar(fraction) {
    const outer = document.createElement("span");
    outer.className = "bar";
    const inner = document.createElement("span");
    inner.style.width = (100 * Math.max(0, Math.min(1, fraction))).toFixed(1) + "%"; // CSSOM: allowed by the CSP
    outer.append(inner);
    return outer;
  }

  function render(res, reportUrl) {
    showBanner(untrainedText(res));
    const v = res.verdict || {};
    const verdict = $("verdict");
    verdict.textContent = v.label || "";
    verdict.className = "verdict " + (v.likely_source === true ? "good" : v.likely_source === false ? "none" : "");
    const list = $("results");
    list.textContent = "";
    for (const c of (res.results || []).slice(0, 5)) {
      const li = document.createElement("li");
      const id = document.createElement("span");
      id.className = "id";
      id.textContent = c.id;
      const score = c.score === null || c.score === undefined ? "n/a" : Number(c.score).toFixed(4);
      li.append(id, document.createTextNode(" \u2014 score " + score));
      if (c.share !== undefined && c.share !== null) {
        li.append(document.createTextNode(" \u00b7 share " + (100 * c.share).toFixed(1) + "% "), bar(c.share));
      }
      list.append(li);
    }
    if (!(res.results || []).length) {
      const li = document.createElement("li");
      li.textContent = "No candidates were found.";
      list.append(li);
    }
    if (state.json) URL.revokeObjectURL(state.json);
    state.json = URL.createObjectURL(new Blob([JSON.stringify(res, null, 2)], { type: "application/json" }));
    $("json-link").href = state.json;
    $("report-link").href = reportUrl;
    $("summary").hidden = false;
    const frame = $("report");
    frame.hidden = false;
    frame.src = reportUrl;
  }

  // The frame is as tall as the report (no scrolling inside it): its document is same-origin and script-less,
  // so the page measures its body, again whenever the body's size changes (a narrower window, late layout).
  let observer = null;

  function fitFrame() {
    const frame = $("report");
    try {
      const doc = frame.contentDocument;
      if (doc && doc.body) {
        frame.style.height = Math.max(200, Math.ceil(doc.body.getBoundingClientRect().height) + 4) + "px";
      }
    } catch (e) {
      frame.style.height = "70vh"; // not readable: keep a scrolling frame
    }
  }

  function frameLoaded() {
    fitFrame();
    if (observer) observer.disconnect();
    const doc = $("report").contentDocument;
    if (doc && doc.body && window.ResizeObserver) {
      observer = new ResizeObserver(fitFrame);
      observer.observe(doc.body);
    }
  }

  async function submit(ev) {
    ev.preventDefault();
    const prompt = $("prompt").value;
    if (!state.file && !prompt.trim()) {
      setStatus("Give an image, a prompt, or both.", "error");
      return;
    }
    if (state.file && state.maxUpload && state.file.size > state.maxUpload) {
      setStatus("The image is " + state.file.size + " bytes; this server takes at most " + state.maxUpload + ".",
        "error");
      return;
    }
    const fd = new FormData();
    if (state.file) fd.append("image", state.file, state.file.name || "upload");
    if (prompt.trim()) fd.append("prompt", prompt);
    fd.append("k", $("k").value || "10");
    fd.append("weights", $("weights").value || "auto");
    $("go").disabled = true;
    setStatus("Attributing\u2026", "busy");
    const t0 = performance.now();
    try {
      const r = await fetch("/v1/attribute", { method: "POST", body: fd, headers: authHeaders() });
      let body = null;
      try {
        body = await r.json();
      } catch (e) {
        body = null;
      }
      if (!r.ok) {
        let msg = body && body.detail ? body.detail : "HTTP " + r.status;
        if (r.status === 401) $("token-row").hidden = false;
        if (r.status === 503) msg += " (retry in " + (r.headers.get("Retry-After") || "1") + " s)";
        setStatus(msg, "error");
        return;
      }
      render(body, r.headers.get("X-Attrib-Report"));
      setStatus("Done in " + ((performance.now() - t0) / 1000).toFixed(2) + " s.", "ok");
    } catch (e) {
      setStatus("The request failed: " + e.message, "error");
    } finally {
      $("go").disabled = false;
    }
  }

  function init() {
    const drop = $("drop");
    const input = $("image");
    input.addEventListener("change", () => pick(input.files && input.files[0]));
    ["dragenter", "dragover"].forEach((t) => drop.addEventListener(t, (e) => {
      e.preventDefault();
      drop.classList.add("over");
    }));
    ["dragleave", "drop"].forEach((t) => drop.addEventListener(t, () => drop.classList.remove("over")));
    drop.addEventListener("drop", (e) => {
      e.preventDefault();
      const f = e.dataTransfer && e.dataTransfer.files && e.dataTransfer.files[0];
      if (f) pick(f);
    });
    $("clear").addEventListener("click", () => {
      input.value = "";
      pick(null);
      $("prompt").value = "";
      setStatus("", "");
    });
    $("query").addEventListener("submit", submit);
    $("token").addEventListener("change", loadInfo);
    $("report").addEventListener("load", frameLoaded);
    window.addEventListener("resize", fitFrame);
    loadInfo();
  }

  init();
})();
