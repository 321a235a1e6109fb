"""GLIDE: the text-conditional ADM U-Net (Nichol et al. 2021, §4.1 and Appendix B).

Read top to bottom: config → timestep embedding → text transformer → U-Net parts
(ResBlock, AttentionBlock) → GlideUNet. Parameter names follow the released
checkpoints (`base.pt`, `upsample.pt`, `base_inpaint.pt`, `upsample_inpaint.pt`)
so that they load with `load_state_dict(strict=True)`.

The model returns the raw output: 3 eps channels then 3 variance-interpolation
channels (learned-range variance of Improved DDPM). No loss or sampling here.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F


# -----------------------------------------------------------------------------
# Config


@dataclass
class GlideConfig:
    # Field names are the released code's option names, so a user's option dict maps 1:1.
    image_size: int = 64
    num_channels: int = 192
    num_res_blocks: int = 3
    channel_mult: str = ""  # "" = the released default for image_size
    num_heads: int = 1
    num_head_channels: int = 64  # overrides num_heads when != -1
    num_heads_upsample: int = -1  # -1 = num_heads
    attention_resolutions: str = "32,16,8"  # resolutions (pixels) that get attention
    dropout: float = 0.1
    text_ctx: int = 128
    xf_width: int = 512
    xf_layers: int = 16
    xf_heads: int = 8
    xf_final_ln: bool = True
    xf_padding: bool = True
    use_scale_shift_norm: bool = True
    resblock_updown: bool = True
    inpaint: bool = False
    super_res: bool = False
    n_vocab: int = 50257  # GPT-2 BPE; the shapes models use their own small vocabulary
    # Not in the released GLIDE (off for its weights): every attention block adds fixed 2-D sine/cosine
    # features of each pixel's position, through a zero-initialised projection, to its normalised input,
    # so a pixel's query can match the text's position words without inferring where it is from the
    # convolutions' padding. Why tried: the base ignored those words (a dense caption with every object's
    # cell wrong raised its error by under 1%, a wrong colour by up to 38%); a 22-minute CPU fine-tune with
    # it did not change that (docs/models.md, session 18), so it is unproven. Zero-initialised, switching it
    # on keeps a trained model's output, so it can be fine-tuned in.
    attention_pos_emb: bool = False
    # Not in the released GLIDE (0 for its weights): the caption's mean token feature, through a linear
    # map, gives a `text_layout`-channel map at the middle block's resolution, added to its input through
    # a zero-initialised 1x1 conv. Why: position projections in attention reach a pixel only once both a
    # query and a key look for positions (second order: from zero, or from a random start, they did not
    # move; docs/models.md, session 20); a linear map from words to places is trained by the loss from
    # the first step. The mean of the caption's token features names a lone object's cell to a linear
    # probe in 96% of cases (the last slot, GLIDE's pooled input, in 46%). Zero-initialised like the
    # position projections, so a trained model grows it and keeps its output.
    text_layout: int = 0

    def __post_init__(self):
        # A config comes from a user's file or option: name a wrong field here, not deep inside torch.
        for f in fields(self):
            value, kind = getattr(self, f.name), type(f.default)
            ok = (isinstance(value, kind) and (kind is not int or not isinstance(value, bool))) or \
                (kind is float and isinstance(value, int) and not isinstance(value, bool))
            if not ok:
                raise ValueError(f"{f.name} must be {kind.__name__}, got {value!r}")
        for name in ("image_size", "num_channels", "num_res_blocks", "text_ctx", "n_vocab", "xf_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.text_layout < 0:
            raise ValueError(f"text_layout must be 0 (off) or a number of channels, got {self.text_layout}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        try:
            mult, _ = self.channel_multipliers, self.attention_downsample_factors
        except ValueError as e:
            raise ValueError(f"channel_mult {self.channel_mult!r} or attention_resolutions "
                             f"{self.attention_resolutions!r} is not a list of integers such as '1,2,3,4' "
                             f"({e})") from None
        if not mult or min(mult) < 1 or self.image_size % 2 ** (len(mult) - 1):
            raise ValueError(f"channel_mult {mult} does not fit image_size {self.image_size} (each level halves it)")

    @classmethod
    def preset(cls, name: str) -> "GlideConfig":
        """The released GLIDE (filtered) models: base, upsample, base-inpaint, upsample-inpaint."""
        upsample = dict(image_size=256, num_res_blocks=2, super_res=True)
        presets = {
            "base": {},
            "upsample": upsample,
            "base-inpaint": dict(inpaint=True),
            "upsample-inpaint": dict(upsample, inpaint=True),
        }
        if name not in presets:
            raise ValueError(f"unknown GLIDE preset {name!r}; choose one of {sorted(presets)}")
        return cls(**presets[name])

    @classmethod
    def from_dict(cls, d: dict) -> "GlideConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown GlideConfig fields {unknown}; known: {sorted(known)}")
        d = dict(d)
        if isinstance(d.get("channel_mult"), (list, tuple)):
            d["channel_mult"] = ",".join(str(m) for m in d["channel_mult"])
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def in_channels(self) -> int:
        # x (3) [+ masked image (3) + mask (1)] [+ upsampled low-res (3)]
        return 3 + 4 * self.inpaint + 3 * self.super_res

    @property
    def channel_multipliers(self) -> tuple[int, ...]:
        if self.channel_mult:
            mult = tuple(int(m) for m in str(self.channel_mult).split(","))
        else:
            defaults = {256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4), 64: (1, 2, 3, 4)}
            if self.image_size not in defaults:
                raise ValueError(f"no default channel_mult for image_size {self.image_size}; set channel_mult")
            mult = defaults[self.image_size]
        return mult

    @property
    def attention_downsample_factors(self) -> set[int]:
        return {self.image_size // int(r) for r in str(self.attention_resolutions).split(",") if r}


# -----------------------------------------------------------------------------
# Small parts


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, [cos | sin] order as released."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class GroupNorm32(nn.GroupNorm):
    """GroupNorm over 32 groups computed in float32, with an optional fused SiLU (as released)."""

    def __init__(self, channels: int, swish: bool):
        super().__init__(32, channels, eps=1e-5)
        self.swish = swish

    def forward(self, x):
        # weight and bias in fp32 too: a model cast to half precision as a whole still normalises in fp32
        y = F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(), self.eps)
        if self.swish:
            y = F.silu(y)
        return y.to(x.dtype)


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 (half-precision safe)."""

    def forward(self, x):
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(),
                            self.eps).to(x.dtype)


