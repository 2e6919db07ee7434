// Calls to the JSON API, and the API key they carry: asked for when the server answers 401/403, kept in
// sessionStorage (gone when the tab closes). Uses $() and showError() from app.js (called later).
"use strict";

const KEY_STORE = "imsrc-api-key";
let keyRequest = null; // one pending question, shared by every request that needs the key

function storedKey() {
  return sessionStorage.getItem(KEY_STORE) || "";
}

function showKeyState() {
  $("key-state").hidden = !storedKey();
}

function askForKey(reason) {
  if (!keyRequest) {
    keyRequest = new Promise((resolve, reject) => {
      $("key-reason").textContent = reason;
      $("key-panel").hidden = false;
      $("key-input").value = "";
      $("key-input").focus();
      const done = (ok) => {
        $("key-panel").hidden = true;
        $("key-panel").onsubmit = null;
        $("key-cancel").onclick = null;
        keyRequest = null;
        ok ? resolve() : reject(new Error(reason));
      };
      $("key-panel").onsubmit = (e) => {
        e.preventDefault();
        const key = $("key-input").value.trim();
        if (!key) return;
        sessionStorage.setItem(KEY_STORE, key);
        showKeyState();
        done(true);
      };
      $("key-cancel").onclick = () => done(false);
    });
  }
  return keyRequest;
}

async function api(path, options = {}, retried = false) {
  const headers = new Headers(options.headers || {});
  if (storedKey()) headers.set("X-API-Key", storedKey());
  let response;
  try {
    response = await fetch(path, { ...options, headers });
  } catch (err) {
    throw new Error(`server unreachable: ${err.message}`);
  }
  const body = response.headers.get("content-type")?.includes("json") ? await response.json() : null;
  const detail = (body && body.detail) || `${response.status} ${response.statusText}`;
  const keyProblem = response.status === 401 || (response.status === 403 && detail.includes("API key"));
  if (keyProblem && !retried) {
    await askForKey(`This needs an API key: ${detail}`);
    return api(path, options, true);
  }
  if (keyProblem) {
    sessionStorage.removeItem(KEY_STORE); // the key just given did not do: ask again next time
    showKeyState();
  }
  if (!response.ok) {
    throw new Error(detail);
  }
  return body;
}
