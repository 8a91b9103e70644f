"""Offline fixtures: tiny (or real-size) random-weight SD 1.x and SDXL pipelines, tiny SD3, SD3.5 and Flux ones,
and a synthetic fill-style dataset.

Nothing here touches the network. The pipeline folder is written in diffusers layout and loads with
`StableDiffusionPipeline.from_pretrained` (the SDXL sizes with `StableDiffusionXLPipeline`, tiny-sd3 and tiny-sd35
with `StableDiffusion3Pipeline`, tiny-flux with `FluxPipeline`); the dataset mimics fusing/fill50k (a filled circle
of one colour on a background of another, the control image its white outline on black) and is written as an
imagefolder with `metadata.jsonl`, as parquet, and as a `save_to_disk` folder.

    python -m controlnet_training.fixtures pipeline fixtures/tiny-sd
    python -m controlnet_training.fixtures pipeline fixtures/tiny-flux --size tiny-flux
    python -m controlnet_training.fixtures dataset fixtures/fill --rows 64 --resolution 64
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import random
import string
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image, ImageDraw

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline, SD3ControlNetModel, SD3Transformer2DModel
    from transformers import T5TokenizerFast

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 40),
    "cyan": (40, 210, 220),
    "magenta": (210, 40, 200),
    "orange": (245, 140, 20),
    "purple": (120, 40, 170),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "brown": (120, 75, 35),
    "pink": (250, 160, 190),
    "grey": (128, 128, 128),
}

CAPTION_WORDS = [*COLOURS, "circle", "with", "background", "a", "photo", "of", "cat", "the", "on", "and"]


# --------------------------------------------------------------------------------------------- tokenizer
@lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte → printable-unicode table (the byte-level alphabet of its BPE)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes), strict=True))


def small_clip_vocab(words: list[str] = CAPTION_WORDS) -> tuple[dict[str, int], list[str]]:
    """A CLIP-style BPE vocabulary: the byte alphabet (plain and word-final) plus merges learned from `words`,
    so that each of them becomes a single token, as real CLIP words do."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    learner = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    learner.pre_tokenizer = pre_tokenizers.Whitespace()
    learner.train_from_iterator(
        [" ".join(words)], trainers.BpeTrainer(vocab_size=100_000, end_of_word_suffix="</w>", show_progress=False)
    )
    merges = [" ".join(pair) for pair in json.loads(learner.to_str())["model"]["merges"]]
    alphabet = list(_bytes_to_unicode().values())
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}, merges


def real_clip_vocab(bpe_gz: str | Path) -> tuple[dict[str, int], list[str]]:
    """The 49,408-token CLIP vocabulary, from `bpe_simple_vocab_16e6.txt.gz` (shipped by open-clip-torch)."""
    lines = gzip.open(bpe_gz, "rt", encoding="utf-8").read().split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    alphabet = list(_bytes_to_unicode().values())
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(tokens)}, merges


def find_open_clip_vocab() -> Path | None:
    try:
        import open_clip  # noqa: F401 - only used to locate its data file
    except ImportError:
        return None
    path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    return path if path.exists() else None


def make_tokenizer(real_vocab: str | Path | None = None):
    from transformers import CLIPTokenizer

    vocab, merges = real_clip_vocab(real_vocab) if real_vocab else small_clip_vocab()
    return CLIPTokenizer(vocab=vocab, merges=[tuple(m.split()) for m in merges], model_max_length=77)


T5_SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")  # T5's ids 0, 1 and 2


def small_t5_vocab(words: list[str] = CAPTION_WORDS) -> list[tuple[str, float]]:
    """A SentencePiece-style Unigram vocabulary (piece, log-probability): T5's special tokens at ids 0-2, then
    each of `words` as one word-initial piece ("▁red"), then the bare "▁" and single letters and digits, so any
    other word still tokenizes, letter by letter, and not to <unk>."""
    pieces = [(token, 0.0) for token in T5_SPECIAL_TOKENS]
    pieces += [(f"▁{word}", -1.0) for word in dict.fromkeys(words)]
    pieces += [("▁", -2.0)] + [(c, -10.0) for c in string.ascii_letters + string.digits]
    return pieces


