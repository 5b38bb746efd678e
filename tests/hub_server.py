"""A Hugging Face Hub stand-in for the tests: an in-process HTTP server on 127.0.0.1 that speaks the part of the
Hub's protocol huggingface_hub 2.x uses to create a repo, push a folder (regular files inline in the commit, LFS
files through the batch API, a signed PUT and a verify call) and download it again (repo info, tree listing,
HEAD/GET on /resolve).

It never advertises Xet storage (no Xet headers, no xetHash in listings, no Xet token route), so downloads take
plain HTTP; uploads take the LFS path only when the client runs with Xet disabled (HF_HUB_DISABLE_XET), because
huggingface_hub 2.x chooses Xet on its own whenever hf_xet is installed.

Repos live in memory. Tokens: WRITE_TOKEN may write to the namespace USER, READ_TOKEN may only read; public repos
can be read without a token.
"""

import base64
import fnmatch
import hashlib
import hmac
import json
import re
import secrets
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

USER = "tester"
WRITE_TOKEN = "hf_test_write_token"
READ_TOKEN = "hf_test_read_token"
TOKENS = {WRITE_TOKEN: (USER, True), READ_TOKEN: (USER, False)}

INITIAL_GITATTRIBUTES = b"".join(
    f"{pattern} filter=lfs diff=lfs merge=lfs -text\n".encode()
    for pattern in ("*.safetensors", "*.bin", "*.pt", "*.ckpt", "*.npz", "*.h5", "*.msgpack", "*.onnx")
)
# Files above this size go to LFS whatever their name, as on the Hub.
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024
MAX_BODY_BYTES = 256 * 1024 * 1024
# The Hub's wording: with any other message, the client reads a 401 on a repo URL as "repository not found".
INVALID_CREDENTIALS = "Invalid credentials in Authorization header"
REPO = r"(?P<repo>[\w.-]+/[\w.-]+)"


def git_blob_id(content):
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def lfs_pointer(oid, size):
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {size}\n".encode()


@dataclass(frozen=True)
class StoredFile:
    content: bytes
    lfs: bool

    @property
    def sha256(self):
        return hashlib.sha256(self.content).hexdigest()

    @property
    def blob_id(self):
        """The git object id: of the content for a regular file, of the pointer file for an LFS one."""
        return git_blob_id(lfs_pointer(self.sha256, len(self.content)) if self.lfs else self.content)

    @property
    def etag(self):
        return self.sha256 if self.lfs else self.blob_id


@dataclass
class Commit:
    sha: str
    files: dict
    summary: str
    date: str


@dataclass
class Repo:
    repo_id: str
    private: bool
    commits: dict = field(default_factory=dict)
    branches: dict = field(default_factory=dict)

    @property
    def namespace(self):
        return self.repo_id.split("/")[0]


@dataclass
class LoggedRequest:
    method: str
    path: str
    status: int


