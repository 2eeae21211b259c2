"""A small Hugging Face Hub for the tests, on 127.0.0.1: the endpoints huggingface_hub (2.x) calls to list a model
repository and download its files, answering as huggingface.co does.

    GET  /api/models/{org}/{name}[/revision/{rev}]     model info: id, sha (the commit), siblings, gated, private
    HEAD /{org}/{name}/resolve/{rev}/{path}             file metadata: X-Repo-Commit, ETag (git blob sha1) and
    GET                                                 Content-Length; LFS files (weights) answer 302 with
                                                        X-Linked-Etag (sha256), X-Linked-Size and a Location on
                                                        a second server (the "CDN", another origin: no token sent)
    GET  {cdn}/lfs/{sha256}?repo=...&path=...           the LFS file's bytes

Errors carry the X-Error-Code huggingface_hub maps to its exceptions: RepoNotFound (401 without a token, 404 with
one; also private repositories without the right token), RevisionNotFound (404), EntryNotFound (404, with
X-Repo-Commit), GatedRepo (401 without a token, 403 with a token that has no access). Gated repositories list
their files publicly, as on the Hub; TOKEN opens gated and private ones.

`downloads` records (repo_id, path) for each file whose bytes were served, to check what a client fetched.
"""
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlencode, urlsplit

TOKEN = "hf_flax_vae_test_token"
LFS_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pth", ".pt")


def folder_files(folder, prefix="") -> dict:
    """{path in the repository: bytes} of every file under `folder`, below `prefix` ("vae" -> "vae/config.json")."""
    folder = Path(folder)
    return {"/".join(p for p in (prefix, f.relative_to(folder).as_posix()) if p): f.read_bytes()
            for f in sorted(folder.rglob("*")) if f.is_file()}


def git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class Repo:
    def __init__(self, repo_id, gated=False, private=False):
        self.repo_id, self.gated, self.private = repo_id, gated, private
        self.commits: dict[str, dict[str, bytes]] = {}  # commit hash -> files
        self.refs: dict[str, str] = {}  # branch or tag -> commit hash

    def commit(self, revision):
        return revision if revision in self.commits else self.refs.get(revision)


class HubServer:
    """The Hub (and its CDN) in two threads. `add` repositories, then `endpoint` is HF_ENDPOINT."""

    def __init__(self):
        self.repos: dict[str, Repo] = {}
        self.blobs: dict[str, bytes] = {}  # sha256 -> LFS file contents
        self.downloads: list[tuple[str, str]] = []
        self.requests: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        self.servers = []

    def add(self, repo_id, files: dict, revision="main", gated=False, private=False) -> str:
        """Commit `files` ({path: bytes}) as branch `revision` of `repo_id` (created as needed); its commit hash."""
        repo = self.repos.setdefault(repo_id, Repo(repo_id, gated, private))
        digest = hashlib.sha1(json.dumps([repo_id, revision, len(repo.commits),
                                          sorted((p, hashlib.sha256(d).hexdigest()) for p, d in files.items())])
                              .encode()).hexdigest()
        repo.commits[digest] = dict(files)
        repo.refs[revision] = digest
        for path, data in files.items():
            if path.endswith(LFS_SUFFIXES):
                self.blobs[hashlib.sha256(data).hexdigest()] = data
        return digest

    def downloaded(self, repo_id) -> list[str]:
        with self.lock:
            return [path for repo, path in self.downloads if repo == repo_id]

    def start(self):
        for role in ("hub", "cdn"):
            server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
            server.daemon_threads = True
            server.hub, server.role = self, role
            threading.Thread(target=server.serve_forever, daemon=True).start()
            self.servers.append(server)
        return self

    def stop(self):
        for server in self.servers:
            server.shutdown()
            server.server_close()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.servers[0].server_address[1]}"

    @property
    def cdn(self) -> str:
        return f"http://127.0.0.1:{self.servers[1].server_address[1]}"


