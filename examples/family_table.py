"""The README's "Quality by family" table from the committed results (examples/results/family-<family>-cpu.json,
written by examples/family_benchmark.py), with each row's bars checked.

    python examples/family_table.py          # prints the markdown table and one line per row on its bars

Bars (issue 12): student@2 FD <= 2.0x the teacher's at its default steps and <= 0.5x the teacher's own 2-step FD;
student@2 class accuracy >= the teacher's at its default steps minus 5 points; the export gives the toolkit's samples
when loaded without scm_distill (plain diffusers; module exports: load_student in a fresh process); the whole run,
teacher included, in <= 60 minutes.
"""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"  # family-F-cpu.json, and family-grids/F-cpu.png (class grid)
FAMILIES = ("sd", "sdxl", "dit", "sd3", "flux", "sana", "edm", "module")
MINUTES_BAR = 60.0


def bars(s: dict) -> dict[str, bool]:
    """Each bar of one row: True when met."""
    fd, accuracy = s["fd"], s["accuracy"]
    loaded = s.get("plain_diffusers") or {}
    loaded = loaded.get("fresh_process", loaded)
    return {"fd <= 2.0x teacher@default": fd["student_2"] <= 2.0 * fd["teacher_default"],
            "fd <= 0.5x teacher@2": fd["student_2"] <= 0.5 * fd["teacher_2"],
            "accuracy >= teacher - 5 points": accuracy["student_2"] >= accuracy["teacher_default"] - 0.05,
            "export gives the same samples": bool(loaded.get("same")),
            f"<= {MINUTES_BAR:.0f} min": s["minutes"]["total"] <= MINUTES_BAR}  # fmt: skip


def row(s: dict) -> str:
    teacher = s.get("teacher") or {}
    params = (teacher.get("parameters") or {}).get("denoiser", 0)
    fd, accuracy, timing = s["fd"], s["accuracy"], s.get("timing_batch1") or {}
    speedup = timing.get("speedup_2_step_end_to_end")
    met = bars(s)
    verdict = "all bars met" if all(met.values()) else "misses: " + "; ".join(k for k, v in met.items() if not v)
    grid = RESULTS / "family-grids" / f"{s['family']}-cpu.png"
    grid = f" ([grid](examples/results/family-grids/{grid.name}))" if grid.is_file() else ""
    return (f"| [{s['family']}](examples/results/family-{s['family']}-cpu.json){grid} | {params / 1e6:.1f}M, "
            f"{teacher.get('default_steps')} steps | {fd['teacher_default']:.1f} / {fd['teacher_2']:.1f} / "
            f"**{fd['student_2']:.1f}** / {fd['student_1']:.1f} | {accuracy['teacher_default']:.3f} / "
            f"**{accuracy['student_2']:.3f}** / {accuracy.get('student_1', float('nan')):.3f} | "
            f"{'' if speedup is None else f'{speedup:.0f}x'} | {s['minutes']['total']:.0f} | {verdict} |")


HEADER = ("| family | teacher (denoiser, default steps) | FD teacher@default / @2 / student@2 / @1 | accuracy "
          "teacher / student@2 / @1 | 2-step speedup (batch 1) | minutes, teacher included | bars |\n"
          "|---|---|---|---|---|---|---|")  # fmt: skip


def main() -> None:
    lines = [HEADER]
    for family in FAMILIES:
        path = RESULTS / f"family-{family}-cpu.json"
        if not path.is_file():
            lines.append(f"| {family} | | not measured yet | | | | |")
            continue
        lines.append(row(json.loads(path.read_text())))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
