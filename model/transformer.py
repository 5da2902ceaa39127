"""The decoder-only transformer: embed, L blocks, final norm, logits; optional image and audio
encoders whose outputs replace token embeddings at chosen positions."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from model import rope as rope_lib
from model.audio_encoder import AudioEncoder
from model.config import ModelConfig
from model.layers import Block, Embedder, RMSNorm, normal_param, unembed
from model.vision import VisionEncoder

# flax >= 0.12 wants lists of submodules wrapped so it can see their state; 0.11 takes a plain list.
_ModuleList = getattr(nnx, 'List', list)


class Transformer(nnx.Module):
    """Llama / Qwen2 / Gemma / Gemma 3 style decoder.

    `__call__(tokens, positions, cache)`:
    - without a cache, plain causal attention over the T tokens (positions only feed RoPE);
    - with a cache, row b's new K/V go to cache index positions[b, t] and the query at position p
      attends cache indices s <= p (see model/kv_cache.py for the invariant). The cache object does
      the attention (`cache.attend`): dense, paged or sharded over a mesh, the model is the same.
    Optional keywords, both for speed, neither changes a returned number:
    - `kv_span` (a static int): attend only cache indices < kv_span. Exact whenever every query whose
      output is used has position < kv_span; other rows compute garbage. The engine passes a
      power-of-two bucket covering its longest sequence rather than the whole cache.
    - `logits_at` (i32[B, M]): compute logits only at these indices of the T axis (not absolute
      positions); the result is then [B, M, V] and equals the full logits gathered there.
    Media: `embeds` ([B, T, D]) with `embed_mask` (bool[B, T]) replace the token embedding wherever
    the mask is true (after Gemma's sqrt(D) scale, which media embeddings do not get); the tokens
    there are ignored. `encode_images` / `encode_audio` produce such rows when config.vision /
    config.audio are set (submodules `vision` / `audio`, each a `tower` and a `projector`), and
    `encode_qwen_vision` when config.qwen_vision is (submodule `qwen_vision`, Qwen2.5-VL's tower).
    `spans` (i32[B, T], 0 = text, k = the k-th run of one media item's placeholders): with
    config.bidirectional_media (Gemma 3's images) a token also sees the later tokens of its own
    span, within its layer's window; otherwise spans are ignored. With a cache a span must lie
    wholly inside this call's tokens (a prefill chunk never cuts one).
    M-RoPE (config.mrope_section): `rope_positions` (i32[3, B, T], model/qwen2_5_vl.py's
    mrope_positions) turn queries and keys, while `positions` still index the cache and the masks
    (a token's place in the sequence). Left out, every row is `positions`: plain RoPE.
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.embedder = Embedder(config, rngs=rngs)
        self.layers = _ModuleList([Block(config, config.layer_kind(i), rngs=rngs) for i in range(config.n_layers)])
        self.final_norm = RMSNorm(config.d_model, eps=config.norm_eps, offset=config.norm_offset,
                                  dtype=config.jnp_dtype)
        if config.tie_embeddings:
            self.unembed = None
        else:
            self.unembed = normal_param(rngs, (config.vocab_size, config.d_model), config.d_model**-0.5,
                                        config.jnp_dtype, axes=('vocab', 'embed'))  # [V, D]
        # Encoders last, so a seed gives the decoder the same weights with or without them.
        encoder = dict(dtype=config.jnp_dtype, rngs=rngs)
        self.vision = VisionEncoder(config.vision, config.d_model, **encoder) if config.vision is not None else None
        self.audio = AudioEncoder(config.audio, config.d_model, **encoder) if config.audio is not None else None
        if config.qwen_vision is not None:
            from model.qwen2_5_vl_vision import Qwen25VLVision  # it imports model.checkpoint, which imports us

            self.qwen_vision = Qwen25VLVision(config.qwen_vision, config.jnp_dtype, rngs)
        else:
            self.qwen_vision = None

    def encode_images(self, pixels: jax.Array) -> jax.Array:
        """f32[B, S, S, 3] images (channels last, normalised) -> [B, tokens_per_image, D] in the model dtype."""
        if self.vision is None:
            raise ValueError(f'model {self.config.name!r} has no image encoder (config.vision is None).')
        return self.vision(pixels).astype(self.config.jnp_dtype)

    def encode_audio(self, mel: jax.Array, valid_frames: jax.Array | None = None) -> jax.Array:
        """f32[B, n_mels, window_frames] log-mel windows -> [B, rows_per_window, D] in the model dtype.
        valid_frames (i32[B]): frames of each window holding audio, for config.audio.mask_padding."""
        if self.audio is None:
            raise ValueError(f'model {self.config.name!r} has no audio encoder (config.audio is None).')
        return self.audio(mel, valid_frames).astype(self.config.jnp_dtype)

    def encode_qwen_vision(self, patches: jax.Array, layout) -> jax.Array:
        """Qwen2.5-VL images / videos: processor patches f32[P, C*T*p*p] and their VisionLayout
        (model.qwen2_5_vl_vision.vision_layout) -> [M, D] rows in the model dtype, one per placeholder
        token, in prompt order."""
        if self.qwen_vision is None:
            raise ValueError(f'model {self.config.name!r} has no Qwen2.5-VL vision tower (config.qwen_vision is None).')
        return self.qwen_vision(patches, layout).astype(self.config.jnp_dtype)

    def __call__(
        self,
        tokens: jax.Array,  # i32[B, T]
        positions: jax.Array,  # i32[B, T]
        cache=None,  # KVCache | PagedKVCache | ShardedPagedCache
        *,
        kv_span: int | None = None,
        logits_at: jax.Array | None = None,
        embeds: jax.Array | None = None,  # [B, T, D]
        embed_mask: jax.Array | None = None,  # bool[B, T]
        spans: jax.Array | None = None,  # i32[B, T]
        rope_positions: jax.Array | None = None,  # i32[3, B, T], with config.mrope_section
    ) -> tuple[jax.Array, KVCache | None]:
        cfg = self.config
        # Trace-time constants, one set per distinct RoPE (the model's, and the local one layers with
        # LayerKind.local_rope use; `rope_tables` hands equal frequencies the same tables); at least
        # 64K positions so small test configs never clamp.
        max_positions = max(cfg.max_context, 1 << 16)
        ropes = [rope_lib.rope_tables(cfg.rope_inv_freq(cfg.layer_kind(i)), max_positions)
                 for i in range(cfg.n_layers)]
        if cfg.mrope_section is not None:
            ropes = [rope_lib.MRopeTables(tables, cfg.mrope_section) for tables in ropes]
            if rope_positions is None:
                rope_positions = jnp.broadcast_to(positions, (3, *positions.shape))
            elif tuple(rope_positions.shape) != (3, *positions.shape):
                raise ValueError(f'rope_positions {tuple(rope_positions.shape)} must be [3, B, T] = '
                                 f'{(3, *positions.shape)}.')
        elif rope_positions is not None:
            raise ValueError(f'rope_positions given, but model {cfg.name!r} has no M-RoPE (config.mrope_section).')
        if cache is not None and kv_span is not None and not 0 < kv_span <= cache.span_limit:
            raise ValueError(f'kv_span={kv_span} must be in [1, cache.max_len={cache.span_limit}].')
        x = self.embedder.encode(tokens)  # [B, T, D]
        if (embeds is None) != (embed_mask is None):
            raise ValueError('embeds and embed_mask go together: pass both (media rows) or neither.')
        if embeds is not None:
            if tuple(embeds.shape) != tuple(x.shape) or tuple(embed_mask.shape) != tuple(tokens.shape):
                raise ValueError(f'embeds {tuple(embeds.shape)} and embed_mask {tuple(embed_mask.shape)} must be '
                                 f'[B, T, D] = {tuple(x.shape)} and [B, T] = {tuple(tokens.shape)}.')
            x = jnp.where(embed_mask[:, :, None], embeds.astype(x.dtype), x)
        if spans is not None and tuple(spans.shape) != tuple(tokens.shape):
            raise ValueError(f'spans {tuple(spans.shape)} must be [B, T] = {tuple(tokens.shape)}.')
        spans = spans if cfg.bidirectional_media else None
        for i, block in enumerate(self.layers):
            x, cache = block(x, positions, ropes[i], cache, i, kv_span, spans, rope_positions)
        if logits_at is not None:
            x = jnp.take_along_axis(x, logits_at[:, :, None], axis=1)  # [B, M, D]
        x = self.final_norm(x)
        table = self.embedder.table if self.unembed is None else self.unembed
        logits = unembed(x, table[...], cfg.logit_softcap)  # f32[B, T or M, V]
        return logits, cache
