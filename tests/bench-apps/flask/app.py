# The Flask app `cargo xtask bench build` builds and deploys: `GET /` answers its version,
# which the benchmark rewrites for each code-only change.
import os

from flask import Flask

VERSION = "flask-bench 0"

app = Flask(__name__)


@app.get("/")
def version():
    return VERSION + "\n", 200, {"Content-Type": "text/plain"}


if __name__ == "__main__":
    app.run(host="0.0.0.0", port=int(os.environ.get("PORT", "8080")))
