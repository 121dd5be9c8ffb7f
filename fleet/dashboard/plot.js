// Line plots as inline SVG, built with DOM calls only (no HTML strings, no inline style: the page's CSP allows
// neither). lineChart(points, {key, title, unit, since, until}) -> a <div class="plot"> holding the title and an
// <svg> with one polyline and one <circle class="dot"> per point; each dot carries data-t and data-v and a <title>
// with the value, so a reader (or a test) can read the exact figures.

const NS = "http://www.w3.org/2000/svg";
const W = 360, H = 160, L = 44, R = 8, T = 8, B = 22; // view box and margins, in SVG units

function el(name, attrs = {}, text = null) {
  const node = document.createElementNS(NS, name);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  if (text !== null) node.textContent = text;
  return node;
}

export function fmt(v) {
  if (!Number.isFinite(v)) return "-";
  const a = Math.abs(v);
  if (a >= 1000) return v.toFixed(0);
  if (a >= 10) return v.toFixed(1);
  return v.toFixed(2);
}

function clock(ms) {
  const d = new Date(ms);
  return d.toISOString().slice(11, 16); // HH:MM in UTC
}

export function lineChart(points, { key, title, unit = "", since, until }) {
  const box = document.createElement("div");
  box.className = "plot";
  box.dataset.key = key;
  const h = document.createElement("h3");
  h.textContent = unit ? `${title} (${unit})` : title;
  box.append(h);
  const svg = el("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": title });
  box.append(svg);
  const xs = points.map((p) => Date.parse(p.t));
  const ys = points.map((p) => Number(p[key]));
  const x0 = Number.isFinite(since) ? since : Math.min(...xs);
  const x1 = Number.isFinite(until) ? until : Math.max(...xs);
  let y0 = 0, y1 = ys.length ? Math.max(...ys) : 1;
  if (y1 <= y0) y1 = y0 + 1;
  y1 *= 1.1;
  const sx = (x) => L + ((x - x0) / Math.max(1, x1 - x0)) * (W - L - R);
  const sy = (y) => H - B - ((y - y0) / (y1 - y0)) * (H - T - B);
  svg.append(el("line", { class: "axis", x1: L, y1: H - B, x2: W - R, y2: H - B }));
  svg.append(el("line", { class: "axis", x1: L, y1: T, x2: L, y2: H - B }));
  svg.append(el("text", { x: L - 4, y: T + 8, "text-anchor": "end" }, fmt(y1)));
  svg.append(el("text", { x: L - 4, y: H - B, "text-anchor": "end" }, fmt(y0)));
  svg.append(el("text", { x: L, y: H - 6 }, clock(x0)));
  svg.append(el("text", { x: W - R, y: H - 6, "text-anchor": "end" }, clock(x1) + " UTC"));
  if (!points.length) {
    svg.append(el("text", { x: (W + L) / 2, y: H / 2, "text-anchor": "middle", class: "empty" }, "no samples in this window"));
    return box;
  }
  const coords = points.map((p, i) => [sx(xs[i]), sy(ys[i])]);
  svg.append(el("polyline", { class: "line", points: coords.map(([x, y]) => `${x.toFixed(1)},${y.toFixed(1)}`).join(" ") }));
  points.forEach((p, i) => {
    const dot = el("circle", { class: "dot", cx: coords[i][0].toFixed(1), cy: coords[i][1].toFixed(1), r: 2.5,
                               "data-t": p.t, "data-v": ys[i] });
    dot.append(el("title", {}, `${p.t}: ${fmt(ys[i])}${unit ? " " + unit : ""}`));
    svg.append(dot);
  });
  return box;
}
