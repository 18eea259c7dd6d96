"""Where a base model comes from: a hub id, a local Hugging Face directory, or a GGUF file.

A GGUF file (a path, or ``package/file.gguf`` inside an installed Python package) is converted
once into a Hugging Face directory (bf16 safetensors, tokenizer and chat template) cached under
a key made of the file's SHA-256, so the trainer, the offline evaluation and the embedded
student server all load the same weights with plain ``from_pretrained``. The *name* of the
base model stays what the user wrote: it is what adapters record as
``base_model_name_or_path`` and what the student server serves.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("distillgate.trainer")

CACHE_ENV = "DISTILLGATE_MODEL_CACHE"
"""Environment variable naming the directory converted base models are cached in."""
_MARKER = "distillgate_source.json"
_HASH_CHUNK = 4 * 1024 * 1024


class BaseModelError(ValueError):
    """The base model named by the policy or the command line cannot be found or read."""


@dataclass(frozen=True)
class BaseModel:
    """A base model ready for ``from_pretrained``."""

    name: str
    """What the user wrote (hub id, directory or GGUF path): recorded in adapters, served by name."""
    path: str
    """What ``from_pretrained`` loads: a local directory, or the hub id itself."""
    source: str | None = None
    """The GGUF file this directory was converted from, if any."""


Progress = Callable[[str], None]


def default_cache_dir() -> Path:
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "distillgate" / "models"


def resolve_base_model(
    spec: str | Path,
    *,
    cache_dir: str | Path | None = None,
    progress: Progress | None = None,
) -> BaseModel:
    """Turn a policy's ``student.base_model`` into something ``from_pretrained`` loads.

    A directory is used as it is; a ``.gguf`` file is converted on first use (later calls, in
    any process, reuse the cached directory); anything else is taken as a hub id.
    """
    name = str(spec)
    gguf = find_gguf(name)
    if gguf is not None:
        path = convert_gguf(gguf, cache_dir=cache_dir, progress=progress)
        return BaseModel(name=name, path=str(path), source=str(gguf))
    local = Path(name).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise BaseModelError(f"{name} is a directory without a config.json (not a Hugging Face model)")
        return BaseModel(name=name, path=str(local))
    if name.endswith(".gguf"):
        raise BaseModelError(f"no GGUF file at {name} (nor inside an installed package of that name)")
    return BaseModel(name=name, path=name)


def find_gguf(spec: str) -> Path | None:
    """The GGUF file ``spec`` names: a path, or ``package/sub/file.gguf`` inside an installed package."""
    if not spec.endswith(".gguf"):
        return None
    direct = Path(spec).expanduser()
    if direct.is_file():
        return direct.resolve()
    package, _, inner = spec.partition("/")
    if not inner or not package.isidentifier():
        return None
    try:
        # find_spec locates the package without importing it (its own imports may not be installed).
        found = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    for root in (found.submodule_search_locations or []) if found else []:
        candidate = Path(root) / inner
        if candidate.is_file():
            return candidate.resolve()
    return None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def convert_gguf(
    gguf: Path, *, cache_dir: str | Path | None = None, progress: Progress | None = None
) -> Path:
    """The cached Hugging Face directory for ``gguf``, converting it first if it is not there yet.

    Conversion writes into a temporary directory and renames it into place, under a file lock,
    so concurrent processes convert once and never see half a directory.
    """
    say = progress or (lambda message: log.info("%s", message))
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    digest = file_sha256(gguf)
    target = root / f"{_slug(gguf.stem)}-{digest[:16]}"
    if _complete(target, digest):
        return target
    with _locked(root / f".{target.name}.lock"):
        if _complete(target, digest):
            return target
        say(f"converting {gguf.name} ({gguf.stat().st_size / 1e6:,.0f} MB) once into {target}")
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=root))
        try:
            _write_hf_directory(gguf, staging)
            (staging / _MARKER).write_text(
                json.dumps({"source": str(gguf), "sha256": digest, "dtype": "bfloat16"}, indent=2) + "\n"
            )
            _readable(staging)
            if target.exists():
                shutil.rmtree(target)  # an incomplete directory left by an older version
            staging.rename(target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        say(f"converted {gguf.name} into {target}")
    return target


def _write_hf_directory(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
    except ImportError as exc:  # transformers needs PyPI's ``gguf`` to read the file
        raise BaseModelError(f"reading {gguf.name} needs the `gguf` package: {exc}") from exc
    except (OSError, ValueError, KeyError) as exc:
        raise BaseModelError(f"{gguf} is not a GGUF model transformers can load: {exc}") from exc
    # transformers refuses to save a model it loaded from GGUF (it is marked quantized even once
    # dequantized): copy the weights into a plain model of the same configuration.
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    plain.load_state_dict(model.state_dict())
    plain.generation_config = model.generation_config
    plain.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def _readable(directory: Path) -> None:
    # mkdtemp makes the directory private; the student server may run as another user.
    directory.chmod(0o755)
    for item in directory.iterdir():
        item.chmod(0o644)


def _complete(target: Path, digest: str) -> bool:
    try:
        marker = json.loads((target / _MARKER).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return bool(marker.get("sha256") == digest and (target / "config.json").is_file())


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "-" for c in text)[:64] or "model"