class Handler(BaseHTTPRequestHandler):
    server_version = "FakeHub/1.0"

    def log_message(self, *args):  # quiet
        pass

    def do_GET(self):
        self.answer(body=True)

    def do_HEAD(self):
        self.answer(body=False)

    # ---- routing

    def answer(self, body):
        hub = self.server.hub
        with hub.lock:
            hub.requests.append((self.command, self.path))
        url = urlsplit(self.path)
        parts = [unquote(p) for p in url.path.split("/")[1:]]
        if self.server.role == "cdn":
            return self.cdn(parts, parse_qs(url.query), body)
        if parts[:2] == ["api", "models"] and len(parts) >= 4:
            rest = parts[4:]
            if rest and (rest[0] != "revision" or len(rest) < 2):
                return self.reply(404, b"Not Found", body)
            return self.model_info("/".join(parts[2:4]), "/".join(rest[1:]) if rest else "main", body)
        if len(parts) >= 5 and parts[2] == "resolve":
            return self.resolve("/".join(parts[:2]), parts[3], "/".join(parts[4:]), body)
        return self.reply(404, b"Not Found", body)

    @property
    def token(self):
        auth = self.headers.get("authorization", "")
        return auth[len("Bearer "):] if auth.startswith("Bearer ") else None

    def reply(self, status, data=b"", body=True, headers=None, content_type="text/plain"):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if body:
            self.wfile.write(data)

    def error(self, status, code, message, body, headers=None):
        self.reply(status, json.dumps({"error": message}).encode(), body,
                   dict(headers or {}, **{"X-Error-Code": code, "X-Error-Message": message}), "application/json")

    def repository(self, repo_id, revision, body):
        """(repo, commit hash), or None after answering the error the Hub gives."""
        repo = self.server.hub.repos.get(repo_id)
        if repo is None or (repo.private and self.token != TOKEN):
            self.error(404 if self.token else 401, "RepoNotFound", "Repository not found", body)
            return None
        commit = repo.commit(revision)
        if commit is None:
            self.error(404, "RevisionNotFound", f"Invalid rev id: {revision}", body)
            return None
        return repo, commit

    # ---- endpoints

    def model_info(self, repo_id, revision, body):
        found = self.repository(repo_id, revision, body)
        if found is None:
            return
        repo, commit = found
        info = {"_id": hashlib.md5(repo_id.encode()).hexdigest()[:24], "id": repo_id, "modelId": repo_id,
                "sha": commit, "private": repo.private, "gated": "manual" if repo.gated else False,
                "disabled": False, "tags": [], "lastModified": "2024-01-01T00:00:00.000Z",
                "siblings": [{"rfilename": path} for path in sorted(repo.commits[commit])]}
        self.reply(200, json.dumps(info).encode(), body, content_type="application/json")

    def resolve(self, repo_id, revision, path, body):
        found = self.repository(repo_id, revision, body)
        if found is None:
            return
        repo, commit = found
        if repo.gated and self.token != TOKEN:
            return self.error(403 if self.token else 401, "GatedRepo",
                              f"Access to model {repo_id} is restricted. You must have access to it and be "
                              "authenticated to access it. Please log in.", body)
        files = repo.commits[commit]
        if path not in files:
            return self.error(404, "EntryNotFound", "Entry not found", body, {"X-Repo-Commit": commit})
        data = files[path]
        headers = {"X-Repo-Commit": commit, "ETag": f'"{git_sha1(data)}"'}
        if path.endswith(LFS_SUFFIXES):  # stored in LFS: a redirect to the CDN, the size and sha256 in headers
            sha256 = hashlib.sha256(data).hexdigest()
            location = f"{self.server.hub.cdn}/lfs/{sha256}?" + urlencode(dict(repo=repo_id, path=path))
            return self.reply(302, b"", body, dict(headers, **{"X-Linked-Etag": f'"{sha256}"',
                                                             "X-Linked-Size": str(len(data)), "Location": location}))
        if body:
            self.record(repo_id, path)
        self.reply(200, data, body, headers, "application/octet-stream")

    def cdn(self, parts, query, body):
        data = self.server.hub.blobs.get(parts[1]) if len(parts) == 2 and parts[0] == "lfs" else None
        if data is None:
            return self.reply(404, b"NoSuchKey", body)
        if body:
            self.record(query.get("repo", ["?"])[0], query.get("path", ["?"])[0])
        self.reply(200, data, body, {"ETag": f'"{parts[1]}"'}, "application/octet-stream")

    def record(self, repo_id, path):
        with self.server.hub.lock:
            self.server.hub.downloads.append((repo_id, path))


__all__ = ["TOKEN", "HubServer", "folder_files"]
