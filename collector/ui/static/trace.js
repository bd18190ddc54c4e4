// Trace page: the span tree as a waterfall, LLM call details (messages, token ids, logprobs), rewards.
"use strict";

(() => {
  const { h, api, fmtDate, fmtDuration, rewardCell, PAGES } = window.ui;

  /** Depth-first order of the span tree; spans whose parent is not in the trace are roots. */
  function treeOrder(spans) {
    const ids = new Set(spans.map((s) => s.span_id));
    const children = {};
    const roots = [];
    for (const s of spans) {
      if (s.parent_span_id && ids.has(s.parent_span_id)) (children[s.parent_span_id] = children[s.parent_span_id] || []).push(s);
      else roots.push(s);
    }
    const out = [];
    const visit = (s, depth) => {
      out.push([s, depth]);
      for (const c of children[s.span_id] || []) visit(c, depth + 1);
    };
    roots.forEach((r) => visit(r, 0));
    return out;
  }

  function messageText(m) {
    if (typeof m === "string") return m;
    if (typeof m.content === "string") return m.content;
    if (Array.isArray(m.parts)) {
      return m.parts.map((p) => p.content ?? p.text ?? (p.type === "tool_call" ? `tool_call ${p.name}(${JSON.stringify(p.arguments)})` : JSON.stringify(p))).join("\n");
    }
    return JSON.stringify(m.content ?? m, null, 1);
  }

  function messages(title, value) {
    if (value === null || value === undefined) return null;
    const list = Array.isArray(value) ? value : [value];
    return h("div", {}, h("h3", {}, title), list.map((m) => h("div", { class: "message" },
      h("div", { class: "role" }, (m && (m.role || m.finish_reason && "assistant")) || ""), messageText(m))));
  }

  function tokens(title, ids, logprobs, threshold) {
    if (!ids || !ids.length) return null;
    const low = logprobs ? logprobs.filter((lp) => lp !== null && lp < threshold).length : 0;
    const summary = `${title}: ${ids.length} ids` + (logprobs ? `, ${low} below p = ${Math.exp(threshold).toFixed(2)}` : "");
    return h("details", { class: "token-details", open: !!logprobs },
      h("summary", {}, summary),
      h("div", { class: "tokens" }, ids.map((id, i) => {
        const lp = logprobs ? logprobs[i] : null;
        const isLow = lp !== null && lp !== undefined && lp < threshold;
        return h("span", { class: "token" + (isLow ? " low" : ""), dataset: { id: String(id), logprob: String(lp) }, title: lp === null || lp === undefined ? `id ${id}`
          : `id ${id} · logprob ${lp.toFixed(4)} · p ${Math.exp(lp).toFixed(3)}` },
          String(id), lp === null || lp === undefined ? null : h("small", {}, lp.toFixed(2)));
      })));
  }

  function llmDetail(call, threshold) {
    return h("div", { class: "llm-detail" },
      h("p", {}, `model ${call.model || "?"} · input tokens ${call.input_tokens ?? "–"} · output tokens ${call.output_tokens ?? "–"}`
        + (call.policy_version !== null ? ` · policy v${call.policy_version}` : "")
        + (call.server_time_to_first_token_s ? ` · server TTFT ${fmtDuration(call.server_time_to_first_token_s * 1000)}` : "")),
      messages("System", call.system_instructions), messages("Input messages", call.input_messages),
      messages("Response", call.output_messages),
      tokens("Response token ids with logprobs", call.response_token_ids, call.response_logprobs, threshold),
      tokens("Prompt token ids", call.prompt_token_ids, null, threshold));
  }

  function spanDetail(span, threshold) {
    return h("div", { class: "detail", id: "span-detail" },
      h("h2", {}, span.name, " ", h("span", { class: "muted mono" }, span.span_id)),
      h("p", { class: "muted" }, `${span.service_name || ""} · start +${fmtDuration(span.offset_ms)} · ` +
        `duration ${fmtDuration(span.duration_ms)}` + (span.status_code === 2 ? ` · ERROR ${span.status_message || ""}` : "")),
      span.llm ? llmDetail(span.llm, threshold) : null,
      h("details", { open: !span.llm }, h("summary", {}, "Attributes"),
        h("pre", {}, JSON.stringify(span.attributes, null, 2))),
      span.events && span.events.length ? h("details", {}, h("summary", {}, "Events"),
        h("pre", {}, JSON.stringify(span.events, null, 2))) : null);
  }

  function rewardsTable(rewards) {
    if (!rewards.length) return h("p", { class: "muted", id: "rewards" }, "No reward attached.");
    return h("table", { id: "rewards" }, h("thead", {}, h("tr", {},
      ["value", "name", "kind", "when (UTC)", "after trace start"].map((c) => h("th", {}, c)))),
      h("tbody", {}, rewards.map((r) => h("tr", { class: "reward-row" },
        h("td", { class: "num" }, rewardCell(r.value)),
        h("td", {}, r.name || ""),
        h("td", {}, r.delayed ? h("span", { class: "badge delayed" }, "delayed") : "inline"),
        h("td", {}, fmtDate(r.unix_ms)), h("td", { class: "num" }, fmtDuration(r.offset_ms))))));
  }

  PAGES.trace = async (main, traceId) => {
    const t = await api("trace/" + encodeURIComponent(traceId));
    const total = Math.max(...t.spans.map((s) => s.offset_ms + s.duration_ms), 0.001);
    const detail = h("div", {});
    let selected = null;
    const rows = treeOrder(t.spans).map(([s, depth]) => {
      const kind = s.status_code === 2 ? "error" : s.llm ? "llm" : s.reward !== null ? "reward" : "";
      const row = h("div", { class: "span-row" + (s.llm ? " llm-row" : ""), dataset: { span: s.span_id } },
        h("div", { class: "span-name", style: { paddingLeft: `${6 + depth * 14}px` }, title: s.name },
          s.name, s.llm ? h("span", { class: "badge" }, " LLM") : null,
          s.reward !== null ? h("span", { class: "badge delayed" }, ` reward ${s.reward}`) : null),
        h("div", { class: "span-track" }, h("div", { class: "span-bar " + kind,
          style: { left: `${(100 * s.offset_ms) / total}%`, width: `${(100 * s.duration_ms) / total}%` } })),
        h("div", { class: "span-dur" }, fmtDuration(s.duration_ms)));
      row.addEventListener("click", () => {
        if (selected) selected.classList.remove("selected");
        selected = row; row.classList.add("selected");
        detail.replaceChildren(spanDetail(s, t.low_prob_logprob));
      });
      return row;
    });
    const ep = t.episodes[0];
    main.replaceChildren(...[
      h("h1", {}, "Trace ", h("span", { class: "mono" }, t.trace_id)),
      h("p", { class: "muted" }, `${fmtDate(t.start_unix_ms)} UTC · ${t.spans.length} spans · ${fmtDuration(total)}`,
        ep ? ` · episode ${ep.episode_id} · task ${ep.task_id || "–"} · agent ${ep.agent_name || "–"}` : "",
        " · ", h("a", { href: "#/episodes" }, "back to episodes")),
      ep && ep.trace_ids.length > 1 ? h("p", {}, "Other traces of this episode: ", ep.trace_ids
        .filter((id) => id !== t.trace_id).map((id) => h("a", { href: "#/trace/" + id, class: "mono" }, id + " "))) : null,
      h("h2", {}, "Rewards", ep ? ` (episode reward ${ep.reward ?? "–"})` : ""), rewardsTable(t.rewards),
      h("h2", {}, "Waterfall"), h("div", { class: "waterfall", id: "waterfall" }, rows), detail].filter(Boolean));
  };
})();
