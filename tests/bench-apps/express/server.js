// The Express app `cargo xtask bench build` builds and deploys: `GET /` answers its version,
// which the benchmark rewrites for each code-only change.
const express = require("express");

const VERSION = "express-bench 0";

const app = express();
app.get("/", (_req, res) => res.type("text/plain").send(VERSION + "\n"));
app.listen(Number(process.env.PORT || 8080), "0.0.0.0");