def make_t5_tokenizer(model_max_length: int = 512) -> T5TokenizerFast:
    """A T5 tokenizer without sentencepiece: a `tokenizers` Unigram model with T5's own pipeline (whitespace split,
    "▁" word prefix, "</s>" appended), in transformers' `T5TokenizerFast` (no sentinel <extra_id_*> tokens)."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import Unigram
    from transformers import T5TokenizerFast

    backend = Tokenizer(Unigram(small_t5_vocab(), unk_id=T5_SPECIAL_TOKENS.index("<unk>"), byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")]
    )
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    eos = T5_SPECIAL_TOKENS.index("</s>")
    backend.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", eos)]
    )
    return T5TokenizerFast(
        tokenizer_object=backend,
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_ids=0,
        model_max_length=model_max_length,
    )


# --------------------------------------------------------------------------------------------- pipeline
@dataclass(frozen=True)
class PipelineSize:
    unet: dict
    vae: dict
    text: dict


TINY = PipelineSize(
    unet=dict(
        sample_size=8,
        block_out_channels=(32, 64),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
    ),
    vae=dict(
        sample_size=64,
        block_out_channels=(32, 32, 64, 64),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        latent_channels=4,
    ),
    text=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=5, num_attention_heads=4, projection_dim=32),
)

SD15 = PipelineSize(
    unet=dict(
        sample_size=64,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768,
        attention_head_dim=8,
    ),
    vae=dict(
        sample_size=512,
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        latent_channels=4,
    ),
    text=dict(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, projection_dim=768
    ),
)

TINY_XL = PipelineSize(
    unet=dict(
        sample_size=8,
        block_out_channels=(32, 64),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        cross_attention_dim=64,  # 32 (text_encoder) + 32 (text_encoder_2), concatenated
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=80,  # pooled 32 + 6 time ids × 8
    ),
    vae=dict(TINY.vae, scaling_factor=0.13025, force_upcast=True),
    text=TINY.text,
)

SDXL = PipelineSize(
    unet=dict(
        sample_size=128,
        block_out_channels=(320, 640, 1280),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(5, 10, 20),
        use_linear_projection=True,
        cross_attention_dim=2048,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    ),
    vae=dict(SD15.vae, sample_size=1024, scaling_factor=0.13025, force_upcast=True),
    text=SD15.text,
)
SDXL_TEXT_2 = dict(
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=20,
    projection_dim=1280,
    hidden_act="gelu",
)

SIZES = {"tiny": TINY, "sd15": SD15, "tiny-sdxl": TINY_XL, "sdxl": SDXL}


@dataclass(frozen=True)
class TransformerPipelineSize:
    """An SD3 or Flux pipeline: a diffusion transformer, a 16-channel VAE, CLIP text encoders and a T5 encoder."""

    family: str  # "sd3" or "flux"
    transformer: dict
    vae: dict
    text: dict  # CLIP: SD3's text_encoder (with projection), Flux's text_encoder
    text_2: dict | None  # SD3's second CLIP (with projection); None for Flux
    t5: dict
    scheduler: dict


# 4 blocks, as the real ones: a VAE scale factor of 8, so 64 px → 8×8 latents → 4×4 tokens in both families (SD3
# patches 2×2, Flux packs 2×2); both pipelines need image sides divisible by 8 × 2 = 16. No quant_conv, as theirs.
TINY_VAE_16 = dict(TINY.vae, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False)
TINY_T5 = dict(
    d_model=96,  # ≥ SD3's 32 + 48 CLIP widths, which SD3 zero-pads to it (as 768 + 1280 to 4096)
    d_kv=8,
    d_ff=64,
    num_layers=2,
    num_heads=4,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=32,
    feed_forward_proj="gated-gelu",  # T5 v1.1 / XXL, the encoder SD3 and Flux use
    dropout_rate=0.0,
    tie_word_embeddings=False,
)
TINY_SD3 = TransformerPipelineSize(
    family="sd3",
    transformer=dict(
        sample_size=32,
        patch_size=2,
        in_channels=16,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=TINY_T5["d_model"],
        caption_projection_dim=16,  # = inner dim (2 heads × 8)
        pooled_projection_dim=80,  # 32 + 48, both CLIP projections concatenated
        out_channels=16,
        pos_embed_max_size=64,
    ),
    vae=dict(TINY_VAE_16, shift_factor=0.0609, scaling_factor=1.5305),  # SD3's VAE
    text=TINY.text,
    text_2=dict(
        hidden_size=48,
        intermediate_size=64,
        num_hidden_layers=5,
        num_attention_heads=4,
        projection_dim=48,
        hidden_act="gelu",
    ),
    t5=TINY_T5,
    scheduler=dict(num_train_timesteps=1000, shift=3.0),
)
# SD3.5 large differs from SD3 medium in its transformer by RMS-normalised queries and keys; the SD3.5-large
# ControlNets are another layout (no positional embedding of their own): see make_sd35_controlnet.
TINY_SD35 = TransformerPipelineSize(
    **{**TINY_SD3.__dict__, "transformer": dict(TINY_SD3.transformer, qk_norm="rms_norm")}
)
TINY_FLUX = TransformerPipelineSize(
    family="flux",
    transformer=dict(
        patch_size=1,
        in_channels=64,  # 16 latent channels × 2 × 2 packing
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=TINY_T5["d_model"],
        pooled_projection_dim=TINY.text["hidden_size"],  # CLIP's pooled output
        guidance_embeds=True,  # as FLUX.1-dev
        axes_dims_rope=(2, 2, 4),  # sums to attention_head_dim
    ),
    vae=dict(TINY_VAE_16, shift_factor=0.1159, scaling_factor=0.3611),  # Flux's VAE
    text=TINY.text,
    text_2=None,
    t5=TINY_T5,
    scheduler=dict(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    ),
)
TRANSFORMER_SIZES = {"tiny-sd3": TINY_SD3, "tiny-sd35": TINY_SD35, "tiny-flux": TINY_FLUX}


def _text_config(tokenizer, size: str, **spec):
    from transformers import CLIPTextConfig

    spec.setdefault("hidden_act", "quick_gelu")
    return CLIPTextConfig(
        vocab_size=max(len(tokenizer), 0 if size.startswith("tiny") else 49408),
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **spec,
    )


def make_pipeline(size: str = "tiny", prediction_type: str = "epsilon", seed: int = 0, real_vocab=None):
    """Build a random-weight StableDiffusionPipeline (no safety checker), an SDXL one for the *sdxl sizes, or an SD3
    or Flux one for the TRANSFORMER_SIZES."""
    if size in TRANSFORMER_SIZES:
        if prediction_type != "epsilon":
            raise ValueError(f"{size} is a flow-matching pipeline: it has no prediction_type ({prediction_type!r})")
        return make_transformer_pipeline(size, seed, real_vocab)
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    spec = SIZES[size]
    tokenizer = make_tokenizer(real_vocab)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(in_channels=4, out_channels=4, **spec.unet)
    vae = AutoencoderKL(in_channels=3, out_channels=3, **spec.vae)
    text_encoder = CLIPTextModel(_text_config(tokenizer, size, **spec.text))
    scheduler = DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )
    if size.endswith("sdxl"):
        from diffusers import StableDiffusionXLPipeline

        text_2 = dict(spec.text, hidden_act="gelu") if size.startswith("tiny") else SDXL_TEXT_2
        return StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            text_encoder_2=CLIPTextModelWithProjection(_text_config(tokenizer, size, **text_2)),
            tokenizer_2=make_tokenizer(real_vocab),
        )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _t5_encoder(tokenizer, spec: dict):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
        is_encoder_decoder=False,
        use_cache=False,
        **spec,
    )
    return T5EncoderModel(config)


def make_transformer_pipeline(
    size: str = "tiny-sd3", seed: int = 0, real_vocab: str | Path | None = None
) -> DiffusionPipeline:
    """Build a random-weight StableDiffusion3Pipeline (tiny-sd3, tiny-sd35) or FluxPipeline (tiny-flux)."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    spec = TRANSFORMER_SIZES[size]
    tokenizer, t5_tokenizer = make_tokenizer(real_vocab), make_t5_tokenizer()
    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, **spec.vae)
    scheduler = FlowMatchEulerDiscreteScheduler(**spec.scheduler)
    if spec.family == "flux":
        from diffusers import FluxPipeline, FluxTransformer2DModel

        return FluxPipeline(
            transformer=FluxTransformer2DModel(**spec.transformer),
            vae=vae,
            scheduler=scheduler,
            text_encoder=CLIPTextModel(_text_config(tokenizer, size, **spec.text)),
            tokenizer=tokenizer,
            text_encoder_2=_t5_encoder(t5_tokenizer, spec.t5),
            tokenizer_2=t5_tokenizer,
        )
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    return StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel(**spec.transformer),
        vae=vae,
        scheduler=scheduler,
        text_encoder=CLIPTextModelWithProjection(_text_config(tokenizer, size, **spec.text)),
        tokenizer=tokenizer,
        text_encoder_2=CLIPTextModelWithProjection(_text_config(tokenizer, size, **spec.text_2)),
        tokenizer_2=make_tokenizer(real_vocab),
        text_encoder_3=_t5_encoder(t5_tokenizer, spec.t5),
        tokenizer_3=t5_tokenizer,
    )


