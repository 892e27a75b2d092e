import pytest
import torch

from interleaf.config import CrossAttentionConfig, ResamplerConfig
from interleaf.model.layers import attention
from interleaf.model.resampler import PerceiverResampler
from interleaf.model.xattn import GatedCrossAttentionBlock

DIM, MEDIA_DIM = 16, 12


def block(**kw):
    torch.manual_seed(0)
    return GatedCrossAttentionBlock(DIM, MEDIA_DIM, CrossAttentionConfig(heads=2, head_dim=4, **kw))


def media_and_mask():
    media = torch.randn(2, 3, 5, MEDIA_DIM)  # B=2, N=3 images, 5 latents each
    visible = torch.zeros(2, 4, 3, dtype=torch.bool)
    visible[0, 1:, 0] = True  # sample 0: tokens 1.. see image 0; token 0 sees nothing
    visible[1, 2:, 2] = True
    return media, visible


@pytest.mark.parametrize("gate", ["scalar", "vector"])
def test_fresh_block_is_identity(gate):
    b = block(gate=gate)
    media, visible = media_and_mask()
    x = torch.randn(2, 4, DIM)
    assert torch.equal(b(x, b.project_media(media), visible), x)
    assert b.attn_gate.shape == ((1,) if gate == "scalar" else (DIM,))


@pytest.mark.parametrize("qk_norm", [None, "layernorm", "rmsnorm"])
@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
def test_tokens_without_image_get_exactly_zero_attention(qk_norm, norm):
    b = block(qk_norm=qk_norm, norm=norm, gated_ff=norm == "rmsnorm", activation="silu")
    with torch.no_grad():
        b.attn_gate.fill_(2.0)  # the attention branch matters; the feed-forward does not
    media, visible = media_and_mask()
    x = torch.randn(2, 4, DIM)
    y = b(x, b.project_media(media), visible)
    assert torch.isfinite(y).all()
    has = visible.any(-1)
    assert torch.equal(y[~has], x[~has])
    assert (y[has] - x[has]).abs().amax(-1).min() > 1e-4


def test_attention_respects_visibility():
    b = block()
    with torch.no_grad():
        b.attn_gate.fill_(1.0)
    media, visible = media_and_mask()
    x = torch.randn(2, 4, DIM)
    kv = b.project_media(media)
    y = b(x, kv, visible)
    other = media.clone()
    other[0, 1:] = torch.randn_like(other[0, 1:])  # images sample 0 never sees
    other[1, :2] = torch.randn_like(other[1, :2])
    assert torch.equal(b(x, b.project_media(other), visible), y)


@pytest.mark.parametrize("qk_norm", [None, "rmsnorm"])
def test_decoding_step_reads_only_the_visible_image(qk_norm):
    """One new token per sample (a decoding step), media_attention="last": the block gathers the
    one image a token sees instead of masking the batch's others; the same values as the masked
    attention (summed over fewer exact zeros: float32 rounding, ~1e-7 at these sizes), and a token
    that sees no image gets none."""
    b = block(qk_norm=qk_norm)
    with torch.no_grad():
        b.attn_gate.fill_(1.5)
    torch.manual_seed(1)
    media = torch.randn(3, 4, 5, MEDIA_DIM)  # 3 samples, 4 images of 5 latents
    visible = torch.zeros(3, 1, 4, dtype=torch.bool)
    visible[0, 0, 2] = visible[1, 0, 0] = True  # sample 2 sees nothing
    x = torch.randn(3, 1, DIM)
    kv = b.project_media(media)
    fast = b(x, kv, visible)
    b.one_image = False  # the masked attention over all 4 images
    masked = b(x, kv, visible)
    torch.testing.assert_close(fast, masked, rtol=1e-6, atol=1e-6)
    assert torch.equal(fast[2], masked[2])  # no image: the attention adds exactly zero on both paths
    b.one_image = True
    other = media.clone()
    other[0, [0, 1, 3]] = torch.randn(3, 5, MEDIA_DIM)  # images no token reads
    other[1, 1:] = torch.randn(3, 5, MEDIA_DIM)
    other[2] = torch.randn(4, 5, MEDIA_DIM)
    assert torch.equal(b(x, b.project_media(other), visible), fast)


def test_text_only_batch_applies_only_feed_forward():
    b = block()
    with torch.no_grad():
        b.ff_gate.fill_(1.0)
    x = torch.randn(2, 4, DIM)
    assert torch.allclose(b(x, None, None), x + torch.tanh(torch.tensor(1.0)) * b.ff(x))


def resampler(**kw):
    torch.manual_seed(0)
    cfg = ResamplerConfig(depth=2, num_latents=3, heads=2, head_dim=4, **kw)
    return PerceiverResampler(MEDIA_DIM, cfg)


@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("activation", ["gelu", "relu"])
def test_resampler_shape_and_independence_of_images(qk_norm, activation):
    r = resampler(qk_norm=qk_norm, activation=activation, max_media=4)
    x = torch.randn(3, 1, 7, MEDIA_DIM)  # 3 images, 1 frame, 7 patches
    out = r(x, torch.tensor([0, 1, 0]))
    assert out.shape == (3, 3, MEDIA_DIM)
    x2 = x.clone()
    x2[1] = torch.randn_like(x2[1])
    out2 = r(x2, torch.tensor([0, 1, 0]))
    assert torch.equal(out2[0], out[0]) and torch.equal(out2[2], out[2])
    assert not torch.allclose(out2[1], out[1])


def test_resampler_media_position_and_frames_embeddings():
    r = resampler(max_media=2, max_frames=3)
    x = torch.randn(1, 3, 7, MEDIA_DIM)
    a, b = r(x, torch.tensor([0])), r(x, torch.tensor([1]))
    assert not torch.allclose(a, b)  # the position in the sample matters
    assert not torch.allclose(r(x.flip(1), torch.tensor([0])), a)  # so does the frame order
    with pytest.raises(ValueError, match="embeddings for 3 frames, got 4"):
        r(torch.randn(1, 4, 7, MEDIA_DIM))
    with pytest.raises(ValueError, match="2 images in a sample, got 3"):
        r(x, torch.tensor([2]))


def test_resampler_latents_attend_to_features():
    r = resampler()
    x = torch.randn(1, 1, 7, MEDIA_DIM)
    assert not torch.allclose(r(x), r(torch.randn_like(x)))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_training_attention_on_cpu_is_sdpa_in_matmuls(dtype):
    torch.manual_seed(0)
    q = torch.randn(2, 3, 5, 8)
    mask = torch.rand(2, 1, 5, 7) > 0.3
    mask[..., 0] = True  # no row fully masked (the blocks open such rows themselves)
    k, v = torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 8)
    reference = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # float32
    low = [t.to(dtype).requires_grad_() for t in (q, k, v)]
    out = attention(*low, mask)
    # the inputs rounded to 8 (bf16) or 11 (fp16) significant bits: relative errors of 2^-8 / 2^-11
    # per operand, a few of them summed over 8-long dot products
    tol = 3e-2 if dtype == torch.bfloat16 else 4e-3
    torch.testing.assert_close(out.float(), reference, rtol=tol, atol=tol)
    out.float().square().sum().backward()
    assert all(t.grad is not None and t.grad.isfinite().all() for t in low)
    with torch.no_grad():  # inference keeps torch's fused kernel
        torch.testing.assert_close(attention(*low, mask).float(), reference, rtol=tol, atol=tol)
    # float32 is torch's SDPA itself: the same computation, to the bit
    assert torch.equal(attention(q, k, v, mask), reference)
