"use strict";
// Reference Socket.IO v4 server for relayd's interop tests.
//
// It behaves like Microsoft Graph's socketIo push service as far as relayd can
// tell: WebSocket transport only (polling refused), Engine.IO path "/socket.io/",
// one namespace guarded by a query-string token, and a "notification" event whose
// single argument is a JSON *string*. Control routes under /control/ on the same
// HTTP server let the tests drive it.
//
// Usage:
//   node server.js --port 0 --namespace /notifications --token SECRET
//        [--query-key token] [--ping-interval MS] [--ping-timeout MS]
//        [--host 127.0.0.1] [--exit-on-stdin-eof]
//
// After listening it prints exactly one line to stdout: "listening <port>".

const http = require("node:http");
const { Server } = require("socket.io");

function usage(message) {
  process.stderr.write(
    `server.js: ${message}\n` +
      "usage: node server.js --port N --namespace /NS --token SECRET " +
      "[--query-key KEY] [--ping-interval MS] [--ping-timeout MS] " +
      "[--host ADDR] [--exit-on-stdin-eof]\n",
  );
  process.exit(2);
}

function parseNonNegativeInt(name, text) {
  if (!/^\d+$/.test(text)) usage(`${name} must be a non-negative integer, got ${JSON.stringify(text)}`);
  return Number.parseInt(text, 10);
}

function parseArgs(argv) {
  const opts = {
    port: null,
    host: "127.0.0.1",
    namespace: null,
    token: null,
    queryKey: "token",
    pingInterval: 25000,
    pingTimeout: 20000,
    exitOnStdinEof: false,
  };
  const valued = {
    "--port": (v) => (opts.port = parseNonNegativeInt("--port", v)),
    "--host": (v) => (opts.host = v),
    "--namespace": (v) => (opts.namespace = v),
    "--token": (v) => (opts.token = v),
    "--query-key": (v) => (opts.queryKey = v),
    "--ping-interval": (v) => (opts.pingInterval = parseNonNegativeInt("--ping-interval", v)),
    "--ping-timeout": (v) => (opts.pingTimeout = parseNonNegativeInt("--ping-timeout", v)),
  };
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    if (arg === "--exit-on-stdin-eof") {
      opts.exitOnStdinEof = true;
    } else if (Object.hasOwn(valued, arg)) {
      if (i + 1 >= argv.length) usage(`${arg} needs a value`);
      valued[arg](argv[++i]);
    } else {
      usage(`unknown argument ${JSON.stringify(arg)}`);
    }
  }
  if (opts.port === null) usage("--port is required");
  if (!opts.namespace || !opts.namespace.startsWith("/") || opts.namespace === "/") {
    usage("--namespace is required and must be a path like /notifications");
  }
  if (opts.token === null) usage("--token is required");
  if (!opts.queryKey) usage("--query-key must not be empty");
  return opts;
}

const opts = parseArgs(process.argv.slice(2));

let seq = 0;

function notificationPayload(n) {
  return JSON.stringify({
    value: [
      {
        subscriptionId: "js-sub",
        clientState: "system-managed:js",
        resource: "js-drive",
        tenantId: "js-tenant",
        relaydEmulatorSeq: n,
      },
    ],
  });
}

function sendJson(res, status, body) {
  const text = JSON.stringify(body);
  res.writeHead(status, {
    "content-type": "application/json",
    "content-length": Buffer.byteLength(text),
    "cache-control": "no-store",
  });
  res.end(text);
}

// Registered before socket.io attaches: engine.io wraps the existing 'request'
// listeners and only forwards requests outside its own path ("/socket.io/").
function onRequest(req, res) {
  const url = new URL(req.url, "http://localhost");
  if (!url.pathname.startsWith("/control/")) {
    sendJson(res, 404, { error: "not found" });
    return;
  }
  // The request body is never used; consume it so the connection stays reusable.
  req.resume();
  const route = `${req.method} ${url.pathname}`;
  switch (route) {
    case "POST /control/emit":
      controlEmit(url, res);
      return;
    case "POST /control/kick":
      controlKick(res);
      return;
    case "GET /control/clients":
      sendJson(res, 200, { clients: nsp.sockets.size });
      return;
    default:
      if (["/control/emit", "/control/kick", "/control/clients"].includes(url.pathname)) {
        sendJson(res, 405, { error: `method ${req.method} not allowed` });
      } else {
        sendJson(res, 404, { error: "not found" });
      }
  }
}

function controlEmit(url, res) {
  const raw = url.searchParams.get("raw");
  const countText = url.searchParams.get("count") ?? "1";
  if (!/^\d+$/.test(countText)) {
    sendJson(res, 400, { error: "count must be a non-negative integer" });
    return;
  }
  const count = Number.parseInt(countText, 10);
  const sockets = nsp.sockets.size;
  let emitted = 0;
  if (raw !== null) {
    nsp.emit("notification", raw);
    emitted = 1;
  } else {
    for (let i = 0; i < count; i++) {
      seq += 1;
      nsp.emit("notification", notificationPayload(seq));
      emitted += 1;
    }
  }
  sendJson(res, 200, { emitted, sockets, last_seq: seq });
}

function controlKick(res) {
  const sockets = [...nsp.sockets.values()];
  for (const socket of sockets) socket.disconnect(true);
  sendJson(res, 200, { kicked: sockets.length });
}

const httpServer = http.createServer(onRequest);
const io = new Server(httpServer, {
  transports: ["websocket"],
  pingInterval: opts.pingInterval,
  pingTimeout: opts.pingTimeout,
  serveClient: false,
});

const nsp = io.of(opts.namespace);
nsp.use((socket, next) => {
  if (socket.handshake.query[opts.queryKey] === opts.token) {
    next();
  } else {
    next(new Error("unauthorized"));
  }
});

let shuttingDown = false;
function shutdown(reason) {
  if (shuttingDown) return;
  shuttingDown = true;
  process.stderr.write(`server.js: shutting down (${reason})\n`);
  // Do not let a stuck connection keep the process alive.
  setTimeout(() => process.exit(0), 3000).unref();
  // io.close() disconnects every socket, closes engine.io and then the HTTP
  // server (which, on Node >= 19, also drops idle keep-alive connections).
  io.close().then(
    () => process.exit(0),
    () => process.exit(0),
  );
}

process.on("SIGTERM", () => shutdown("SIGTERM"));
process.on("SIGINT", () => shutdown("SIGINT"));
// If the parent went away, writing our log lines must not crash the shutdown.
process.stdout.on("error", () => {});
process.stderr.on("error", () => {});
if (opts.exitOnStdinEof) {
  // The parent holds our stdin; if it goes away without signalling us, stop too.
  process.stdin.on("end", () => shutdown("stdin closed"));
  process.stdin.on("error", () => shutdown("stdin error"));
  process.stdin.resume();
}

httpServer.on("error", (err) => {
  process.stderr.write(`server.js: ${err.stack || err}\n`);
  process.exit(1);
});

httpServer.listen(opts.port, opts.host, () => {
  const { port } = httpServer.address();
  process.stdout.write(`listening ${port}\n`);
});
