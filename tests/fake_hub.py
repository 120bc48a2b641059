"""A stand-in for the Hugging Face hub on 127.0.0.1, answering huggingface_hub's own client.

    python tests/fake_hub.py ROOT [--lifetime SECONDS]

ROOT/<org>/<name>/ is a repository (its files as they would be on the hub). ROOT/gated.json maps gated
repository ids to the token that may read them. The server prints its port on the first line of stdout,
appends every file it serves to ROOT/requests.log (one "repo_id path" line each), and exits after
`--lifetime` seconds (a bounded loop; tests stop it earlier by its PID). It listens on 127.0.0.1 only.

It implements what snapshot_download and hf_hub_download use: the repository info
(/api/models/<id>[/revision/<rev>]), the recursive tree listing (/api/models/<id>/tree/<rev>), and
HEAD / GET of /<id>/resolve/<rev>/<path> with the hub's headers (X-Repo-Commit, ETag, X-Linked-Etag and
X-Linked-Size for large files), and the hub's error codes (RepoNotFound, EntryNotFound, GatedRepo).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

COMMIT = "0123456789abcdef0123456789abcdef01234567"
LFS_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".onnx", ".onnx_data", ".msgpack", ".model", ".pt")


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\x00" % len(data) + data).hexdigest()


class Hub:
    def __init__(self, root: Path):
        self.root = root
        gated = root / "gated.json"
        self.gated = json.loads(gated.read_text()) if gated.is_file() else {}

    def repo_dir(self, repo_id: str) -> Path | None:
        path = self.root / repo_id
        return path if repo_id.count("/") == 1 and (path / ".repo").is_file() else None

    def files(self, repo_id: str) -> list[str]:
        base = self.repo_dir(repo_id)
        return sorted(p.relative_to(base).as_posix() for p in base.rglob("*") if p.is_file() and p.name != ".repo")

    def entry(self, repo_id: str, path: str) -> dict:
        data = (self.root / repo_id / path).read_bytes()
        out = {"type": "file", "path": path, "size": len(data), "oid": _git_blob_sha1(data)}
        if path.endswith(LFS_SUFFIXES):
            out["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
        return out


class Handler(BaseHTTPRequestHandler):
    hub: Hub
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # quiet
        pass

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, head: bool = False) -> None:
        self.send_response(status)
        for key, value in {"Content-Length": str(len(body)), **(headers or {})}.items():
            self.send_header(key, value)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _error(self, status: int, code: str, message: str, head: bool = False) -> None:
        body = json.dumps({"error": message}).encode()
        self._send(status, body, {"X-Error-Code": code, "X-Error-Message": message,
                                  "Content-Type": "application/json"}, head)

    def _json(self, payload) -> None:
        self._send(200, json.dumps(payload).encode(), {"Content-Type": "application/json"})

    def _authorised(self, repo_id: str, head: bool) -> bool:
        token = self.hub.gated.get(repo_id)
        if token is None or self.headers.get("Authorization", "") == f"Bearer {token}":
            return True
        self._error(401, "GatedRepo", f"Access to model {repo_id} is restricted. You must have access to it and be "
                    "authenticated to access it. Please log in.", head)
        return False

    def do_HEAD(self):
        self._handle(head=True)

    def do_GET(self):
        self._handle(head=False)

    def _handle(self, head: bool) -> None:
        path = unquote(urlparse(self.path).path)
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "models"] and len(parts) >= 4:
            repo_id = "/".join(parts[2:4])
            if self.hub.repo_dir(repo_id) is None:
                return self._error(404, "RepoNotFound", f"Repository Not Found for url: {self.path}.", head)
            if not self._authorised(repo_id, head):
                return None
            rest = parts[4:]
            if not rest or rest[0] == "revision":
                return self._json({"id": repo_id, "modelId": repo_id, "sha": COMMIT, "private": False,
                                   "gated": "manual" if repo_id in self.hub.gated else False, "tags": [],
                                   "siblings": [{"rfilename": f} for f in self.hub.files(repo_id)]})
            if rest[0] == "tree":
                prefix = "/".join(rest[2:])
                files = [f for f in self.hub.files(repo_id) if not prefix or f.startswith(prefix + "/")]
                return self._json([self.hub.entry(repo_id, f) for f in files])
            return self._error(404, "EntryNotFound", f"no such API route {path}", head)
        if len(parts) >= 5 and parts[2] == "resolve":
            repo_id, file_path = "/".join(parts[:2]), "/".join(parts[4:])
            if self.hub.repo_dir(repo_id) is None:
                return self._error(404, "RepoNotFound", f"Repository Not Found for url: {self.path}.", head)
            if not self._authorised(repo_id, head):
                return None
            target = self.hub.root / repo_id / file_path
            if not target.is_file() or target.name == ".repo":
                return self._error(404, "EntryNotFound", f"{file_path} does not exist on \"main\"", head)
            entry = self.hub.entry(repo_id, file_path)
            headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{entry["oid"]}"', "Accept-Ranges": "bytes"}
            if "lfs" in entry:
                headers.update({"X-Linked-Etag": f'"{entry["lfs"]["oid"]}"', "X-Linked-Size": str(entry["size"])})
            if not head:
                with open(self.hub.root / "requests.log", "a") as log:
                    log.write(f"{repo_id} {file_path}\n")
            return self._send(200, target.read_bytes(), headers, head)
        return self._error(404, "RepoNotFound", f"unknown route {path}", head)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("root")
    parser.add_argument("--lifetime", type=float, default=300.0)
    args = parser.parse_args()
    Handler.hub = Hub(Path(args.root))
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.timeout = 0.5
    print(server.server_address[1], flush=True)
    deadline = time.monotonic() + args.lifetime
    while time.monotonic() < deadline:  # bounded: the server ends by itself if nobody stops it
        server.handle_request()
    server.server_close()
    sys.exit(0)


if __name__ == "__main__":
    main()
