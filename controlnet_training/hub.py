"""Model card and Hub upload. Only the final weights, the card and the sample images are uploaded."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from .export import RAW_FOLDER, SINGLE_FILE, WeightsFile, weights_files
from .validation import ValidationLog

UPLOAD_PATTERNS = [
    "config.json",
    "diffusion_pytorch_model.safetensors",
    SINGLE_FILE,
    f"{RAW_FOLDER}/*",
    "README.md",
    "images_*.png",
    "image_control_*.png",
    "control_metrics.png",
    "control_metrics.jsonl",
]


def repo_name(hub_model_id: str | None, output_dir: str) -> str:
    return hub_model_id or Path(os.path.abspath(output_dir)).name


def create_hub_repo(hub_model_id: str | None, output_dir: str, token: str | None) -> str:
    from huggingface_hub import create_repo

    return create_repo(repo_name(hub_model_id, output_dir), exist_ok=True, token=token).repo_id


def training_details(rows: dict[str, object]) -> str:
    """A markdown section for the model card, e.g. steps, effective batch, learning rate, resolution."""
    return "\n## Training details\n\n" + "\n".join(f"- {name}: {value}" for name, value in rows.items()) + "\n"


def control_section(
    heldout_loss: float, control_gain: float, heldout_rows: int, plot_name: str, ema: tuple[float, float] | None = None
) -> str:
    """The control-adherence figures for the model card; `ema`: (held-out loss, gain) of the averaged weights."""
    averaged = ""
    if ema is not None:
        averaged = f" The EMA weights (the ones published): held-out loss {ema[0]:.5f}, control gain {ema[1]:.4f}."
    return (
        f"\n## Control adherence\n\nOn {heldout_rows} held-out rows, at fixed timesteps and noise: held-out "
        f"denoising loss {heldout_loss:.5f}, control gain {control_gain:.4f} (the error with another row's "
        f"control image divided by the error with the row's own; 1 means the control image is ignored).{averaged}"
        f"\n\n![control adherence](./{plot_name})\n"
    )


TORCH_DTYPES = {"fp32": "torch.float32", "fp16": "torch.float16", "bf16": "torch.bfloat16"}
LOADS_WITH = {
    "diffusers": "diffusers `{cls}.from_pretrained`",
    "single_file": "ComfyUI, AUTOMATIC1111 sd-webui-controlnet, diffusers `from_single_file` (SD 1.x/2.x)",
}


def controlnet_class(output_dir: str | Path) -> str:
    """The diffusers class of the ControlNet in output_dir (ControlNetModel, SD3ControlNetModel, ...)."""
    config = Path(output_dir) / "config.json"
    name = json.loads(config.read_text()).get("_class_name") if config.is_file() else None
    return name or "ControlNetModel"


def _loading_snippet(row: WeightsFile, repo_id: str, cls: str = "ControlNetModel") -> str:
    torch_dtype = TORCH_DTYPES.get(row.dtype, "torch.float32")
    if row.loads_with == "diffusers":
        subfolder = f', subfolder="{RAW_FOLDER}"' if row.path.startswith(RAW_FOLDER) else ""
        return (
            f"\n{row.path} (diffusers):\n\n```python\nimport torch\nfrom diffusers import {cls}\n\n"
            f'controlnet = {cls}.from_pretrained("{repo_id}"{subfolder}, torch_dtype={torch_dtype})\n```\n'
        )
    return (
        f"\n{row.path} (one file, original ControlNet layout):\n\n"
        f"- ComfyUI: copy it to `ComfyUI/models/controlnet/` and pick it in the **Load ControlNet Model** node.\n"
        f"- AUTOMATIC1111: copy it to `stable-diffusion-webui/extensions/sd-webui-controlnet/models/` (or "
        f"`stable-diffusion-webui/models/ControlNet/`) and choose it in the ControlNet panel.\n"
    )


def weights_section(output_dir: str | Path, repo_id: str) -> str:
    """A markdown section for the model card: every weights file now in output_dir (file, layout, dtype, what
    loads it) and how to load each; empty when there is none."""
    rows = weights_files(output_dir)
    if not rows:
        return ""
    table = "| file | layout | dtype | loads with |\n|---|---|---|---|\n"
    cls = controlnet_class(output_dir)
    loads = {name: text.format(cls=cls) for name, text in LOADS_WITH.items()}
    table += "".join(f"| `{r.path}` | {r.layout} | {r.dtype} | {loads[r.loads_with]} |\n" for r in rows)
    return "\n## Weights files\n\n" + table + "".join(_loading_snippet(r, repo_id, cls) for r in rows)


def write_model_card(
    output_dir: str | Path,
    repo_id: str,
    base_model: str,
    logs: Sequence[ValidationLog],
    tags: Sequence[str],
    license: str,
    dataset: str | None = None,
    token: str | None = None,
    from_hub: bool = False,
    extra: str = "",
) -> Path:
    """README.md in output_dir. With `from_hub`, an existing card of the repo is kept and updated."""
    from diffusers.utils.hub_utils import MODEL_CARD_TEMPLATE_PATH, load_or_create_model_card, populate_model_card
    from huggingface_hub import ModelCard, ModelCardData

    description = f"# controlnet-{repo_id}\n\nThese are ControlNet weights trained on {base_model}"
    description += f" with the dataset {dataset}.\n" if dataset else " with a new type of conditioning.\n"
    if logs:
        description += "\nValidation images (control image first, then the generated images):\n"
        for i, log in enumerate(logs):
            description += f"\nprompt: {log.prompt}\n![images_{i}](./images_{i}.png)\n"
    description += weights_section(output_dir, repo_id)
    description += extra
    if from_hub:  # keeps an existing card of the repo, else renders diffusers' training template
        card = load_or_create_model_card(
            repo_id,
            token=token,
            from_training=True,
            license=license,
            base_model=base_model,
            model_description=description,
            inference=True,
        )
    else:  # the same template, rendered without asking the Hub
        card = ModelCard.from_template(
            card_data=ModelCardData(license=license, library_name="diffusers", inference=True, base_model=base_model),
            template_path=MODEL_CARD_TEMPLATE_PATH,
            model_description=description,
        )
    card = populate_model_card(card, tags=list(tags))
    path = Path(output_dir) / "README.md"
    card.save(path)
    return path


def upload_outputs(output_dir: str | Path, repo_id: str, token: str | None) -> None:
    from huggingface_hub import upload_folder

    upload_folder(
        repo_id=repo_id,
        folder_path=str(output_dir),
        commit_message="End of training",
        allow_patterns=UPLOAD_PATTERNS,
        token=token,
    )


def publish(
    args, repo_id: str | None, logs: Sequence[ValidationLog], tags: list[str], license: str, extra: str
) -> None:
    """The model card in output_dir and, with --push_to_hub (`repo_id`), the upload of the outputs."""
    write_model_card(
        args.output_dir,
        repo_id or repo_name(args.hub_model_id, args.output_dir),
        args.pretrained_model_name_or_path,
        logs,
        tags,
        license,
        dataset=args.dataset_name or args.train_data_dir,
        token=args.hub_token,
        from_hub=repo_id is not None,
        extra=extra,
    )
    if repo_id is not None:
        upload_outputs(args.output_dir, repo_id, args.hub_token)
