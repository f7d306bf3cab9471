// Small helpers: building nodes (text only: nothing from the gateway is parsed as HTML),
// formatting numbers, and the gateway's clock.

export function cell(row, text, className) {
  const td = row.insertCell();
  td.textContent = text ?? "–";
  if (className) td.className = className;
  return td;
}

export function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

// Keeps at most `most` children of a list, dropping from the end.
export function trim(list, most) {
  while (list.children.length > most) list.lastElementChild.remove();
}

const UNITS = ["B", "KiB", "MiB", "GiB", "TiB"];

export function bytes(value) {
  if (value === null || value === undefined) return null;
  let unit = 0;
  while (value >= 1024 && unit < UNITS.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return `${value.toFixed(unit && value < 10 ? 1 : 0)} ${UNITS[unit]}`;
}

export function seconds(value) {
  if (value === null || value === undefined) return null;
  if (value < 1) return `${Math.round(value * 1000)} ms`;
  if (value < 120) return `${value.toFixed(value < 10 ? 2 : 1)} s`;
  const minutes = Math.floor(value / 60);
  return minutes < 120 ? `${minutes} min ${Math.round(value % 60)} s` : `${Math.floor(minutes / 60)} h ${minutes % 60} min`;
}

export function clockTime(epochSeconds) {
  if (!epochSeconds) return null;
  return new Date(epochSeconds * 1000).toLocaleTimeString([], { hour12: false });
}

// The gateway's time now (its `state` event says what it was): uptimes and waits are
// differences of its own timestamps, whatever this browser's clock says.
let offset = 0;

export function syncClock(gatewayNow) {
  offset = gatewayNow - Date.now() / 1000;
}

export function gatewayNow() {
  return Date.now() / 1000 + offset;
}
