"""timm's ``Eva`` as a reference for interleaf's EVA-CLIP tower (shared by the EVA and InfiMM tests).

timm imports torchvision, and a registry torchvision does not load beside the CPU torch of
these tests; timm is installed without dependencies and, for the duration of its import only,
a stand-in answers for torchvision (the EVA model code never calls it). The stand-in is
removed before any test runs, so nothing else sees a torchvision.
"""

import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
from unittest import mock

import pytest
import torch

from interleaf.model.eva import EVA_PREFIXES, EvaVisionModel


class _TorchvisionStandIn(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path, target=None):
        if name == "torchvision" or name.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        module = types.ModuleType(spec.name)
        module.__path__, module.__file__ = [], "<torchvision stand-in>"
        module.__getattr__ = lambda attr: _missing(attr)
        return module

    def exec_module(self, module):
        pass


def _missing(attr):
    if attr.startswith("__"):
        raise AttributeError(attr)
    return mock.MagicMock(name=f"torchvision stand-in: {attr}")


def _import_timm_eva():
    if "timm" not in sys.modules and importlib.util.find_spec("timm") is None:
        return None
    stand_in = _TorchvisionStandIn()
    sys.meta_path.insert(0, stand_in)
    try:
        import timm.models.eva as eva
    finally:
        sys.meta_path.remove(stand_in)
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
    return eva


timm_eva = _import_timm_eva()
needs_timm = pytest.mark.skipif(timm_eva is None, reason="timm is not installed (make test installs it)")


def eva_clip_names(tower: EvaVisionModel) -> dict:
    """The tower's weights under EVA-CLIP's own names (what InfiMM's checkpoints hold)."""
    out = {}
    for key, value in tower.state_dict().items():
        for old, new in EVA_PREFIXES:
            if key.startswith(new):
                key = old + key[len(new) :]
                break
        out[key] = value
    # buffers and a head EVA-CLIP saves, which a tower ignores: the shared rotary tables (once
    # at the top, again under every block's attention) and the CLIP projection
    for name in ["rope", *(f"blocks.{i}.attn.rope" for i in range(tower.config.layers))]:
        out[f"{name}.freqs_cos"] = out[f"{name}.freqs_sin"] = torch.zeros(1)
    out["head.weight"] = torch.zeros(1)
    return out


def reference(tower: EvaVisionModel):
    c = tower.config
    ref = timm_eva.Eva(
        img_size=tuple(g * c.patch_size for g in c.grid_size),
        patch_size=c.patch_size,
        embed_dim=c.width,
        depth=c.layers,
        num_heads=c.heads,
        mlp_ratio=c.mlp_ratio,
        qkv_bias=c.qkv_bias,
        qkv_fused=not c.subln,
        swiglu_mlp=c.swiglu,
        scale_mlp=c.subln,
        scale_attn_inner=c.subln,
        use_rot_pos_emb=c.rope,
        ref_feat_shape=(c.pt_hw_seq_len,) * 2 if c.intp_freq else None,
        init_values=c.layer_scale,
        num_classes=0,
        global_pool="token",
    ).eval()
    state = {k: v for k, v in eva_clip_names(tower).items() if "rope." not in k and not k.startswith("head.")}
    missing, unexpected = ref.load_state_dict(timm_eva.checkpoint_filter_fn(state, ref), strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    return ref
