"""Optional dependencies: imported where a feature uses them, with one line naming the extra
that installs them (``pip install 'interleaf[EXTRA]'``) when they are missing."""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

EXTRAS = {
    "train": "LoRA adapters (peft) and TensorBoard logging",
    "eval": "ROC AUC (scikit-learn) and pycocoevalcap's Java PTB tokenizer for CIDEr",
    "okvqa": "OK-VQA answer stemming (nltk, inflection)",
    "deepspeed": "DeepSpeed ZeRO training (train.parallel: deepspeed)",
    "prep": "images downloaded by URL for MMC4/OBELICS (img2dataset)",
    "serve": "the OpenAI-compatible server and its chat page (FastAPI, uvicorn, httpx)",
    "imagegen": "image generation (diffusers' UNet, schedulers and AutoencoderKL)",
    "fid": "FID of generated images with Inception weights (torchmetrics, torch-fidelity)",
}


class MissingExtra(ImportError):
    """An optional package a feature needs is not installed; the message says how to install it."""


def missing_message(package: str, feature: str, extra: str) -> str:
    return f"{feature} needs the {package} package: pip install 'interleaf[{extra}]'"


def optional_import(module: str, feature: str, extra: str) -> ModuleType:
    """``importlib.import_module(module)``, or :class:`MissingExtra` naming ``feature`` and ``extra``."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtra(missing_message(module.split(".")[0], feature, extra)) from None


def require(module: str, feature: str, extra: str) -> None:
    """Fail now, before any work, if ``module`` is not installed."""
    if importlib.util.find_spec(module) is None:
        raise MissingExtra(missing_message(module, feature, extra))
