// Dashboard pages: episodes (list, filters, keyset pages), training, ingestion health.
"use strict";

(() => {
  const { h, api, fmtDate, fmtDuration, fmtBytes, rewardCell, showError, navigate, PAGES } = window.ui;
  const FILTERS = ["service", "task", "agent", "reward_min", "reward_max", "policy_version", "since", "until", "q"];

  function select(name, label, values, current) {
    return h("label", {}, label, h("select", { name },
      h("option", { value: "" }, "any"),
      (values || []).map((v) => h("option", { value: String(v), selected: String(v) === current }, String(v)))));
  }

  function input(name, label, type, current, extra) {
    return h("label", {}, label, h("input", { name, type, value: current || "", ...(extra || {}) }));
  }

  function filterForm(params, facets) {
    const form = h("form", { class: "filters", id: "episode-filters" },
      select("service", "service", facets.service, params.service),
      select("task", "task", facets.task, params.task),
      select("agent", "agent", facets.agent, params.agent),
      input("reward_min", "reward ≥", "number", params.reward_min, { step: "any" }),
      input("reward_max", "reward ≤", "number", params.reward_max, { step: "any" }),
      select("policy_version", "policy version", facets.policy_version, params.policy_version),
      input("since", "ended after (UTC)", "datetime-local", params.since),
      input("until", "ended before (UTC)", "datetime-local", params.until),
      input("q", "search id / task / agent / trace", "search", params.q, { placeholder: "search" }),
      h("button", { type: "submit" }, "Apply"),
      h("button", { type: "button", class: "plain", onclick: () => navigate("episodes") }, "Clear"));
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      const values = Object.fromEntries(new FormData(form));
      navigate("episodes", "", values);
    });
    form.addEventListener("change", (event) => {
      if (event.target.tagName === "SELECT") form.requestSubmit();
    });
    return form;
  }

  function apiTime(value) { return value ? value + (value.length === 16 ? ":00Z" : "Z") : ""; }

  function episodeRow(e) {
    const versions = e.min_policy_version === null ? "–"
      : e.min_policy_version === e.max_policy_version ? String(e.min_policy_version)
        : `${e.min_policy_version}–${e.max_policy_version}`;
    return h("tr", { class: "episode-row", dataset: { episode: e.episode_id, trace: e.trace_ids[0] || "" },
                     onclick: () => navigate("trace", e.trace_ids[0], { episode: e.episode_id }) },
      h("td", { class: "mono" }, e.episode_id, e.has_error ? h("span", { class: "badge error" }, " error") : null),
      h("td", {}, e.service_name || "–"), h("td", {}, e.task_id || "–"), h("td", {}, e.agent_name || "–"),
      h("td", { class: "num reward" }, rewardCell(e.reward)),
      h("td", { class: "num" }, String(e.n_rewards),
        e.n_delayed_rewards ? h("span", { class: "badge delayed" }, `${e.n_delayed_rewards} delayed`) : null),
      h("td", { class: "num" }, String(e.n_llm_calls)), h("td", { class: "num" }, String(e.n_spans)),
      h("td", { class: "num" }, versions), h("td", {}, fmtDate(e.end_unix_ms)),
      h("td", { class: "num" }, fmtDuration(e.end_unix_ms - e.start_unix_ms)));
  }

  PAGES.episodes = async (main, arg, params) => {
    const query = { ...params, since: apiTime(params.since), until: apiTime(params.until), limit: params.limit || 50,
                    facets: 1 };
    const stack = params.cursor ? (params.back || "").split(",").filter(Boolean) : [];
    const page = await api("episodes", query);
    const table = h("table", { id: "episodes" },
      h("thead", {}, h("tr", {}, ["episode", "service", "task", "agent", "reward", "rewards", "LLM calls", "spans",
        "policy", "ended (UTC)", "duration"].map((c) => h("th", {}, c)))),
      h("tbody", {}, page.episodes.map(episodeRow)));
    const go = (cursor, back) => navigate("episodes", "", { ...params, cursor, back });
    const pager = h("div", { class: "pager" },
      h("button", { class: "plain", id: "prev-page", disabled: !params.cursor,
                    onclick: () => go(stack[stack.length - 1] === "-" ? "" : stack[stack.length - 1],
                      stack.slice(0, -1).join(",")) }, "← Newer"),
      h("button", { class: "plain", id: "next-page", disabled: !page.next_cursor,
                    onclick: () => go(page.next_cursor, [...stack, params.cursor || "-"].join(",")) }, "Older →"),
      h("span", { class: "muted", id: "episode-total" },
        `${page.total} episodes match · ${page.episodes.length} shown` +
        (page.stale ? " · list being refreshed" : "")));
    main.replaceChildren(h("h1", {}, "Episodes"), filterForm(params, page.facets || {}),
      page.episodes.length ? table : h("p", { class: "muted", id: "no-episodes" }, "No episode matches."), pager);
  };

  // ------------------------------------------------------------ training

  function byRun(steps, key) {
    const runs = {};
    for (const s of steps) (runs[s.run_id] = runs[s.run_id] || []).push([s.step, s[key], `${s.run_id} step ${s.step}: ${s[key]}`]);
    return Object.entries(runs).map(([name, points]) => ({ name, points }));
  }

  function checkpointsTable(checkpoints) {
    if (!checkpoints.length) return h("p", { class: "muted" }, "No checkpoint yet.");
    return h("table", { id: "checkpoints" },
      h("thead", {}, h("tr", {}, ["run", "step", "saved (UTC)", "pushed as", "episodes trained", "from policy versions",
        "episodes", "path"].map((c) => h("th", {}, c)))),
      h("tbody", {}, checkpoints.map((c) => h("tr", {},
        h("td", {}, c.run_id), h("td", { class: "num" }, String(c.step)), h("td", {}, fmtDate(c.unix_ms)),
        h("td", { class: "num" }, c.policy_version === null ? "–" : "v" + c.policy_version),
        h("td", { class: "num" }, String(c.n_episodes || 0)),
        h("td", {}, (c.trained_policy_versions || []).join(", ")),
        h("td", {}, (c.episode_ids || []).slice(0, 8).map((id) =>
          h("a", { href: "#/episodes?q=" + encodeURIComponent(id), class: "mono" }, id + " ")),
          c.n_episodes > 8 ? `… +${c.n_episodes - 8}` : ""),
        h("td", { class: "mono" }, c.path || "")))));
  }

  PAGES.training = async (main) => {
    const t = await api("training");
    const C = window.charts;
    const versions = t.per_policy_version.filter((v) => v.policy_version !== null);
    const charts = h("div", { class: "charts", id: "training-charts" },
      C.lineChart([{ name: "reward mean", points: versions.map((v) => [v.policy_version, v.reward_mean]) },
                   { name: "success rate", points: versions.map((v) => [v.policy_version, v.success_rate]) }],
        { title: "Episodes per policy version", xLabel: "policy version" }),
      C.lineChart(byRun(t.steps, "loss"), { title: "Loss", xLabel: "step" }),
      C.lineChart(byRun(t.steps, "kl"), { title: "KL to reference", xLabel: "step" }),
      C.lineChart(byRun(t.steps, "clip_fraction"), { title: "Clip fraction", xLabel: "step", yZero: true }),
      C.lineChart(byRun(t.steps, "reward_mean"), { title: "Batch reward mean", xLabel: "step" }),
      C.lineChart([{ name: "policy version", points: t.pushes.map((p) =>
        [p.unix_ms, p.policy_version, `v${p.policy_version} at step ${p.step}, push ${C.fmtNumber(p.push_s)} s`]) }],
        { title: "Weight pushes over time", xLabel: "time (UTC)", xTime: true, step: true }));
    const perVersion = h("table", { id: "per-version" },
      h("thead", {}, h("tr", {}, ["policy version", "episodes", "rewarded", "reward mean",
        `success rate (reward ≥ ${t.success_threshold})`, "first", "last"].map((c) => h("th", {}, c)))),
      h("tbody", {}, t.per_policy_version.map((v) => h("tr", {},
        h("td", {}, v.policy_version === null ? "none" : "v" + v.policy_version),
        h("td", { class: "num" }, String(v.n_episodes)), h("td", { class: "num" }, String(v.n_rewarded)),
        h("td", { class: "num" }, C.fmtNumber(v.reward_mean)), h("td", { class: "num" }, C.fmtNumber(v.success_rate)),
        h("td", {}, fmtDate(v.first_unix_ms)), h("td", {}, fmtDate(v.last_unix_ms))))));
    main.replaceChildren(h("h1", {}, "Training"),
      h("p", { class: "muted" }, `${t.steps.length} steps, ${t.checkpoints.length} checkpoints, ${t.pushes.length} weight pushes`),
      charts, h("h2", {}, "Reward per policy version"), perVersion,
      h("h2", {}, "Checkpoints and the episodes that trained them"), checkpointsTable(t.checkpoints));
  };

  // ------------------------------------------------------------ ingestion health

  function card(label, value, id) {
    return h("div", { class: "card", id }, h("div", { class: "value" }, value), h("div", { class: "label" }, label));
  }

  async function drawHealth(main) {
    const s = await api("health");
    const C = window.charts;
    const lag = s.lag_to_queryable_s;
    const n = (v, unit) => (v === null || v === undefined ? "–" : C.fmtNumber(v) + (unit || ""));
    main.replaceChildren(h("h1", {}, "Ingestion health"),
      h("div", { class: "cards", id: "health-cards" },
        card("spans/s (last minute)", n(s.spans_per_s), "spans-per-s"),
        card("spans stored", String(s.totals.spans_accepted), "spans-accepted"),
        card("refused spans / requests", `${s.totals.spans_refused} / ${s.totals.requests_refused}`, "refusals"),
        card("rejected spans", String(s.totals.spans_rejected), "rejected"),
        card("lag to queryable, mean", lag.mean === null ? "–" : fmtDuration(lag.mean * 1000), "lag-mean"),
        card("lag p99 ≤", lag.p99_le === null ? "–" : fmtDuration(lag.p99_le * 1000), "lag-p99"),
        card("storage", fmtBytes(s.storage.total_bytes), "storage"),
        card("files", String(s.storage.files), "files")),
      C.lineChart([{ name: "spans/s", points: s.spans_per_s_series.map((p) => [p.unix_s * 1000, p.spans_per_s]) }],
        { title: "Stored spans per second (last 5 minutes)", xTime: true, yZero: true, width: 700 }),
      h("h2", {}, "Storage by folder"),
      h("table", { id: "storage-by-folder" }, h("tbody", {}, Object.entries(s.storage.by_folder).map(([k, v]) =>
        h("tr", {}, h("td", { class: "mono" }, k), h("td", { class: "num" }, fmtBytes(v)))))),
      h("p", { class: "muted" }, "Store: ", h("code", {}, s.data_dir),
        ` · pending ${fmtBytes(s.totals.pending_bytes)} · commit failures ${s.totals.commit_failures}` +
        ` · requests refused as malformed or unauthenticated ${s.totals.bad_requests}`));
  }

  PAGES.health = async (main) => {
    await drawHealth(main);
    const timer = setInterval(() => drawHealth(main).catch((e) => showError(main, e)), 2000);
    return () => clearInterval(timer);
  };
})();
