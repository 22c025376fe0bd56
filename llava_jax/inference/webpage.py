"""The web chat page the server shows at ``/``: one self-contained HTML file (no external scripts,
styles or fonts), talking to the same server's ``/v1/chat/completions`` with streaming.

The user picks an image (file input or drag and drop; images over 1344 px on the long side are
scaled down in the browser first, as the original LLaVA web demo does), asks questions, and watches
the reply stream in. The image goes with the first question of a conversation; picking another
image starts a new conversation. Sampling settings default to the original demo's (temperature 0.2,
top-p 0.7, 512 new tokens).
"""

from __future__ import annotations

import html
import json

PAGE = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>LLaVA chat</title>
<style>
  :root { --fg: #1d2330; --muted: #667085; --line: #d9dee7; --accent: #2f5bd3; --user: #eef2fb; --bot: #f7f7f8; }
  * { box-sizing: border-box; }
  body { margin: 0; font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--fg);
         background: #fff; }
  header { padding: 10px 18px; border-bottom: 1px solid var(--line); display: flex; gap: 12px; align-items: baseline; }
  header h1 { font-size: 18px; margin: 0; }
  header .model { color: var(--muted); font-size: 13px; }
  main { display: grid; grid-template-columns: 300px 1fr; gap: 18px; padding: 16px 18px; max-width: 1200px; }
  aside { display: flex; flex-direction: column; gap: 12px; }
  #drop { border: 2px dashed var(--line); border-radius: 10px; padding: 10px; text-align: center; color: var(--muted);
          min-height: 180px; display: flex; flex-direction: column; align-items: center; justify-content: center;
          gap: 8px; cursor: pointer; }
  #drop.over { border-color: var(--accent); }
  #preview { max-width: 100%; max-height: 240px; border-radius: 6px; display: none; }
  fieldset { border: 1px solid var(--line); border-radius: 10px; padding: 8px 12px; }
  fieldset label { display: grid; grid-template-columns: 1fr 80px; align-items: center; margin: 4px 0;
                   font-size: 13px; }
  fieldset input { width: 80px; }
  button { font: inherit; border: 1px solid var(--line); background: #fff; border-radius: 8px; padding: 6px 14px;
           cursor: pointer; }
  button.primary { background: var(--accent); color: #fff; border-color: var(--accent); }
  button:disabled { opacity: .5; cursor: default; }
  section { display: flex; flex-direction: column; min-height: 70vh; }
  #log { flex: 1; display: flex; flex-direction: column; gap: 10px; padding-bottom: 12px; }
  .msg { padding: 10px 12px; border-radius: 10px; white-space: pre-wrap; word-wrap: break-word; }
  .msg .role { display: block; font-size: 12px; font-weight: 600; color: var(--muted); margin-bottom: 2px; }
  .msg.user { background: var(--user); align-self: flex-end; max-width: 85%; }
  .msg.assistant { background: var(--bot); align-self: flex-start; max-width: 85%; }
  .msg img { display: block; max-width: 160px; max-height: 120px; border-radius: 6px; margin-bottom: 6px; }
  .empty { color: var(--muted); }
  form { display: flex; gap: 8px; align-items: flex-end; }
  textarea { flex: 1; font: inherit; padding: 8px 10px; border: 1px solid var(--line); border-radius: 8px;
             resize: vertical; min-height: 44px; }
  #status { min-height: 20px; font-size: 13px; color: var(--muted); margin-top: 6px; }
  #status.error { color: #b42318; }
</style>
</head>
<body>
<header><h1>LLaVA chat</h1><span class="model" id="model">__MODEL__</span></header>
<main>
  <aside>
    <label id="drop" for="image-input">
      <img id="preview" alt="selected image">
      <span id="drop-text">Click or drop an image here</span>
      <input id="image-input" type="file" accept="image/*" hidden>
    </label>
    <fieldset>
      <legend>Sampling</legend>
      <label>temperature <input id="temperature" type="number" min="0" max="2" step="0.1" value="0.2"></label>
      <label>top-p <input id="top-p" type="number" min="0.05" max="1" step="0.05" value="0.7"></label>
      <label>max new tokens <input id="max-tokens" type="number" min="1" max="__MAX_TOKENS__" step="1"
        value="__DEFAULT_TOKENS__"></label>
    </fieldset>
    <button id="new-chat" type="button">New conversation</button>
  </aside>
  <section>
    <div id="log"><div class="empty" id="empty">Pick an image, then ask about it.</div></div>
    <form id="form">
      <textarea id="prompt" rows="2" placeholder="Ask about the image (Enter sends, Shift+Enter: new line)"></textarea>
      <button id="send" class="primary" type="submit">Send</button>
      <button id="stop" type="button" disabled>Stop</button>
    </form>
    <div id="status"></div>
  </section>
</main>
<script>
"use strict";
const MODEL = __MODEL_JSON__;
const MAX_SIDE = 1344;
const $ = (id) => document.getElementById(id);
let image = null;        // data: URI of the current image
let history = [];        // OpenAI messages of this conversation
let busy = null;         // AbortController of the running request

function status(text, isError) {
  $("status").textContent = text || "";
  $("status").className = isError ? "error" : "";
}

function addMessage(role, text, img) {
  const empty = $("empty");
  if (empty) empty.remove();
  const div = document.createElement("div");
  div.className = "msg " + role;
  const label = document.createElement("span");
  label.className = "role";
  label.textContent = role === "user" ? "You" : "Assistant";
  div.appendChild(label);
  if (img) { const im = document.createElement("img"); im.src = img; im.alt = "image"; div.appendChild(im); }
  const body = document.createElement("span");
  body.className = "text";
  body.textContent = text;
  div.appendChild(body);
  $("log").appendChild(div);
  div.scrollIntoView({block: "end"});
  return body;
}

function newConversation() {
  if (busy) busy.abort();
  history = [];
  $("log").innerHTML = '<div class="empty" id="empty">' +
    (image ? "Ask a question about the image." : "Pick an image, then ask about it.") + "</div>";
  status("");
}

function readImage(file) {
  if (!file) return;
  if (!file.type.startsWith("image/")) { status(file.name + " is not an image", true); return; }
  const reader = new FileReader();
  reader.onerror = () => status("could not read " + file.name, true);
  reader.onload = () => {
    const img = new Image();
    img.onerror = () => status(file.name + " could not be decoded as an image", true);
    img.onload = () => {
      let url = reader.result;
      const side = Math.max(img.naturalWidth, img.naturalHeight);
      if (side > MAX_SIDE) {  // scale down in the browser, as the original demo caps the long side
        const scale = MAX_SIDE / side, canvas = document.createElement("canvas");
        canvas.width = Math.round(img.naturalWidth * scale);
        canvas.height = Math.round(img.naturalHeight * scale);
        canvas.getContext("2d").drawImage(img, 0, 0, canvas.width, canvas.height);
        url = canvas.toDataURL("image/jpeg", 0.92);
      }
      image = url;
      $("preview").src = url;
      $("preview").style.display = "block";
      $("drop-text").textContent = file.name + " (click to change)";
      newConversation();
    };
    img.src = reader.result;
  };
  reader.readAsDataURL(file);
}

async function send(text) {
  const first = history.length === 0;
  const content = first && image
    ? [{type: "image_url", image_url: {url: image}}, {type: "text", text: text}]
    : text;
  const messages = history.concat([{role: "user", content: content}]);
  addMessage("user", text, first ? image : null);
  const out = addMessage("assistant", "");
  out.parentElement.classList.add("pending");
  const body = {
    model: MODEL, messages: messages, stream: true,
    temperature: Number($("temperature").value), top_p: Number($("top-p").value),
    max_tokens: Number($("max-tokens").value),
  };
  busy = new AbortController();
  $("send").disabled = true; $("stop").disabled = false;
  status("generating...");
  let reply = "", finish = null;
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body),
      signal: busy.signal,
    });
    if (!response.ok) {
      let message = response.status + " " + response.statusText;
      try { message = (await response.json()).error.message; } catch (e) {}
      throw new Error(message);
    }
    const reader = response.body.getReader(), decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, {stream: true});
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut); buffer = buffer.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ")) continue;
          const data = line.slice(6);
          if (data === "[DONE]") continue;
          const msg = JSON.parse(data);
          if (msg.error) throw new Error(msg.error.message);
          const choice = msg.choices && msg.choices[0];
          if (!choice) continue;
          if (choice.delta && choice.delta.content) { reply += choice.delta.content; out.textContent = reply; }
          if (choice.finish_reason) finish = choice.finish_reason;
        }
      }
    }
    history = messages.concat([{role: "assistant", content: reply}]);
    status(finish === "length" ? "reply cut at the token limit" : "");
  } catch (e) {
    if (e.name === "AbortError") { history = messages.concat([{role: "assistant", content: reply}]); status("stopped"); }
    else { out.parentElement.remove(); status(e.message, true); }
  } finally {
    out.parentElement && out.parentElement.classList.remove("pending");
    if (out.parentElement) out.parentElement.dataset.done = "1";
    busy = null;
    $("send").disabled = false; $("stop").disabled = true;
  }
}

$("image-input").addEventListener("change", (e) => readImage(e.target.files[0]));
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); readImage(e.dataTransfer.files[0]); });
$("new-chat").addEventListener("click", newConversation);
$("stop").addEventListener("click", () => busy && busy.abort());
$("form").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("prompt").value.trim();
  if (!text || busy) return;
  $("prompt").value = "";
  send(text);
});
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("form").requestSubmit(); }
});
</script>
</body>
</html>
"""


def render_page(model_name: str, *, max_tokens: int = 1024, default_tokens: int = 512) -> str:
    """The chat page for a server that serves `model_name`."""
    return (
        PAGE.replace("__MODEL_JSON__", json.dumps(model_name).replace("<", "\\u003c"))
        .replace("__MODEL__", html.escape(model_name))
        .replace("__MAX_TOKENS__", str(int(max_tokens)))
        .replace("__DEFAULT_TOKENS__", str(int(min(default_tokens, max_tokens))))
    )
