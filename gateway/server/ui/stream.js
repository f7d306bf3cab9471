// Talking to the gateway: the key (kept in this tab's sessionStorage, sent only in an
// Authorization header), the calls the buttons make, and /gateway/events read with
// fetch() (an EventSource cannot send the header), resumed with Last-Event-ID.

const KEY = "llm-gateway.key";
const SILENCE = 45_000; // ms without a byte (the gateway writes every 15 s): reconnect
const BACKOFF = [250, 500, 1000, 2000, 5000]; // ms before each reconnect in a row

export const storedKey = () => sessionStorage.getItem(KEY);
export const storeKey = (key) => sessionStorage.setItem(KEY, key);
export const forgetKey = () => sessionStorage.removeItem(KEY);

function authorization() {
  const key = storedKey();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

async function errorMessage(response) {
  const body = await response.json().catch(() => null);
  return body?.error?.message ?? `${response.status} ${response.statusText}`;
}

export async function post(path, body) {
  const response = await fetch(path, {
    method: "POST",
    headers: { ...authorization(), "Content-Type": "application/json" },
    body: JSON.stringify(body),
  });
  if (!response.ok) throw new Error(await errorMessage(response));
  return response.json();
}

// One server-sent event's text; null for comments and retry hints.
function parseFrame(text) {
  const frame = { id: null, kind: "message", data: [] };
  for (const line of text.split(/\r\n|\r|\n/)) {
    if (!line || line.startsWith(":")) continue;
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
    if (field === "id") frame.id = value;
    else if (field === "event") frame.kind = value;
    else if (field === "data") frame.data.push(value);
  }
  return frame.data.length ? { id: frame.id, kind: frame.kind, data: JSON.parse(frame.data.join("\n")) } : null;
}

async function readFrames(body, onFrame, onBytes) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    onBytes();
    buffer += value;
    const frames = buffer.split(/\r\n\r\n|\n\n|\r\r/);
    buffer = frames.pop();
    for (const text of frames) {
      const frame = parseFrame(text);
      if (frame) onFrame(frame);
    }
    // Let the page render between reads: when data waits, read() resolves at once and a
    // busy gateway's events would keep the page from drawing (minutes behind at 50 req/s).
    await new Promise((resolve) => setTimeout(resolve, 0));
  }
}

// Follows /gateway/events for good: `on.frame(frame)` for each event, `on.status(name,
// detail)` as the connection changes, `on.key(refused)` when the gateway wants a key.
export class EventFeed {
  constructor(on) {
    this.on = on;
    this.lastId = null;
    this.failures = 0;
    this.connected = false; // once: later connects are reconnects
    this.controller = null;
    this.watchdog = null;
  }

  async connect() {
    this.controller = new AbortController();
    const headers = authorization();
    if (this.lastId !== null) headers["Last-Event-ID"] = this.lastId;
    this.on.status(this.connected ? "reconnecting" : "connecting");
    try {
      const response = await fetch("/gateway/events", { headers, signal: this.controller.signal, cache: "no-store" });
      // 400 with a key: one the gateway cannot read as a header (too long, say). Ask again.
      const refused = response.status === 401 || (response.status === 400 && storedKey() !== null);
      if (refused) return this.on.key(storedKey() !== null, await errorMessage(response));
      if (!response.ok) throw new Error(await errorMessage(response));
      this.failures = 0;
      this.connected = true;
      this.on.status("live");
      this.arm();
      await readFrames(response.body, (frame) => this.take(frame), () => this.arm());
    } catch (error) {
      // A key a header cannot carry (a character outside Latin-1): fetch refuses it.
      if (error.name === "TypeError" && storedKey() !== null && /header|ISO-8859-1/i.test(error.message)) {
        return this.on.key(true, "the key cannot be sent: it holds a character a header cannot carry");
      }
      if (error.name !== "AbortError") this.on.status("reconnecting", error.message);
    }
    clearTimeout(this.watchdog);
    this.retry();
  }

  take(frame) {
    if (frame.id) this.lastId = frame.id;
    this.on.frame(frame);
  }

  arm() {
    clearTimeout(this.watchdog);
    this.watchdog = setTimeout(() => this.controller.abort(), SILENCE);
  }

  retry() {
    const wait = BACKOFF[Math.min(this.failures, BACKOFF.length - 1)];
    this.failures += 1;
    setTimeout(() => this.connect(), wait);
  }

  // Draw again from a fresh `state` event (the page missed events it cannot get back).
  resync() {
    this.lastId = null;
    this.controller.abort();
  }
}