def zero_module(module: nn.Module) -> nn.Module:
    # Output projections start at zero so each residual block starts as the identity.
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


# -----------------------------------------------------------------------------
# Text transformer (GPT-like, pre-LN, no attention mask: padding gets its own embedding)


class TextAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.c_qkv = nn.Linear(width, 3 * width)
        self.c_proj = nn.Linear(width, width)

    def forward(self, x):
        B, T, W = x.shape
        # per head the fused projection holds [q | k | v], (B, T, H, 3*hs)
        qkv = self.c_qkv(x).view(B, T, self.heads, -1)
        q, k, v = qkv.transpose(1, 2).chunk(3, dim=-1)  # (B, H, T, hs)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, W))


class TextMLP(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.c_fc = nn.Linear(width, 4 * width)
        self.c_proj = nn.Linear(4 * width, width)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x)))


class TextBlock(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.attn = TextAttention(width, heads)
        self.ln_1 = LayerNorm(width)
        self.mlp = TextMLP(width)
        self.ln_2 = LayerNorm(width)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class TextTransformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int):
        super().__init__()
        self.resblocks = nn.ModuleList([TextBlock(width, heads) for _ in range(layers)])

    def forward(self, x):
        for block in self.resblocks:
            x = block(x)
        return x


# -----------------------------------------------------------------------------
# U-Net parts