class HubError(Exception):
    """An error answer: status, message, and the X-Error-Code the client maps to an exception class."""

    def __init__(self, status, message, code=None, headers=None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


class HubState:
    """Repos, LFS objects and the request log, shared by the handler threads under one lock."""

    def __init__(self):
        self.lock = threading.Lock()
        self.repos = {}
        self.lfs_objects = {}
        self.log = []
        self.commit_count = 0
        self.signing_key = secrets.token_bytes(32)

    def sign(self, oid, size):
        return hmac.new(self.signing_key, f"{oid}:{size}".encode(), hashlib.sha256).hexdigest()

    def new_commit(self, repo, parent_files, summary):
        self.commit_count += 1
        listing = sorted((path, f.blob_id) for path, f in parent_files.items())
        seed = json.dumps([repo.repo_id, self.commit_count, summary, listing]).encode()
        now = datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        commit = Commit(hashlib.sha1(seed).hexdigest(), dict(parent_files), summary, now)
        repo.commits[commit.sha] = commit
        return commit


class HubRequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Idle keep-alive connections end after this many seconds, so no handler thread outlives the tests.
    timeout = 10

    ROUTES = [
        ("POST", r"/api/repos/create", "create_repo"),
        ("POST", r"/api/validate-yaml", "validate_yaml"),
        ("POST", rf"/api/models/{REPO}/preupload/(?P<rev>[^/]+)", "preupload"),
        ("POST", rf"/api/models/{REPO}/commit/(?P<rev>[^/]+)", "commit"),
        ("POST", rf"/api/models/{REPO}/branch/(?P<branch>.+)", "create_branch"),
        ("GET", rf"/api/models/{REPO}(?:/revision/(?P<rev>[^/]+))?", "model_info"),
        ("GET", rf"/api/models/{REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.+))?", "list_tree"),
        ("POST", rf"/{REPO}\.git/info/lfs/objects/batch", "lfs_batch"),
        ("POST", rf"/{REPO}\.git/info/lfs/objects/verify", "lfs_verify"),
        ("PUT", r"/lfs-storage/(?P<oid>[0-9a-f]{64})", "lfs_put"),
        ("GET", rf"/{REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "resolve"),
        ("HEAD", rf"/{REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "resolve"),
    ]

    @property
    def state(self):
        return self.server.state

    @property
    def base_url(self):
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def log_message(self, format, *args):
        """Quiet: the request log is `HubServer.requests`."""

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def _dispatch(self, method):
        url = urlsplit(self.path)
        self.query = {k: v[0] for k, v in parse_qs(url.query).items()}
        status = 500
        try:
            # Read the whole body first, so that an error answer leaves the keep-alive connection in a clean state.
            self.body = self._read_body()
            for route_method, pattern, name in self.ROUTES:
                match = re.fullmatch(pattern, url.path)
                if route_method == method and match:
                    params = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
                    status = getattr(self, name)(**params)
                    break
            else:
                raise HubError(404, f"No route for {method} {url.path}")
        except HubError as e:
            status = e.status
            headers = {"X-Error-Message": e.message, **({"X-Error-Code": e.code} if e.code else {}), **e.headers}
            self._send_json(e.status, {"error": e.message}, headers)
        except Exception as e:  # a bug of this server: answer it, do not hang the client
            self.close_connection = True
            self._send_json(500, {"error": f"{type(e).__name__}: {e}"})
        finally:
            with self.state.lock:
                self.state.log.append(LoggedRequest(method, url.path, status))

    # -- plumbing ----------------------------------------------------------------------------------------------

    def _read_body(self):
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            return self._read_chunked_body()
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY_BYTES:
            self.close_connection = True
            raise HubError(413, f"Request body over {MAX_BODY_BYTES} bytes")
        return self.rfile.read(length)

    def _read_chunked_body(self):
        body = bytearray()
        while True:
            size = int(self.rfile.readline(64).split(b";")[0].strip() or b"0", 16)
            if len(body) + size > MAX_BODY_BYTES:
                self.close_connection = True
                raise HubError(413, f"Request body over {MAX_BODY_BYTES} bytes")
            if size == 0:
                self.rfile.readline(64)
                return bytes(body)
            body += self.rfile.read(size)
            self.rfile.readline(64)

    def _read_json(self):
        try:
            return json.loads(self.body or b"{}")
        except ValueError as e:
            raise HubError(400, f"Request body is not JSON: {e}") from e

    def _send(self, status, body, headers):
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, str(value))
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        return status

    def _send_json(self, status, payload, headers=None, content_type="application/json"):
        return self._send(status, json.dumps(payload).encode(), {"Content-Type": content_type, **(headers or {})})

    # -- authentication and lookups ----------------------------------------------------------------------------

    def _caller(self):
        """(user, can_write) of the bearer token, None without one; an unknown token is refused outright."""
        auth = self.headers.get("Authorization")
        if auth is None:
            return None
        token = auth.removeprefix("Bearer ").strip()
        if token not in TOKENS:
            raise HubError(401, INVALID_CREDENTIALS)
        return TOKENS[token]

    def _require_writer(self, namespace):
        caller = self._caller()
        if caller is None:
            raise HubError(401, INVALID_CREDENTIALS)
        user, can_write = caller
        if not can_write or user != namespace:
            raise HubError(403, f"You don't have the rights to write to the namespace {namespace!r}")

    def _repo(self, repo_id, *, write=False):
        if write:
            self._require_writer(repo_id.split("/")[0])
        caller = self._caller()
        repo = self.state.repos.get(repo_id)
        if repo is None or (repo.private and (caller is None or caller[0] != repo.namespace)):
            raise HubError(404, "Repository not found", code="RepoNotFound")
        return repo

    def _commit(self, repo, rev):
        sha = repo.branches.get(rev, rev)
        if sha not in repo.commits:
            raise HubError(404, f"Invalid rev id: {rev}", code="RevisionNotFound")
        return repo.commits[sha]

    def _lfs_patterns(self, commit):
        attributes = commit.files.get(".gitattributes")
        lines = attributes.content.decode().splitlines() if attributes else []
        return [line.split()[0] for line in lines if "filter=lfs" in line]

    # -- repos -------------------------------------------------------------------------------------------------

    def create_repo(self):
        body = self._read_json()
        caller = self._caller()
        if caller is None:
            raise HubError(401, INVALID_CREDENTIALS)
        namespace = body.get("organization") or caller[0]
        self._require_writer(namespace)
        repo_id = f"{namespace}/{body['name']}"
        url = f"{self.base_url}/{repo_id}"
        with self.state.lock:
            exists = repo_id in self.state.repos
            if not exists:
                repo = Repo(repo_id, private=body.get("visibility") == "private" or bool(body.get("private")))
                initial_files = {".gitattributes": StoredFile(INITIAL_GITATTRIBUTES, lfs=False)}
                repo.branches["main"] = self.state.new_commit(repo, initial_files, "initial commit").sha
                self.state.repos[repo_id] = repo
        if exists:
            # The client reads the URL of the existing repo from this answer when it passed exist_ok=True.
            return self._send_json(409, {"error": "You already created this model repo", "url": url})
        return self._send_json(200, {"url": url, "name": repo_id, "id": repo_id})

    def create_branch(self, repo, branch):
        body = self._read_json()
        with self.state.lock:
            stored = self._repo(repo, write=True)
            if branch in stored.branches:
                raise HubError(409, f"Reference already exists: {branch}")
            stored.branches[branch] = self._commit(stored, body.get("startingPoint") or "main").sha
        return self._send_json(200, {})

    def validate_yaml(self):
        content = self._read_json().get("content", "")
        match = re.match(r"^---\n(.*?)\n---", content, re.DOTALL)
        try:
            metadata = yaml.safe_load(match.group(1)) if match else {}
        except yaml.YAMLError as e:
            return self._send_json(400, {"errors": [{"message": f"Invalid YAML: {e}"}], "warnings": []})
        if not isinstance(metadata, dict):
            return self._send_json(400, {"errors": [{"message": "Card metadata must be a mapping"}], "warnings": []})
        return self._send_json(200, {"errors": [], "warnings": []})

    def model_info(self, repo, rev="main"):
        with self.state.lock:
            stored = self._repo(repo)
            commit = self._commit(stored, rev)
        return self._send_json(
            200,
            {
                "_id": hashlib.sha1(repo.encode()).hexdigest()[:24],
                "id": repo,
                "modelId": repo,
                "author": stored.namespace,
                "sha": commit.sha,
                "lastModified": commit.date,
                "private": stored.private,
                "gated": False,
                "disabled": False,
                "tags": [],
                "siblings": [{"rfilename": path} for path in sorted(commit.files)],
            },
        )

    def list_tree(self, repo, rev, path=""):
        with self.state.lock:
            commit = self._commit(self._repo(repo), rev)
        recursive = self.query.get("recursive", "").lower() == "true"
        prefix = f"{path.rstrip('/')}/" if path else ""
        entries, folders = [], set()
        for file_path in sorted(commit.files):
            if not file_path.startswith(prefix):
                continue
            parts = file_path[len(prefix) :].split("/")
            for depth in range(1, len(parts) if recursive else min(len(parts), 2)):
                folders.add(prefix + "/".join(parts[:depth]))
            if recursive or len(parts) == 1:
                entries.append(self._file_entry(file_path, commit.files[file_path]))
        if path and not entries and not folders:
            raise HubError(404, f"{path} does not exist on {rev}", code="EntryNotFound")
        entries += [{"type": "directory", "oid": git_blob_id(f.encode()), "path": f} for f in sorted(folders)]
        return self._send_json(200, entries)

    @staticmethod
    def _file_entry(path, stored):
        entry = {"type": "file", "oid": stored.blob_id, "size": len(stored.content), "path": path}
        if stored.lfs:
            pointer = lfs_pointer(stored.sha256, len(stored.content))
            entry["lfs"] = {"oid": stored.sha256, "size": len(stored.content), "pointerSize": len(pointer)}
        return entry

    # -- upload: preupload, LFS, commit ------------------------------------------------------------------------

    def preupload(self, repo, rev):
        body = self._read_json()
        with self.state.lock:
            commit = self._commit(self._repo(repo, write=True), rev)
        patterns = self._lfs_patterns(commit)
        answers = []
        for item in body.get("files", []):
            path, size = item["path"], item["size"]
            lfs = size > LFS_SIZE_THRESHOLD or any(fnmatch.fnmatch(path.rsplit("/", 1)[-1], p) for p in patterns)
            existing = commit.files.get(path)
            oid = None if existing is None else existing.sha256 if existing.lfs else existing.blob_id
            answers.append({"path": path, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": oid})
        return self._send_json(200, {"files": answers, "commitOid": commit.sha})

    def lfs_batch(self, repo):
        body = self._read_json()
        with self.state.lock:
            self._repo(repo, write=True)
        if body.get("operation") != "upload":
            raise HubError(422, "Only the upload operation is supported")
        objects = []
        for item in body.get("objects", []):
            oid, size = item.get("oid"), item.get("size")
            valid = isinstance(oid, str) and re.fullmatch(r"[0-9a-f]{64}", oid) and isinstance(size, int)
            if not valid or size < 0:
                objects.append({"oid": str(oid), "size": 0, "error": {"code": 422, "message": "Invalid oid or size"}})
                continue
            answer = {"oid": oid, "size": size, "authenticated": True}
            if oid not in self.state.lfs_objects:
                answer["actions"] = {
                    "upload": {
                        "href": f"{self.base_url}/lfs-storage/{oid}?size={size}&signature={self.state.sign(oid, size)}",
                        "header": {},
                    },
                    "verify": {"href": f"{self.base_url}/{repo}.git/info/lfs/objects/verify", "header": {}},
                }
            objects.append(answer)
        answer = {"transfer": "basic", "objects": objects}
        return self._send_json(200, answer, content_type="application/vnd.git-lfs+json")

    def lfs_put(self, oid):
        """The storage side of a basic transfer: a pre-signed URL, no bearer token, content checked against oid."""
        size = self.query.get("size", "")
        if not hmac.compare_digest(self.query.get("signature", ""), self.state.sign(oid, size)):
            raise HubError(403, "Invalid or missing upload signature")
        content = self.body
        if len(content) != int(size):
            raise HubError(400, f"Size mismatch: announced {size} bytes, received {len(content)}")
        if hashlib.sha256(content).hexdigest() != oid:
            raise HubError(400, "sha256 mismatch: the uploaded content does not hash to the announced oid")
        with self.state.lock:
            self.state.lfs_objects[oid] = content
        return self._send(200, b"", {"ETag": f'"{oid}"'})

    def lfs_verify(self, repo):
        body = self._read_json()
        with self.state.lock:
            self._repo(repo, write=True)
            stored = self.state.lfs_objects.get(body.get("oid"))
        if stored is None or len(stored) != body.get("size"):
            raise HubError(404, f"Object {body.get('oid')} of size {body.get('size')} was not uploaded")
        return self._send_json(200, {})

    def commit(self, repo, rev):
        try:
            lines = [json.loads(line) for line in self.body.splitlines() if line.strip()]
        except ValueError as e:
            raise HubError(400, f"A commit is NDJSON: {e}") from e
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "A commit starts with a header line")
        header = lines[0]["value"]
        with self.state.lock:
            stored = self._repo(repo, write=True)
            if rev not in stored.branches:
                raise HubError(404, f"Invalid rev id: {rev}", code="RevisionNotFound")
            head = stored.commits[stored.branches[rev]]
            if header.get("parentCommit") not in (None, head.sha):
                raise HubError(412, f"parentCommit {header['parentCommit']} is not the head of {rev}")
            files = dict(head.files)
            for line in lines[1:]:
                self._apply_operation(files, line["key"], line["value"])
            commit = self.state.new_commit(stored, files, header.get("summary", ""))
            stored.branches[rev] = commit.sha
        return self._send_json(
            200,
            {
                "success": True,
                "commitOid": commit.sha,
                "commitUrl": f"{self.base_url}/{repo}/commit/{commit.sha}",
                "pullRequestUrl": None,
            },
        )

    def _apply_operation(self, files, key, value):
        path = value["path"]
        if key == "file":
            files[path] = StoredFile(base64.b64decode(value["content"]), lfs=False)
        elif key == "lfsFile":
            content = self.state.lfs_objects.get(value["oid"])
            if content is None or ("size" in value and len(content) != value["size"]):
                raise HubError(422, f"LFS object {value['oid']} for {path} was never uploaded")
            files[path] = StoredFile(content, lfs=True)
        elif key == "deletedFile":
            if files.pop(path, None) is None:
                raise HubError(404, f"A file with this name doesn't exist: {path}", code="EntryNotFound")
        elif key == "deletedFolder":
            for name in [n for n in files if n.startswith(path.rstrip("/") + "/")]:
                del files[name]
        else:
            raise HubError(400, f"Unknown commit operation {key!r}")

    # -- download ----------------------------------------------------------------------------------------------

    def resolve(self, repo, rev, path):
        with self.state.lock:
            commit = self._commit(self._repo(repo), rev)
        stored = commit.files.get(path)
        if stored is None:
            raise HubError(404, "Entry not found", code="EntryNotFound", headers={"X-Repo-Commit": commit.sha})
        headers = {"Content-Type": "application/octet-stream", "X-Repo-Commit": commit.sha, "ETag": f'"{stored.etag}"'}
        if stored.lfs:
            headers.update({"X-Linked-Etag": f'"{stored.sha256}"', "X-Linked-Size": len(stored.content)})
        return self._send(200, stored.content, headers)


class HubServer:
    """Start/stop the stand-in on a free port of 127.0.0.1; `url` is the endpoint to give huggingface_hub."""

    def __init__(self, max_lifetime_s=300):
        self.state = HubState()
        self.max_lifetime_s = max_lifetime_s
        self._httpd = None
        self._stop_lock = threading.Lock()
        self.url = None

    def start(self):
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), HubRequestHandler)
        self._httpd.daemon_threads = True
        self._httpd.state = self.state
        host, port = self._httpd.server_address[:2]
        self.url = f"http://{host}:{port}"
        threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        # A guard against a forgotten stop: the server never outlives this lifetime.
        self._deadline = threading.Timer(self.max_lifetime_s, self.stop)
        self._deadline.daemon = True
        self._deadline.start()
        return self

    def stop(self):
        with self._stop_lock:
            httpd, self._httpd = self._httpd, None
        if httpd is not None:
            self._deadline.cancel()
            httpd.shutdown()
            httpd.server_close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def requests(self, method=None, path_suffix=""):
        """Logged requests, optionally only those of one method whose path ends with `path_suffix`."""
        with self.state.lock:
            log = list(self.state.log)
        return [r for r in log if (method is None or r.method == method) and r.path.endswith(path_suffix)]

    def files(self, repo_id, rev="main"):
        """{path: StoredFile} of a repo at a branch or commit sha."""
        with self.state.lock:
            repo = self.state.repos[repo_id]
            return dict(repo.commits[repo.branches.get(rev, rev)].files)
