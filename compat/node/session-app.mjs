// An express-session app used by the compatibility scripts: three requests
// with the session cookie, each incrementing a counter in the session.
import { once } from "node:events";
import express from "express";
import session from "express-session";

/** Run the app on `store`; returns the last count and the session id. */
export async function sessionApp(store, cookie = undefined) {
  const app = express();
  app.use(session({ store, secret: "compat", resave: false, saveUninitialized: false, cookie }));
  app.get("/inc", (req, res) => {
    req.session.n = (req.session.n || 0) + 1;
    res.json({ n: req.session.n });
  });
  const server = app.listen(0, "127.0.0.1");
  await once(server, "listening");
  const base = `http://127.0.0.1:${server.address().port}`;
  let jar = "";
  let last;
  for (let i = 0; i < 3; i++) {
    const res = await fetch(`${base}/inc`, { headers: jar ? { cookie: jar } : {} });
    jar = (res.headers.get("set-cookie") || jar).split(";")[0];
    last = await res.json();
  }
  server.close();
  return { n: last.n, sid: decodeURIComponent(jar.split("=")[1]).slice(2).split(".")[0] };
}
