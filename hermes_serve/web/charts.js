// Stacked bar charts in plain SVG: no library, no inline style (the page's CSP allows none).
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const PALETTE = ["#3b6fd8", "#e0803a", "#3aa574", "#b5475d", "#7b5cc4", "#c4a23a", "#3aa0b5", "#8a8a8a"];

function svgNode(name, attributes) {
  const node = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attributes)) node.setAttribute(k, String(v));
  return node;
}

// days: [{label, values: {series: number}}]; series: names in stacking order, colors[i] each.
function stackedBars(svg, days, series, colors) {
  const width = 320, height = 160, bottom = 18, left = 4;
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  const totals = days.map((d) => series.reduce((sum, s) => sum + (d.values[s] || 0), 0));
  const top = Math.max(1, ...totals);
  const slot = (width - left) / Math.max(1, days.length);
  const nodes = [];
  days.forEach((day, i) => {
    let y = height - bottom;
    series.forEach((name, j) => {
      const value = day.values[name] || 0;
      if (value <= 0) return;
      const h = ((height - bottom - 6) * value) / top;
      y -= h;
      const bar = svgNode("rect", {
        x: left + i * slot + 1, y, width: Math.max(1, slot - 2), height: h, fill: colors[j % colors.length],
        "data-day": day.label, "data-series": name, "data-value": value,
      });
      const title = svgNode("title", {});
      title.textContent = `${day.label} · ${name}: ${value}`;
      bar.append(title);
      nodes.push(bar);
    });
    if (i % Math.ceil(days.length / 7) === 0) {
      const text = svgNode("text", { x: left + i * slot + 1, y: height - 4, "font-size": 9, fill: "#4a5368" });
      text.textContent = day.label.slice(5);
      nodes.push(text);
    }
  });
  svg.replaceChildren(...nodes);
}

window.charts = { stackedBars, PALETTE };