class ResBlock(nn.Module):
    """ADM residual block: time embedding by scale-shift norm, optional up/down-sampling inside."""

    def __init__(self, channels, emb_channels, dropout, out_channels=None, use_scale_shift_norm=True,
                 up=False, down=False):
        super().__init__()
        out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.up, self.down = up, down
        # Index 1 is an Identity so parameter names match the released layout (SiLU is fused in the norm).
        self.in_layers = nn.Sequential(
            GroupNorm32(channels, swish=True), nn.Identity(), nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels))
        self.out_layers = nn.Sequential(
            GroupNorm32(out_channels, swish=not use_scale_shift_norm),
            nn.SiLU() if use_scale_shift_norm else nn.Identity(),
            nn.Dropout(dropout),
            zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1)))
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def resample(self, x):
        if self.up:
            return F.interpolate(x, scale_factor=2, mode="nearest")
        if self.down:
            return F.avg_pool2d(x, 2)
        return x

    def forward(self, x, emb):
        h = self.in_layers[:-1](x)
        h, x = self.resample(h), self.resample(x)  # resample after norm+SiLU, before the conv
        h = self.in_layers[-1](h)
        emb_out = self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


POSITION_FREQUENCIES = 8  # per axis: sin and cos of pi * 2^k * coordinate, k = 0..7 (4 * 8 = 32 features)


@functools.lru_cache(maxsize=32)  # a few grid sizes per model; forward asks for them at every sampling step
def position_features(height: int, width: int, device=None) -> torch.Tensor:
    """(4 * POSITION_FREQUENCIES, height * width) sine/cosine features of pixel centres in [0, 1]."""
    with torch.inference_mode(False):  # cached: a first call while sampling must not make training's copy unusable
        ys = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) / height
        xs = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) / width
        y, x = torch.meshgrid(ys, xs, indexing="ij")
        freqs = math.pi * 2.0 ** torch.arange(POSITION_FREQUENCIES, device=device, dtype=torch.float32)
        angles = torch.cat([y.reshape(1, -1) * freqs[:, None], x.reshape(1, -1) * freqs[:, None]])
        return torch.cat([angles.sin(), angles.cos()])


