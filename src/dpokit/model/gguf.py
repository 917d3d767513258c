"""GGUF model files (`--model FILE.gguf`, `--reference-model FILE.gguf`, `dpokit export FILE.gguf`).

transformers reads a GGUF file with the `gguf` package and dequantizes every weight to float32
(dpokit's master-weight dtype; bf16/fp16 runs autocast from it as for any model), so the model
trains, samples and saves as a plain Hugging Face model. The tokenizer and the chat template come
from the same file. Which quantizations can be read: docs/real-models.md, "GGUF files".

A bad file stops the command with one line naming it: not a GGUF file, truncated or damaged, an
architecture transformers does not read from GGUF, or a tensor type nothing can dequantize.
"""

from __future__ import annotations

import io
import re
import struct
import sys
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stderr
from pathlib import Path

import torch

from dpokit.errors import DpokitError, first_line

GGUF_SUFFIX = ".gguf"
GGUF_MAGIC = b"GGUF"  # the first four bytes of every GGUF file (any version)
_BAR = "Converting and de-quantizing GGUF tensors"  # transformers' progress bar while it reads one


def is_gguf(name: str | Path | None) -> bool:
    """Whether a --model / --tokenizer / --reference-model value names a GGUF file."""
    return bool(name) and str(name).lower().endswith(GGUF_SUFFIX)


def check_gguf_file(name: str | Path, what: str = "model") -> Path:
    """The file, after the checks that cost nothing: it exists, is a file, starts with GGUF's magic
    bytes, and the `gguf` package that reads it is installed. (Truncation and unsupported content
    show when transformers reads it: `gguf_errors`.)"""
    path = Path(name).expanduser()
    if not path.exists():
        raise DpokitError(f"{what} file {name} does not exist")
    if not path.is_file():
        raise DpokitError(f"{what} {name} is a folder, not a GGUF file (a model folder's name must not end in .gguf)")
    with path.open("rb") as handle:
        magic = handle.read(len(GGUF_MAGIC))
    if magic != GGUF_MAGIC:
        raise DpokitError(f"{what} file {name} is not a GGUF file (it does not start with the bytes 'GGUF')")
    try:
        import gguf  # noqa: F401  (transformers needs it to read the file)
    except ImportError:
        raise DpokitError(f"{what} file {name}: reading GGUF files needs the gguf package (pip install gguf)") from None
    return path


@contextmanager
def gguf_errors(name: str | Path, what: str = "model") -> Iterator[None]:
    """Turn what transformers and `gguf` raise on a bad file into one line naming the file."""
    try:
        yield
    except NotImplementedError as exc:  # gguf's "Dequantization for Q8_1 is not yet implemented"
        raise DpokitError(f"{what} file {name}: {first_line(exc)} in gguf {_version('gguf')}: re-quantize it "
                          "to a type that can be read (docs/real-models.md, 'GGUF files')") from None
    except ValueError as exc:
        message = first_line(exc)
        if "architecture" in message:  # "GGUF model with architecture mpt is not supported yet."
            raise DpokitError(f"{what} file {name}: {message} (transformers {_version('transformers')} "
                              "reads only some architectures from GGUF; docs/real-models.md, 'GGUF files')") from None
        raise _damaged(name, what, exc) from None
    except (IndexError, KeyError, OSError, EOFError, struct.error) as exc:
        raise _damaged(name, what, exc) from None


def _damaged(name: str | Path, what: str, exc: BaseException) -> DpokitError:
    return DpokitError(f"{what} file {name} is truncated or damaged ({type(exc).__name__}: {first_line(exc)}); "
                       "copy or download it again")


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "(not installed)"


def _source(path: Path) -> tuple[str, dict]:
    """transformers names a GGUF by its folder plus `gguf_file`; an absolute path is read as is."""
    return str(path.parent), {"gguf_file": str(path.resolve())}


def load_gguf_config(name: str | Path):
    """The model's config as transformers builds it from the file's metadata."""
    from transformers import AutoConfig

    folder, kwargs = _source(check_gguf_file(name))
    with gguf_errors(name):
        return AutoConfig.from_pretrained(folder, **kwargs)


def load_gguf_tokenizer(name: str | Path):
    """The tokenizer (and chat template) stored in the file."""
    from transformers import AutoTokenizer

    folder, kwargs = _source(check_gguf_file(name, "tokenizer"))
    with gguf_errors(name, "tokenizer"):
        return AutoTokenizer.from_pretrained(folder, **kwargs)


def load_gguf_model(name: str | Path) -> torch.nn.Module:
    """The model with every weight dequantized to float32: a plain model (no quantizer, no
    quantization record in its config: what transformers 5.24 does with `dequantize=True`, checked
    by tests/test_gguf.py), so it trains and `save_pretrained` writes a normal folder. It also
    keeps transformers from leaving the weights packed, which it does for some architectures when
    the `kernels` package is installed (packed weights do not train)."""
    from transformers import AutoModelForCausalLM, GgufConfig

    folder, kwargs = _source(check_gguf_file(name))
    with gguf_errors(name), _without_progress_bar():
        return AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True), **kwargs)


@contextmanager
def _without_progress_bar() -> Iterator[None]:
    """transformers draws its GGUF progress bar with plain tqdm, which its progress switch (turned
    off by dpokit's CLI, which reports its own progress) does not reach: drop the bar's frames from
    stderr and pass on anything else written there."""
    captured = io.StringIO()
    try:
        with redirect_stderr(captured):
            yield
    finally:
        kept = [line for line in re.split(r"[\r\n]", captured.getvalue()) if line.strip() and not line.startswith(_BAR)]
        if kept:
            print("\n".join(kept), file=sys.stderr)
