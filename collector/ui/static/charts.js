// Inline-SVG line charts for the dashboard; no library, nothing fetched from elsewhere.
"use strict";

const SVG_NS = "http://www.w3.org/2000/svg";
const PALETTE = ["#2f6fdf", "#c8372d", "#23864a", "#9b6ee0", "#e0a92d", "#1a9aa0", "#7a5230"];

function svgEl(tag, attrs, text) {
  const el = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, v);
  if (text !== undefined) el.textContent = text;
  return el;
}

function niceTicks(lo, hi, count) {
  if (!(hi > lo)) { hi = lo + 1; }
  const step0 = (hi - lo) / count;
  const mag = Math.pow(10, Math.floor(Math.log10(step0)));
  const step = [1, 2, 5, 10].map((m) => m * mag).find((s) => s >= step0);
  const ticks = [];
  for (let t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) ticks.push(t);
  return ticks;
}

function fmtNumber(v) {
  if (v === null || v === undefined || Number.isNaN(v)) return "–";
  const a = Math.abs(v);
  if (a !== 0 && (a < 1e-3 || a >= 1e6)) return v.toExponential(2);
  return (Math.round(v * 1000) / 1000).toString();
}

function fmtTime(ms) {
  const d = new Date(ms);
  return d.toISOString().slice(11, 19);
}

/**
 * A line chart: series = [{name, points: [[x, y], ...]}]; opts = {title, xLabel, yLabel, xTime, step, width, height}.
 * Points with y null are gaps. opts.step draws a staircase (weight pushes).
 */
function lineChart(series, opts) {
  const width = opts.width || 460, height = opts.height || 230;
  const m = { left: 52, right: 12, top: 24, bottom: 34 };
  const svg = svgEl("svg", { class: "chart", width, height, viewBox: `0 0 ${width} ${height}`,
    "data-title": opts.title || "" });
  svg.appendChild(svgEl("text", { x: m.left, y: 15, class: "title" }, opts.title || ""));
  const pts = series.flatMap((s) => s.points.filter((p) => p[1] !== null && p[1] !== undefined));
  if (pts.length === 0) {
    svg.appendChild(svgEl("text", { x: width / 2 - 30, y: height / 2 }, "no data yet"));
    return svg;
  }
  let [x0, x1] = [Math.min(...pts.map((p) => p[0])), Math.max(...pts.map((p) => p[0]))];
  let [y0, y1] = [Math.min(...pts.map((p) => p[1])), Math.max(...pts.map((p) => p[1]))];
  if (opts.yZero) y0 = Math.min(0, y0);
  if (x1 === x0) { x0 -= 1; x1 += 1; }
  if (y1 === y0) { y0 -= 0.5; y1 += 0.5; }
  const pw = width - m.left - m.right, ph = height - m.top - m.bottom;
  const sx = (x) => m.left + ((x - x0) / (x1 - x0)) * pw;
  const sy = (y) => m.top + ph - ((y - y0) / (y1 - y0)) * ph;
  for (const t of niceTicks(y0, y1, 4)) {
    svg.appendChild(svgEl("line", { x1: m.left, x2: m.left + pw, y1: sy(t), y2: sy(t), class: "grid" }));
    svg.appendChild(svgEl("text", { x: m.left - 6, y: sy(t) + 3, "text-anchor": "end" }, fmtNumber(t)));
  }
  const xTicks = opts.xTime ? [x0, (x0 + x1) / 2, x1] : niceTicks(x0, x1, 5);
  for (const t of xTicks) {
    const anchor = opts.xTime ? (t === x0 ? "start" : t === x1 ? "end" : "middle") : "middle";
    svg.appendChild(svgEl("text", { x: sx(t), y: m.top + ph + 14, "text-anchor": anchor },
      opts.xTime ? fmtTime(t) : fmtNumber(t)));
  }
  svg.appendChild(svgEl("line", { x1: m.left, x2: m.left + pw, y1: m.top + ph, y2: m.top + ph, class: "axis" }));
  svg.appendChild(svgEl("line", { x1: m.left, x2: m.left, y1: m.top, y2: m.top + ph, class: "axis" }));
  if (opts.xLabel) {
    svg.appendChild(svgEl("text", { x: m.left + pw / 2, y: height - 4, "text-anchor": "middle" }, opts.xLabel));
  }
  series.forEach((s, i) => {
    const color = s.color || PALETTE[i % PALETTE.length];
    let d = "", pen = false, last = null;
    for (const [x, y] of s.points) {
      if (y === null || y === undefined) { pen = false; continue; }
      if (opts.step && pen && last !== null) d += `L${sx(x)},${sy(last)}`;
      d += `${pen ? "L" : "M"}${sx(x)},${sy(y)}`;
      pen = true; last = y;
    }
    svg.appendChild(svgEl("path", { d, fill: "none", stroke: color, "stroke-width": 1.6, class: "series" }));
    if (s.points.length <= 60) {
      for (const [x, y, label] of s.points) {
        if (y === null || y === undefined) continue;
        const dot = svgEl("circle", { cx: sx(x), cy: sy(y), r: 2.6, fill: color, class: "point" });
        dot.appendChild(svgEl("title", {}, label || `${s.name}: ${fmtNumber(y)}`));
        svg.appendChild(dot);
      }
    }
    if (series.length > 1 || s.name) {
      svg.appendChild(svgEl("rect", { x: m.left + 8 + i * 110, y: m.top - 2, width: 8, height: 8, fill: color }));
      svg.appendChild(svgEl("text", { x: m.left + 20 + i * 110, y: m.top + 6 }, s.name || ""));
    }
  });
  return svg;
}

window.charts = { lineChart, fmtNumber, fmtTime };