class AttentionBlock(nn.Module):
    """Self-attention over pixels; the text tokens' keys/values are prepended to the pixels' (GLIDE §4.1).
    With `pos_emb`, the pixels' queries, keys and values also see where each pixel is (GlideConfig)."""

    # Training with a grounding loss (TrainConfig.grounding_weight) sets this to read where each token is
    # attended: text_attention, (B, tokens, H, W), the text part of the attention weights, heads averaged.
    keep_text_attention = False

    def __init__(self, channels, num_heads, num_head_channels, encoder_channels, pos_emb=False):
        super().__init__()
        self.text_attention = None
        self.heads = channels // num_head_channels if num_head_channels != -1 else num_heads
        assert channels % self.heads == 0, f"{channels} channels do not split into {self.heads} heads"
        self.norm = GroupNorm32(channels, swish=False)
        self.pos_proj = zero_module(nn.Conv1d(4 * POSITION_FREQUENCIES, channels, 1)) if pos_emb else None
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.encoder_kv = nn.Conv1d(encoder_channels, 2 * channels, 1)
        self.proj_out = zero_module(nn.Conv1d(channels, channels, 1))

    def forward(self, x, encoder_out):
        B, C, H, W = x.shape
        heads = self.heads
        h = self.norm(x).reshape(B, C, H * W)
        if self.pos_proj is not None:
            h = h + self.pos_proj(position_features(H, W, x.device).to(h.dtype))[None]
        qkv = self.qkv(h)  # (B, 3C, T), per head [q|k|v]
        q, k, v = qkv.reshape(B, heads, 3 * C // heads, H * W).transpose(2, 3).chunk(3, dim=-1)  # (B, nh, T, hs)
        ekv = self.encoder_kv(encoder_out)  # (B, 2C, S), per head [k|v]
        ek, ev = ekv.reshape(B, heads, 2 * C // heads, -1).transpose(2, 3).chunk(2, dim=-1)  # (B, nh, S, hs)
        k, v = torch.cat([ek, k], dim=2), torch.cat([ev, v], dim=2)
        if self.keep_text_attention:
            weights = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(-1)  # (B, nh, T, S + T)
            self.text_attention = weights[..., :ek.shape[2]].mean(1).transpose(1, 2).reshape(B, -1, H, W)
            h = weights @ v
        else:
            # SDPA's fused CPU kernel needs unit stride in the last dim (else it falls back to the slow math path)
            h = F.scaled_dot_product_attention(q.contiguous(), k, v)  # (B, nh, T, hs)
        h = self.proj_out(h.transpose(2, 3).reshape(B, C, H * W))
        return x + h.reshape(B, C, H, W)


class Block(nn.ModuleList):
    """A U-Net stage: a sequence of ResBlocks / AttentionBlocks / a plain conv."""

    def forward(self, h, emb, encoder_out):
        for layer in self:
            if isinstance(layer, ResBlock):
                h = layer(h, emb)
            elif isinstance(layer, AttentionBlock):
                h = layer(h, encoder_out)
            else:
                h = layer(h)
        return h


# -----------------------------------------------------------------------------
# The model


class GlideUNet(nn.Module):
    """Text-conditional U-Net; with `inpaint` and/or `super_res` it is the fine-tuned variants."""

    def __init__(self, config: GlideConfig):
        super().__init__()
        self.config = c = config
        ch = c.num_channels
        emb_dim = 4 * ch
        mult = c.channel_multipliers
        attn_ds = c.attention_downsample_factors
        heads_up = c.num_heads_upsample if c.num_heads_upsample != -1 else c.num_heads

        def res(cin, cout, **kw):
            return ResBlock(cin, emb_dim, c.dropout, cout, c.use_scale_shift_norm, **kw)

        def attn(channels, heads):
            return AttentionBlock(channels, heads, c.num_head_channels, c.xf_width, c.attention_pos_emb)

        # text encoder
        self.token_embedding = nn.Embedding(c.n_vocab, c.xf_width)
        self.positional_embedding = nn.Parameter(torch.empty(c.text_ctx, c.xf_width))
        if c.xf_padding:
            self.padding_embedding = nn.Parameter(torch.empty(c.text_ctx, c.xf_width))
        self.transformer = TextTransformer(c.xf_width, c.xf_layers, c.xf_heads)
        self.final_ln = LayerNorm(c.xf_width) if c.xf_final_ln else None
        self.transformer_proj = nn.Linear(c.xf_width, emb_dim)

        self.time_embed = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

        # encoder half
        width = mult[0] * ch
        self.input_blocks = nn.ModuleList([Block([nn.Conv2d(c.in_channels, width, 3, padding=1)])])
        skip_widths, ds = [width], 1
        for level, m in enumerate(mult):
            for _ in range(c.num_res_blocks):
                layers = [res(width, m * ch)]
                width = m * ch
                if ds in attn_ds:
                    layers.append(attn(width, c.num_heads))
                self.input_blocks.append(Block(layers))
                skip_widths.append(width)
            if level != len(mult) - 1:
                self.input_blocks.append(Block([self._resample(width, emb_dim, down=True)]))
                skip_widths.append(width)
                ds *= 2

        self.middle_block = Block([res(width, width), attn(width, c.num_heads), res(width, width)])
        self.layout_side = c.image_size // 2 ** (len(mult) - 1)  # the middle block's resolution
        if c.text_layout:
            self.layout_from_text = nn.Linear(c.xf_width, c.text_layout * self.layout_side ** 2)
            self.layout_proj = zero_module(nn.Conv2d(c.text_layout, width, 1))

        # decoder half
        self.output_blocks = nn.ModuleList()
        for level, m in reversed(list(enumerate(mult))):
            for i in range(c.num_res_blocks + 1):
                layers = [res(width + skip_widths.pop(), m * ch)]
                width = m * ch
                if ds in attn_ds:
                    layers.append(attn(width, heads_up))
                if level and i == c.num_res_blocks:
                    layers.append(self._resample(width, emb_dim, up=True))
                    ds //= 2
                self.output_blocks.append(Block(layers))

        self.out = nn.Sequential(GroupNorm32(width, swish=True), nn.Identity(),
                                 zero_module(nn.Conv2d(width, 6, 3, padding=1)))
        self._init_text_weights()

    def _resample(self, width, emb_dim, up=False, down=False):
        c = self.config
        if c.resblock_updown:
            return ResBlock(width, emb_dim, c.dropout, width, c.use_scale_shift_norm, up=up, down=down)
        # The released models all use resblock_updown; plain resampling is kept for small configs.
        return nn.Upsample(scale_factor=2, mode="nearest") if up else nn.AvgPool2d(2)

    def _init_text_weights(self):
        # The released code leaves these as torch.empty; give them a GPT-2-like init for training from scratch.
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        if self.config.xf_padding:
            nn.init.normal_(self.padding_embedding, std=0.01)

    @property
    def dtype(self) -> torch.dtype:
        return self.time_embed[0].weight.dtype

    @property
    def device(self) -> torch.device:
        return self.time_embed[0].weight.device

    def encode_text(self, tokens: torch.Tensor, mask: torch.Tensor):
        """tokens, mask: (B, text_ctx) -> per-token features (B, xf_width, text_ctx), pooled (B, 4*ch),
        layout map (B, text_layout, side, side) or None without text_layout."""
        c = self.config
        if tokens.shape[-1] != c.text_ctx:
            raise ValueError(f"tokens have length {tokens.shape[-1]}, but this model's text_ctx is {c.text_ctx}; "
                             "pad or truncate with the model's tokenizer")
        xf_in = self.token_embedding(tokens.long()) + self.positional_embedding[None]
        if c.xf_padding:
            # padded slots get only the padding embedding, no positional term
            xf_in = torch.where(mask.bool()[..., None], xf_in, self.padding_embedding[None])
        xf_out = self.transformer(xf_in.to(self.dtype))
        if self.final_ln is not None:
            xf_out = self.final_ln(xf_out)
        pooled = self.transformer_proj(xf_out[:, -1])  # the last slot, as released (usually a padding slot)
        layout = None
        if c.text_layout:
            # an empty caption has no tokens: its mean is zero, so its map is the learnt bias alone
            words = mask.to(xf_out.dtype)[..., None]
            mean = (xf_out * words).sum(1) / words.sum(1).clamp(min=1)
            layout = self.layout_from_text(mean).reshape(-1, c.text_layout, self.layout_side, self.layout_side)
        return xf_out.transpose(1, 2), pooled, layout

    def forward(self, x, timesteps, tokens=None, mask=None, low_res=None, inpaint_image=None, inpaint_mask=None,
                text=None):
        """x: (B, 3, S, S) noisy image; timesteps: (B,) original indices -> (B, 6, S, S) raw output.

        text: `encode_text(tokens, mask)`, when the caller encodes the prompt once for all sampling
          steps (it does not change between them; 5% of a base forward on the CPU); else tokens/mask.
        """
        c = self.config
        if x.shape[-2:] != (c.image_size, c.image_size):
            raise ValueError(f"image is {tuple(x.shape[-2:])} but this model works at "
                             f"{c.image_size}x{c.image_size}; resize or crop to that size first")
        inputs = [x]
        if c.inpaint:
            # missing inpainting inputs mean "nothing known": the model generates freely
            if inpaint_image is None:
                inpaint_image = torch.zeros_like(x)
            if inpaint_mask is None:
                inpaint_mask = torch.zeros_like(x[:, :1])
            inputs += [inpaint_image * inpaint_mask, inpaint_mask]
        if c.super_res:
            if low_res is None:
                raise ValueError("the upsampler needs low_res, the low-resolution image in [-1, 1]")
            inputs.append(F.interpolate(low_res, x.shape[-2:], mode="bilinear", align_corners=False))
        h = torch.cat(inputs, dim=1).to(self.dtype)

        encoder_out, pooled, layout = text if text is not None else self.encode_text(tokens, mask)
        emb = self.time_embed(timestep_embedding(timesteps, c.num_channels).to(self.dtype)) + pooled

        skips = []
        for block in self.input_blocks:
            h = block(h, emb, encoder_out)
            skips.append(h)
        if layout is not None:
            h = h + self.layout_proj(layout)
        h = self.middle_block(h, emb, encoder_out)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, encoder_out)
        return self.out(h).contiguous()  # NCHW even when the weights are channels_last (checkpoints.use_fast_layout)
