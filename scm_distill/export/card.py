"""Model cards for exported students (huggingface_hub's template, offline)."""

from __future__ import annotations

import shutil
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

from .. import __version__

CARD_BODY = """
# {title}

A **two-step** consistency model distilled from [`{base_model}`]({base_link}) with
[scm-distill](https://github.com/scm-distill/scm-distill) {version}: continuous-time consistency distillation
(sCD) as in Lu & Song, *Simplifying, Stabilizing and Scaling Continuous-Time Consistency Models*
([arXiv 2410.11081](https://arxiv.org/abs/2410.11081)).

- Method: sCD (TrigFlow, JVP consistency target, tangent normalization, adaptive weighting)
- Sampling: {steps} network evaluations by default (t_max = {t_max:.5f}, t_mid = {t_mid:.4f}, sigma_data = {sigma_data})
- Weights: the EMA of the student, in the teacher's model class (safetensors)

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


def write_model_card(folder: Path, info, usage: str, pipeline_tag: str, steps: int = 2) -> None:
    """README.md with metadata (library, base model, tags) and the facts measured for this export."""
    base = info.base_model
    is_hub_id = "/" in base and not Path(base).exists()
    grid = ""
    if info.sample_grid is not None and Path(info.sample_grid).is_file():
        shutil.copyfile(info.sample_grid, folder / "samples.png")
        grid = "\n## Samples\n\n![samples](samples.png)\n"
    data = ModelCardData(
        library_name="diffusers",
        pipeline_tag=pipeline_tag,
        base_model=base if is_hub_id else None,
        tags=["consistency-model", "scm", "scm-distill", "few-step"],
    )
    body = CARD_BODY.format(
        title=f"Two-step sCM student of {Path(base).name if not is_hub_id else base}",
        base_model=base,
        base_link=f"https://huggingface.co/{base}" if is_hub_id else base,
        version=__version__,
        steps=steps,
        t_max=info.t_max,
        t_mid=info.t_mid,
        sigma_data=info.sigma_data,
        usage=usage,
        facts=facts_table(info.card_facts),
        grid=grid,
    )
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")
    card.save(folder / "README.md")


def refresh_card_facts(folder: Path, facts: dict) -> None:
    """Replace the "## Measured" table of an export's model card (e.g. after an evaluation); atomic write."""
    path = Path(folder) / "README.md"
    text = path.read_text()
    head, sep, rest = text.partition("## Measured\n")
    if not sep:
        raise ValueError(f"'{path}' has no '## Measured' section to update.")
    _, next_heading, tail = rest.partition("\n## ")
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(f"{head}## Measured\n\n{facts_table(facts)}\n{next_heading}{tail}")
    tmp.replace(path)
