"""Hugging Face Hub ids wherever a checkpoint path is accepted: `fetch` downloads what one model needs into
huggingface_hub's cache and returns a local folder or file that `convert.load` reads.

Forms (a local path that exists always wins over a Hub id spelled the same):

    org/name                    the repository's model (diffusers, flax-vae, TAESD pair or single-file repository)
    org/name:subfolder          a folder of it, e.g. black-forest-labs/FLUX.1-schnell:vae (or subfolder=)
    org/name/path/in/repo       one file of it (or a folder of it), e.g. an LDM .safetensors (or filename=)
    org/name@revision...        a branch, tag or commit hash (or revision=), in front of ":" or "/"

Only what the model needs is downloaded: config.json and one weights file (safetensors before .bin, the requested
`variant`), or a TAESD pair, never a whole repository. The repository's file listing decides which, online from the
Hub's model info, offline (HF_HUB_OFFLINE=1, local_files_only) from the listing saved by the last online run (or
the cached snapshot). huggingface_hub keeps the files (HF_HOME, HF_HUB_CACHE, tokens, progress bars); a folder
model is returned as a folder of links to exactly the chosen files, `<repo cache>/flax-vae/<commit>/.../<name>/`,
so that files of other variants or formats cached beside them never take their place.
"""
import contextlib
import json
import os
import re
import shutil
import sys
from pathlib import Path

from . import convert
from .errors import CheckpointError

_NAME = r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?"
HUB_ID = re.compile(rf"(?P<repo>{_NAME}/{_NAME})(?:@(?P<revision>[^/:@\s]+))?(?:(?P<sep>[:/])(?P<rest>.+))?")
NATIVE_WEIGHTS = convert.native.PARAMS_FILE
WEIGHTS_SUFFIXES = convert.checkpoint.CHECKPOINT_SUFFIXES  # safetensors first
LISTED = 12  # files named in an error message
OWN = "flax-vae"  # our folder inside a repository's cache folder (huggingface_hub's tools leave it alone)


def parse(source) -> dict | None:
    """`"org/name[@revision][:subfolder | /path]"` -> dict(repo_id, revision, subfolder, path); None where `source`
    is not spelled like a Hub id (an existing local path is the caller's to check first)."""
    if not isinstance(source, str):
        return None
    m = HUB_ID.fullmatch(source.strip().rstrip("/"))
    if m is None or any(bad in m["repo"] for bad in ("--", "..")) or len(m["repo"].split("/")[1]) > 96:
        return None
    rest = (m["rest"] or "").strip("/") or None
    if m["sep"] == ":" and rest and ":" in rest:
        return None
    return dict(repo_id=m["repo"], revision=m["revision"], subfolder=rest if m["sep"] == ":" else None,
                path=rest if m["sep"] == "/" else None)


def is_hub_id(source) -> bool:
    """True for a string that is no existing local path and is spelled like a Hub id (`org/name[...]`)."""
    return isinstance(source, str) and not Path(source).exists() and parse(source) is not None