def make_sd35_controlnet(
    transformer: SD3Transformer2DModel, num_layers: int | None = None, seed: int = 0
) -> SD3ControlNetModel:
    """A random-weight ControlNet in the layout of Stability AI's SD3.5-large ControlNets (blur, canny, depth), as
    diffusers' scripts/convert_sd3_controlnet_to_diffusers.py writes them: single-stream blocks, no text input
    (`joint_attention_dim=None`), the pooled text used as it is, and no positional embedding of its own
    (`use_pos_embed=False`, `pos_embed_type=None`): its input is the transformer's patch tokens, as 3-D hidden
    states, not 4-D latents. Half the transformer's layers, as 19 of 38."""
    import torch
    from diffusers import SD3ControlNetModel

    config = transformer.config
    torch.manual_seed(seed)
    controlnet = SD3ControlNetModel(
        sample_size=config.sample_size,
        patch_size=config.patch_size,
        in_channels=config.in_channels,
        num_layers=num_layers or max(1, config.num_layers // 2),
        attention_head_dim=config.attention_head_dim,
        num_attention_heads=config.num_attention_heads,
        joint_attention_dim=None,
        caption_projection_dim=config.caption_projection_dim,
        pooled_projection_dim=config.pooled_projection_dim,
        out_channels=config.out_channels,
        pos_embed_max_size=None,
        pos_embed_type=None,
        use_pos_embed=False,
        force_zeros_for_pooled_projection=False,
    )
    # As a trained one, not a fresh one: non-zero output blocks and control input, so that it steers the transformer.
    for module in [*controlnet.controlnet_blocks, controlnet.pos_embed_input.proj]:
        module.reset_parameters()
    return controlnet


def write_pipeline(
    out_dir: str | Path,
    size: str = "tiny",
    prediction_type: str = "epsilon",
    seed: int = 0,
    real_vocab: str | Path | None = None,
) -> Path:
    """Write the pipeline of `size` to `out_dir`. tiny-sd35 also gets, in `out_dir/controlnet`, a ControlNet in
    the SD3.5-large ControlNets' layout (make_sd35_controlnet), which the pipeline itself does not load."""
    out_dir = Path(out_dir)
    pipeline = make_pipeline(size, prediction_type, seed, real_vocab)
    pipeline.save_pretrained(out_dir)
    if size == "tiny-sd35":
        make_sd35_controlnet(pipeline.transformer, seed=seed).save_pretrained(out_dir / "controlnet")
    return out_dir


# --------------------------------------------------------------------------------------------- dataset
def draw_fill_sample(
    rng: random.Random, resolution: int, aspect_ratio: float = 1.0
) -> tuple[Image.Image, Image.Image, str]:
    """One fill-style row: (target image, control outline, caption), of about resolution² pixels at the given
    width / height; the outline is drawn on the very box of the filled circle."""
    width, height = round(resolution * math.sqrt(aspect_ratio)), round(resolution / math.sqrt(aspect_ratio))
    short = min(width, height)
    fill, background = rng.sample(sorted(COLOURS), 2)
    radius = rng.uniform(short / 8, short / 3)
    cx = rng.uniform(radius, width - radius)
    cy = rng.uniform(radius, height - radius)
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    image = Image.new("RGB", (width, height), COLOURS[background])
    ImageDraw.Draw(image).ellipse(box, fill=COLOURS[fill])
    control = Image.new("RGB", (width, height), (0, 0, 0))
    ImageDraw.Draw(control).ellipse(box, outline=(255, 255, 255), width=max(1, math.ceil(resolution / 32)))
    return image, control, f"{fill} circle with {background} background"


def write_dataset(
    out_dir: str | Path,
    rows: int = 64,
    resolution: int = 64,
    seed: int = 0,
    formats: tuple[str, ...] = ("imagefolder", "parquet", "disk"),
    aspect_ratios: tuple[float, ...] = (1.0,),
) -> dict[str, Path]:
    """Write `rows` synthetic rows; returns the folder of each requested format. With several `aspect_ratios`
    (width / height) each row takes one of them at random (square rows are drawn as without the option)."""
    out_dir = Path(out_dir)
    rng, ratio_rng = random.Random(seed), random.Random(f"{seed}/aspect-ratios")
    samples = [draw_fill_sample(rng, resolution, ratio_rng.choice(aspect_ratios)) for _ in range(rows)]
    written: dict[str, Path] = {}

    if "imagefolder" in formats:
        folder = out_dir / "imagefolder"
        (folder / "images").mkdir(parents=True, exist_ok=True)
        (folder / "conditioning_images").mkdir(parents=True, exist_ok=True)
        with open(folder / "metadata.jsonl", "w") as meta:
            for i, (image, control, caption) in enumerate(samples):
                image.save(folder / "images" / f"{i:05d}.png")
                control.save(folder / "conditioning_images" / f"{i:05d}.png")
                meta.write(
                    json.dumps(
                        {
                            "file_name": f"images/{i:05d}.png",
                            "conditioning_image_file_name": f"conditioning_images/{i:05d}.png",
                            "text": caption,
                        }
                    )
                    + "\n"
                )
        written["imagefolder"] = folder

    if {"parquet", "disk"} & set(formats):
        import datasets

        features = datasets.Features(
            {
                "image": datasets.Image(),
                "conditioning_image": datasets.Image(),
                "text": datasets.Value("string"),
            }
        )
        table = datasets.Dataset.from_dict(
            {
                "image": [s[0] for s in samples],
                "conditioning_image": [s[1] for s in samples],
                "text": [s[2] for s in samples],
            },
            features=features,
        )
        if "parquet" in formats:
            folder = out_dir / "parquet"
            folder.mkdir(parents=True, exist_ok=True)
            table.to_parquet(str(folder / "train-00000-of-00001.parquet"))
            written["parquet"] = folder
        if "disk" in formats:
            folder = out_dir / "disk"
            datasets.DatasetDict({"train": table}).save_to_disk(str(folder))
            written["disk"] = folder
    return written


def write_validation_images(out_dir: str | Path, count: int = 2, resolution: int = 64, seed: int = 1234) -> list[Path]:
    """Control images (and their captions, in captions.txt) for --validation_image/--validation_prompt."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    paths, captions = [], []
    for i in range(count):
        _, control, caption = draw_fill_sample(rng, resolution)
        paths.append(out_dir / f"control_{i}.png")
        control.save(paths[-1])
        captions.append(caption)
    (out_dir / "captions.txt").write_text("\n".join(captions) + "\n")
    return paths


# --------------------------------------------------------------------------------------------- a base that can learn
def _load_images(data_dir: str | Path, resolution: int):
    """(images in [-1, 1] as N×3×R×R, captions) of an imagefolder written by write_dataset."""
    import numpy as np
    import torch

    folder = Path(data_dir)
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    images = [
        np.asarray(Image.open(folder / r["file_name"]).convert("RGB").resize((resolution, resolution))) for r in rows
    ]
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
    return pixels, [r["text"] for r in rows]


def calibrate_vae(vae, log_std: float = -6.0) -> None:
    """Make the posterior near-deterministic: the log-variance half of quant_conv outputs a constant 2·log_std
    (std = e^-6 ≈ 0.0025), so a sampled latent is its mean plus a whisper of noise, not mostly noise. A VAE
    without quant_conv (SD3's, Flux's) gets this in the last layer of its encoder instead."""
    import torch

    channels = vae.config.latent_channels
    conv = vae.quant_conv if vae.quant_conv is not None else vae.encoder.conv_out
    with torch.no_grad():
        conv.weight[channels:].zero_()
        conv.bias[channels:].fill_(2 * log_std)
    conv.requires_grad_(False)


def pretrain_base(
    pipeline,
    data_dir: str | Path,
    resolution: int = 64,
    vae_steps: int = 1500,
    unet_steps: int = 3000,
    batch_size: int = 16,
    seed: int = 0,
    log_every: int = 250,
):
    """Turn the random tiny pipeline into a base a ControlNet can be trained on (all on the CPU, a few minutes):

    1. calibrate the VAE and train it as an autoencoder on the synthetic images, so that latents carry the image
       and decoded validation images are recognisable circles; set its scaling factor to 1 / std of the latents;
    2. train the UNet text-to-image on those latents (DDPM, epsilon), so the base can already denoise.
    """
    import torch
    import torch.nn.functional as F

    pixels, captions = _load_images(data_dir, resolution)
    generator = torch.Generator().manual_seed(seed)
    start = time.time()
    vae, unet, text_encoder = pipeline.vae, pipeline.unet, pipeline.text_encoder
    calibrate_vae(vae)

    vae.train()
    optimizer = torch.optim.AdamW([p for p in vae.parameters() if p.requires_grad], lr=2e-3, weight_decay=0)
    crop = resolution // 2  # the VAE is convolutional: random half-size crops train it 4× faster
    for step in range(1, vae_steps + 1):
        batch = pixels[torch.randint(0, len(pixels), (batch_size,), generator=generator)]
        top, left = torch.randint(0, resolution - crop + 1, (2,), generator=generator).tolist()
        batch = batch[:, :, top : top + crop, left : left + crop]
        mean = vae.encode(batch).latent_dist.mean
        loss = F.mse_loss(vae.decode(mean).sample, batch) + 1e-4 * mean.pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % log_every == 0:
            print(f"vae step {step}: reconstruction loss {loss.item():.5f} ({time.time() - start:.0f} s)", flush=True)
    vae.eval().requires_grad_(False)

    with torch.no_grad():
        means = torch.cat([vae.encode(chunk).latent_dist.mean for chunk in pixels.split(64)])
        vae.register_to_config(scaling_factor=float(1.0 / means.std()))
        latents = means * vae.config.scaling_factor
        ids = pipeline.tokenizer(
            captions,
            padding="max_length",
            max_length=pipeline.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        text = torch.cat([text_encoder(chunk)[0] for chunk in ids.split(64)])
        empty = text_encoder(
            pipeline.tokenizer(
                [""], padding="max_length", return_tensors="pt", max_length=pipeline.tokenizer.model_max_length
            ).input_ids
        )[0]

    scheduler = pipeline.scheduler
    unet.train()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=3e-4, weight_decay=0)
    for step in range(1, unet_steps + 1):
        rows = torch.randint(0, len(latents), (batch_size,), generator=generator)
        noise = torch.randn(latents[rows].shape, generator=generator)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,), generator=generator)
        cond = text[rows].clone()
        cond[torch.rand(batch_size, generator=generator) < 0.1] = empty[0]  # learn the unconditional too
        pred = unet(scheduler.add_noise(latents[rows], noise, t), t, encoder_hidden_states=cond).sample
        loss = F.mse_loss(pred, noise)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % log_every == 0:
            print(f"unet step {step}: denoising loss {loss.item():.5f} ({time.time() - start:.0f} s)", flush=True)
    unet.eval().requires_grad_(False)
    return pipeline


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    pipe = sub.add_parser("pipeline", help="write a random-weight SD 1.x, SDXL, SD3 or Flux pipeline folder")
    pipe.add_argument("out_dir")
    pipe.add_argument("--size", choices=sorted([*SIZES, *TRANSFORMER_SIZES]), default="tiny")
    pipe.add_argument("--prediction_type", choices=["epsilon", "v_prediction"], default="epsilon")
    pipe.add_argument("--seed", type=int, default=0)
    pipe.add_argument(
        "--clip_vocab",
        nargs="?",
        const="open_clip",
        default=None,
        help="use the real 49,408-token CLIP vocabulary: a path to bpe_simple_vocab_16e6.txt.gz, "
        "or no value to take it from an installed open-clip-torch",
    )
    base = sub.add_parser(
        "pretrained",
        help="write a tiny pipeline whose VAE and UNet are trained on the "
        "synthetic data (a base on which a ControlNet can learn control)",
    )
    base.add_argument("out_dir")
    base.add_argument("--data", required=True, help="an imagefolder written by the dataset command")
    base.add_argument("--resolution", type=int, default=64)
    base.add_argument("--vae_steps", type=int, default=1500)
    base.add_argument("--unet_steps", type=int, default=3000)
    base.add_argument("--seed", type=int, default=0)
    data = sub.add_parser("dataset", help="write the synthetic fill-style dataset")
    data.add_argument("out_dir")
    data.add_argument("--rows", type=int, default=64)
    data.add_argument("--resolution", type=int, default=64)
    data.add_argument("--seed", type=int, default=0)
    data.add_argument("--validation_images", type=int, default=2)
    data.add_argument(
        "--aspect_ratios",
        type=float,
        nargs="+",
        default=[1.0],
        help="width / height of the rows, one drawn per row (e.g. 0.5 0.75 1 1.5 2); default: square",
    )
    args = parser.parse_args(argv)

    if args.command == "pretrained":
        import torch

        torch.manual_seed(args.seed)
        pipeline = pretrain_base(
            make_pipeline("tiny", seed=args.seed),
            args.data,
            args.resolution,
            args.vae_steps,
            args.unet_steps,
            seed=args.seed,
        )
        pipeline.save_pretrained(args.out_dir)
        print(
            f"wrote the pre-trained tiny pipeline to {args.out_dir} "
            f"(VAE scaling factor {pipeline.vae.config.scaling_factor:.3f})"
        )
    elif args.command == "pipeline":
        if args.size in TRANSFORMER_SIZES and args.prediction_type != "epsilon":
            parser.error(f"--size {args.size} is a flow-matching pipeline: it takes no --prediction_type")
        vocab = args.clip_vocab
        if vocab == "open_clip":
            vocab = find_open_clip_vocab()
            if vocab is None:
                parser.error("--clip_vocab without a path needs open-clip-torch (pip install open-clip-torch)")
        path = write_pipeline(args.out_dir, args.size, args.prediction_type, args.seed, vocab)
        print(f"wrote {args.size} pipeline to {path}")
    else:
        written = write_dataset(
            args.out_dir, args.rows, args.resolution, args.seed, aspect_ratios=tuple(args.aspect_ratios)
        )
        validation = write_validation_images(Path(args.out_dir) / "validation", args.validation_images, args.resolution)
        for fmt, path in written.items():
            print(f"wrote {args.rows} rows as {fmt} to {path}")
        print(f"wrote {len(validation)} validation control images to {validation[0].parent}")


if __name__ == "__main__":
    main()
