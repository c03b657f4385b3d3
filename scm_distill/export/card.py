"""Model cards of exports (huggingface_hub's template, offline), rendered from the export's description."""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

from ..errors import UserError
from .contract import DESCRIPTION_FILE, ExportDescription, description_text, read_description, usage

CARD_BODY = """
# {title}

A **two-step** consistency model distilled from {base} with
[scm-distill](https://github.com/scm-distill/scm-distill) {version}: continuous-time consistency distillation
(sCD) as in Lu & Song, *Simplifying, Stabilizing and Scaling Continuous-Time Consistency Models*
([arXiv 2410.11081](https://arxiv.org/abs/2410.11081)).

- Pipeline: `{pipeline}`{code}
- Sampling: `num_inference_steps=2` (TrigFlow times {times2}) or 1 ({times1}); sigma_data = {sigma_data:.4f};
  {more_steps}
- Guidance: {guidance}
- Weights: the EMA of the student, in the teacher's model classes (safetensors)

## Usage

```python
{usage}
```

## Measured

{facts}
{grid}
"""


def facts_table(facts: dict) -> str:
    if not facts:
        return "No measurements were recorded for this export."
    rows = "\n".join(f"| {key} | {value} |" for key, value in facts.items())
    return f"| measure | value |\n|---|---|\n{rows}"


def is_hub_id(name: str | None) -> bool:
    """'owner/name' that is not a local path."""
    return bool(name) and name.count("/") == 1 and not name.startswith((".", "/", "~")) and not os.path.exists(name)


def teacher_license(teacher) -> str | None:
    """The licence in the teacher's own model card (README.md metadata), if it has one."""
    return folder_license(Path(getattr(teacher, "folder", "")))


def folder_license(folder: Path) -> str | None:
    """The licence in a pipeline folder's model card, if it has one."""
    path = Path(folder) / "README.md"
    if not path.is_file():
        return None
    try:
        return ModelCard.load(path).data.license
    except Exception:  # noqa: BLE001 - a card we cannot parse has no licence we can inherit
        return None


def card_tags(description: ExportDescription) -> list[str]:
    tags = ["consistency-model", "scm", "scm-distill", "few-step"]
    return tags + ["class-conditional"] if description.inputs == "class_labels" else tags


def render_card(description: ExportDescription, repo_id: str = "PATH_OR_REPO_ID", grid: bool = False) -> str:
    """README.md text: metadata (library, pipeline tag, licence, base model) and the body."""
    base = description.base_model if is_hub_id(description.base_model) else None
    data = ModelCardData(library_name="diffusers", pipeline_tag=description.pipeline_tag, license=description.license,
                         base_model=base, tags=card_tags(description))  # fmt: skip
    guidance = description.guidance_note or "none"
    body = CARD_BODY.format(
        title=f"Two-step sCM student of {base or 'a ' + description.family + ' teacher'}",
        base=f"[`{base}`](https://huggingface.co/{base})" if base else f"a {description.family} teacher",
        version=description.scm_distill,
        pipeline=description.pipeline,
        code=" (ships its own code: load with `trust_remote_code=True`)" if description.trust_remote_code else "",
        times2=[round(t, 4) for t in description.times["2"]],
        times1=[round(t, 4) for t in description.times["1"]],
        sigma_data=description.sigma_data,
        more_steps=description.more_steps,
        guidance=guidance,
        usage=usage(description, repo_id),
        facts=facts_table(description.facts),
        grid="\n## Samples\n\n![samples](samples.png)\n" if grid else "",
    )
    return f"---\n{data.to_yaml()}\n---\n{body}"


def write_model_card(folder: Path, description: ExportDescription, sample_grid: Path | None = None,
                     repo_id: str = "PATH_OR_REPO_ID") -> Path:  # fmt: skip
    """README.md of an export folder (and its samples.png when a grid is given)."""
    folder = Path(folder)
    if sample_grid is not None and Path(sample_grid).is_file():
        shutil.copyfile(sample_grid, folder / "samples.png")
    ModelCard(render_card(description, repo_id, (folder / "samples.png").is_file())).save(folder / "README.md")
    return folder / "README.md"


def refresh_card_facts(folder: Path, facts: dict) -> None:
    """Add measured facts to an export (description and card, e.g. after an evaluation); atomic writes."""
    folder = Path(folder)
    description = read_description(folder)
    if description is None:
        raise UserError(f"'{folder}' has no {DESCRIPTION_FILE}; it is not an scm-distill export.")
    description = dataclasses.replace(description, facts={**description.facts, **facts})
    card = render_card(description, grid=(folder / "samples.png").is_file())
    for name, text in ((DESCRIPTION_FILE, description_text(description)), ("README.md", card)):
        tmp = folder / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, folder / name)