def fetch(repo_or_path, *, subfolder=None, filename=None, revision=None, variant=None, cache_dir=None,
          local_files_only=False, token=None) -> Path:
    """A local folder or file holding the model `repo_or_path` names, for `convert.load`.

    Args:
        repo_or_path: a local file or folder (returned as it is, joined with `subfolder` and `filename`), or a Hub
            id: `"org/name"`, `"org/name:subfolder"`, `"org/name/file.safetensors"` (or a folder's path),
            optionally with `@revision` after the name. An existing local path wins over a Hub id of the same
            spelling.
        subfolder: the model's folder inside the repository (e.g. `"vae"` of a diffusers pipeline).
        filename: one checkpoint file of the repository (inside `subfolder`) instead of its model folder.
        revision: a branch, tag or commit hash (default: the main branch).
        variant: the diffusers weights variant, e.g. `"fp16"` (diffusion_pytorch_model.fp16.safetensors).
        cache_dir: huggingface_hub's cache folder (default: HF_HUB_CACHE, i.e. $HF_HOME/hub).
        local_files_only: use the cache only, as HF_HUB_OFFLINE=1 does.
        token: a Hugging Face token for private and gated repositories (default: HF_TOKEN or the token saved by
            `hf auth login`); False sends none.

    Returns:
        A `Path`: a folder (diffusers config.json + one weights file, flax-vae config.json + params.safetensors, or a
        TAESD pair) or one checkpoint file.

    Raises:
        CheckpointError: one line naming the fix: no such path and not a Hub id; repository or revision not found;
            gated without access; not in the cache while offline; no loadable weights (listing what is there).
    """
    hub_options = dict(subfolder=subfolder, filename=filename, revision=revision, variant=variant)
    if isinstance(repo_or_path, os.PathLike) or (isinstance(repo_or_path, str) and Path(repo_or_path).exists()):
        return _local(Path(repo_or_path), **hub_options)
    ref = parse(repo_or_path)
    if ref is None:
        raise CheckpointError(f"{repo_or_path}: no such file or folder (nor a Hub id: org/name, org/name:subfolder "
                              "or org/name/file)")
    for key, given in (("revision", revision), ("subfolder", subfolder)):
        if given and ref[key] and given.strip("/") != ref[key]:
            raise CheckpointError(f"{repo_or_path}: {key} given twice ({ref[key]!r} in the id, {given!r} as the "
                                  f"option): give one")
        ref[key] = ref[key] or (given.strip("/") if isinstance(given, str) else given) or None
    return _Fetch(repo_or_path, ref, filename, variant, cache_dir, local_files_only, token).run()


def _local(path: Path, subfolder, filename, revision, variant) -> Path:
    if revision or variant:
        raise CheckpointError(f"{path}: a local path: revision= and variant= are for Hub ids (its files are used as "
                              "they are)")
    for part in (subfolder, filename):
        if part:
            path = path / part
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    return path


def _network_errors() -> tuple:
    """Connection failures of huggingface_hub's HTTP client (httpx2 or httpx in 1.x and later, requests before),
    from whichever of them it has imported."""
    errors = []
    for module in (sys.modules.get(name) for name in ("httpx2", "httpx", "requests")):
        for name in ("TransportError", "ConnectionError", "Timeout"):
            error = getattr(module, name, None)
            if isinstance(error, type) and issubclass(error, BaseException):
                errors.append(error)
    return tuple(errors)


def _listing(files, limit=LISTED) -> str:
    files = sorted(files)
    return ", ".join(files[:limit]) + (f", ... ({len(files)} files)" if len(files) > limit else "") or "no files"


class _Fetch:
    """One `fetch` of a Hub id: list the repository, choose the files, download them, return the local path."""

    def __init__(self, source, ref, filename, variant, cache_dir, local_files_only, token):
        from huggingface_hub import constants
        self.constants = constants
        self.source, self.repo_id, self.revision = source, ref["repo_id"], ref["revision"]
        self.subfolder, self.path, self.filename, self.variant = ref["subfolder"], ref["path"], filename, variant
        self.token, self.local_files_only = token, local_files_only
        self.cache = Path(cache_dir or constants.HF_HUB_CACHE).expanduser().resolve()  # as huggingface_hub has it
        self.cache_dir = cache_dir
        self.offline = bool(local_files_only or constants.is_offline_mode())
        self.storage = self.cache / ("models--" + self.repo_id.replace("/", "--"))
        self.unreachable = None  # why the Hub could not be asked (then the cache answers)
        self.downloaded = {}  # path in the repository -> local file, for this fetch

    # ---- where and what

    @property
    def where(self) -> str:
        """The repository (and revision) in messages."""
        return self.repo_id + (f"@{self.revision}" if self.revision else "")

    def run(self) -> Path:
        files, commit = self.list_files()
        folder = (self.subfolder or "").strip("/")
        filename = self.filename
        if self.path:  # org/name/PATH: a file, or a folder, of the repository
            path = "/".join(p for p in (folder, self.path) if p)
            if path in files:
                folder, filename = path.rpartition("/")[0], path.rpartition("/")[2]
            elif any(f.startswith(path + "/") for f in files):
                folder = path
            else:
                raise self.missing(f"no file or folder {path!r}", files)
        if filename:
            path = "/".join(p for p in (folder, filename) if p)
            if path not in files:
                raise self.missing(f"no file {path!r}", [f for f in files if f.rpartition("/")[0] == folder] or files)
            if self.variant:
                raise CheckpointError(f"{self.where}/{path}: variant= chooses among diffusers weights files; with "
                                      f"one file named, leave it out")
            return self.download(path)
        return self.model_folder(files, folder, commit)

    def model_folder(self, files, folder, commit) -> Path:
        prefix = folder + "/" if folder else ""
        here = {f[len(prefix):] for f in files if f.startswith(prefix) and "/" not in f[len(prefix):]}
        label = self.where + (f":{folder}" if folder else "")
        if not here:
            folders = sorted({f.split("/")[0] for f in files if "/" in f})
            raise CheckpointError(f"{label}: no such folder in the repository (its folders: "
                                  f"{', '.join(folders) or 'none'})")
        config = self.read_config(prefix + "config.json") if "config.json" in here else None
        if isinstance(config, dict) and config.get("format") == convert.native.FORMAT:
            if NATIVE_WEIGHTS not in here:
                raise self.no_weights(label, here, f"its flax-vae config.json has no {NATIVE_WEIGHTS}")
            self.no_variant(label, "a flax-vae folder")
            return self.view(commit, folder, {"config.json": prefix + "config.json",
                                              NATIVE_WEIGHTS: prefix + NATIVE_WEIGHTS})
        if isinstance(config, dict) and "_class_name" in config:  # diffusers
            cls, known = config["_class_name"], [*convert.DIFFUSERS_CLASSES, *getattr(convert, "FLAX_CLASSES", ())]
            if cls not in known:  # refused before any weights are downloaded
                raise CheckpointError(f"{label}: config.json is a diffusers {cls}, not an autoencoder flax-vae reads "
                                      f"({', '.join(known)})" + self.vae_hint(files, folder))
            names = ([f"diffusion_pytorch_model.{self.variant}{suffix}" for suffix in (".safetensors", ".bin")]
                     if self.variant else list(convert.WEIGHT_FILES))
            weights = next((n for n in names if n in here), None)
            if weights is None and self.variant:
                raise CheckpointError(f"{label}: no {self.variant} variant ({' or '.join(names)}; it has "
                                      f"{_listing(here)}): leave out variant= for the default weights")
            if weights is None:
                raise self.no_weights(label, here, f"its diffusers config.json has no {' or '.join(names)}")
            return self.view(commit, folder, {"config.json": prefix + "config.json", weights: prefix + weights})
        if "model_index.json" in here and "config.json" not in here:
            raise CheckpointError(f"{label}: a diffusers pipeline, not one model" + self.vae_hint(files, folder))
        self.no_variant(label, "a repository without diffusers weights")
        weights = self.prefer_safetensors(n for n in here if n.endswith(WEIGHTS_SUFFIXES))
        parts = {part: sorted(n for n in weights if part in n) for part in ("encoder", "decoder")}
        if any(parts.values()):  # TAESD *_encoder / *_decoder files
            for part, found in parts.items():
                if len(found) > 1:
                    raise CheckpointError(f"{label}: several {part} files ({', '.join(found)}): name one, e.g. "
                                          f"{self.repo_id}/{prefix}{found[0]} (or encoder= / decoder=)")
            return self.view(commit, folder, {found[0]: prefix + found[0] for found in parts.values() if found})
        if len(weights) == 1:
            return self.download(prefix + weights[0])
        if len(weights) > 1:
            raise CheckpointError(f"{label}: several checkpoint files ({', '.join(sorted(weights))}): name one, "
                                  f"e.g. {self.repo_id}/{prefix}{sorted(weights)[0]} (or filename=)")
        raise self.no_weights(label, here)

    @staticmethod
    def prefer_safetensors(names) -> list[str]:
        """One file per stem: the .safetensors where there is one, else the first pickle suffix."""
        by_stem = {}
        for name in sorted(names, key=lambda n: WEIGHTS_SUFFIXES.index(Path(n).suffix)):
            by_stem.setdefault(Path(name).stem, name)
        return sorted(by_stem.values())

    def no_variant(self, label, kind):
        if self.variant:
            raise CheckpointError(f"{label}: {kind}: variant={self.variant!r} is for diffusers weights "
                                  f"(diffusion_pytorch_model.{self.variant}.safetensors); leave it out")

    def vae_hint(self, files, folder) -> str:
        """Where a pipeline keeps its autoencoder: its sub-folders with a config.json and "vae" in the name."""
        prefix = folder + "/" if folder else ""
        inner = sorted({f[len(prefix):].split("/")[0] for f in files if f.startswith(prefix)
                        and f[len(prefix):].count("/") == 1 and f.endswith("/config.json")})
        vae = [prefix + s for s in inner if "vae" in s.lower()]
        return (f": load its VAE with subfolder={vae[0]!r} ({self.repo_id}:{vae[0]} on the command line)" if vae
                else ": name the autoencoder's folder with subfolder= (org/name:subfolder on the command line)")

    def no_weights(self, label, files, why="") -> CheckpointError:
        why = f"{why}; " if why else ""
        return CheckpointError(f"{label}: no weights flax-vae can load ({why}it has {_listing(files)}): expected "
                               "a diffusers config.json + diffusion_pytorch_model[.VARIANT].safetensors, a flax-vae "
                               f"config.json + {NATIVE_WEIGHTS}, TAESD *_encoder / *_decoder files or one checkpoint "
                               "file (name it: org/name/FILE or filename=)")

    def missing(self, what, files) -> CheckpointError:
        return CheckpointError(f"{self.where}: {what} in the repository (it has {_listing(files)})")

    # ---- the listing

    def list_files(self) -> tuple[list[str], str | None]:
        """The repository's files at the revision (and its commit hash, None where unknown)."""
        if not self.offline:
            listed = self.list_online()
            if listed is not None:
                return listed
        listed = self.list_cached()
        if listed is None:
            raise self.not_cached()
        return listed

    @contextlib.contextmanager
    def repository_errors(self):
        """huggingface_hub's errors about the repository itself -> one-line CheckpointErrors naming the fix."""
        from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError
        try:
            yield
        except GatedRepoError as e:  # a RepositoryNotFoundError too: first
            raise self.gated(e) from None
        except RepositoryNotFoundError:
            raise self.not_found() from None
        except RevisionNotFoundError:
            raise self.bad_revision() from None

    def list_online(self):
        from huggingface_hub import HfApi
        from huggingface_hub.errors import DisabledRepoError, HfHubHTTPError, OfflineModeIsEnabled
        try:
            with self.repository_errors():
                info = HfApi().model_info(self.repo_id, revision=self.revision, token=self.token)
        except DisabledRepoError:
            raise CheckpointError(f"{self.repo_id}: disabled on the Hub (its owner or the Hub turned access "
                                  "off)") from None
        except HfHubHTTPError as e:  # 5xx, 429: the Hub is down; the cache may still answer
            status = getattr(getattr(e, "response", None), "status_code", "?")
            if status not in (429,) and not (isinstance(status, int) and status >= 500):
                raise CheckpointError(f"{self.where}: the Hub answered HTTP {status}: "
                                      f"{' '.join(str(e).split())}") from None
            self.unreachable = f"the Hub answered HTTP {status}"
            return None
        except (OfflineModeIsEnabled, *_network_errors()) as e:
            self.unreachable = f"could not reach the Hub at {self.constants.ENDPOINT} ({type(e).__name__})"
            return None
        files = [s.rfilename for s in info.siblings or []]
        if info.sha:  # what the offline runs decide by
            own = self.storage / OWN / info.sha
            try:
                own.mkdir(parents=True, exist_ok=True)
                convert.checkpoint.write_atomic(own / "files.json", json.dumps(sorted(files)).encode())
            except OSError:
                pass  # a read-only cache: offline runs fall back to the cached snapshot's files
        return files, info.sha

    def list_cached(self):
        """(files, commit) from the cache: the listing the last online run saved, else the snapshot's files."""
        rev = self.revision or "main"
        if re.fullmatch(r"[0-9a-f]{40}", rev):
            commit = rev
        else:
            ref = self.storage / "refs" / rev
            if not ref.is_file():
                return None
            commit = ref.read_text().strip()
        saved = self.storage / OWN / commit / "files.json"
        try:
            return json.loads(saved.read_text()), commit
        except (OSError, ValueError):
            pass
        snapshot = self.storage / "snapshots" / commit
        if not snapshot.is_dir():
            return None
        return [p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if not p.is_dir()], commit

    # ---- downloads

    def download(self, path: str) -> Path:
        """One file of the repository, from the cache or the Hub (huggingface_hub's progress bar)."""
        if path in self.downloaded:
            return self.downloaded[path]
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
        try:
            with self.repository_errors():
                local = Path(hf_hub_download(self.repo_id, path, revision=self.revision, cache_dir=self.cache_dir,
                                             local_files_only=self.offline, token=self.token,
                                             library_name="flax-vae"))
        except LocalEntryNotFoundError as e:
            if not self.offline and self.unreachable is None:
                self.unreachable = f"could not download {path} ({' '.join(str(e).split())[:120]})"
            raise self.not_cached(path) from None
        except EntryNotFoundError:
            raise CheckpointError(f"{self.where}: {path} is listed but could not be downloaded (not found): "
                                  "try again") from None
        self.downloaded[path] = local
        return local

    def read_config(self, path):
        try:
            return json.loads(self.download(path).read_text())
        except ValueError as e:
            if isinstance(e, CheckpointError):
                raise
            return None  # not JSON: not a config this loader reads

    def view(self, commit, folder, files: dict) -> Path:
        """A folder holding exactly `files` ({name: path in the repository}) as links into the snapshot, named
        after the repository (the variant name's hint)."""
        local = {name: self.download(path) for name, path in files.items()}
        snapshot = next(iter(local.values()))
        commit = snapshot.parents[len(next(iter(files.values())).split("/")) - 1].name or commit
        target = (self.storage / OWN / commit / "views" / (folder.replace("/", "--") or "_") / (self.variant or "_")
                  / self.repo_id.split("/")[1])
        try:
            target.mkdir(parents=True, exist_ok=True)
            for entry in target.iterdir():
                if entry.name not in local:
                    entry.unlink()
            for name, path in local.items():
                _link(path, target / name)
        except OSError:  # a read-only cache: the snapshot's folder, where no other weights or config sit there
            snapshot_folder = snapshot.parent
            others = [p.name for p in snapshot_folder.iterdir() if p.name not in local
                      and (p.name == "config.json" or p.name.endswith(WEIGHTS_SUFFIXES))]
            if len({p.parent for p in local.values()}) == 1 and not others:
                return snapshot_folder
            raise
        return target

    # ---- errors

    def not_found(self) -> CheckpointError:
        return CheckpointError(f"{self.source}: no such local file or folder, and {self.repo_id} was not found on "
                               "the Hub (check the id; private repos need token= or `hf auth login`)")

    def bad_revision(self) -> CheckpointError:
        return CheckpointError(f"{self.repo_id}: revision {self.revision!r} not found on the Hub (give a branch, tag "
                               "or commit hash of the repository)")

    def gated(self, e) -> CheckpointError:
        url = f"{self.constants.ENDPOINT}/{self.repo_id}"
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status == 403:
            return CheckpointError(f"{self.repo_id}: a gated repository your token has no access to: request "
                                   f"access at {url} with that account")
        return CheckpointError(f"{self.repo_id}: a gated repository: request access at {url}, then log in "
                               "(`hf auth login`, or HF_TOKEN) or pass token=")

    def not_cached(self, path=None) -> CheckpointError:
        what = f"{self.where}" + (f" ({path})" if path else "")
        if self.offline:
            why = "local_files_only=True" if self.local_files_only else "HF_HUB_OFFLINE=1"
            return CheckpointError(f"{what}: not in the local cache ({self.cache}) and {why}: run once online "
                                   "to download it")
        return CheckpointError(f"{what}: not in the local cache ({self.cache}) and {self.unreachable}: check the "
                               "connection (or HF_ENDPOINT) and run again")


def _link(source: Path, link: Path):
    """`link` -> `source` (a relative symlink; a hard link or a copy where symlinks are not allowed)."""
    relative = os.path.relpath(source, link.parent)
    if link.is_symlink() and os.readlink(link) == relative and link.exists():
        return
    tmp = link.with_name(f".{link.name}.{os.getpid()}.tmp")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    try:
        os.symlink(relative, tmp)
    except (OSError, NotImplementedError):
        try:
            os.link(os.path.realpath(source), tmp)
        except OSError:
            shutil.copyfile(source, tmp)
    os.replace(tmp, link)
