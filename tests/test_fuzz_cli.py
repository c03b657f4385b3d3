"""Fuzz test of the config through the CLI (hypothesis): hostile `--set` values for every config field and hostile
recipe YAML never give a traceback. Each example runs `scm-distill distill ... --dry-run` in-process and must exit 0
(printing the resolved config as JSON) or 1 (exactly one error line on stderr), and leave nothing at --output."""

import dataclasses
import json
import tempfile
from pathlib import Path

import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from refusals import log_bad_input

from scm_distill.cli import main
from scm_distill.config import DistillConfig
from scm_distill.fingerprint import flatten

FIELDS = sorted(flatten(dataclasses.asdict(DistillConfig())))
SECTIONS = sorted({name.split(".")[0] for name in FIELDS if "." in name})
HOSTILE_TEXT = ["nan", ".nan", "-.inf", ".inf", "inf", "-1", "0", "-0.0", "1e400", "1e-400", "1e30", "-1e30",
                "99999999999999999999999", "true", "false", "null", "~", "[]", "{}", "[1, 2]", "[0.9, 1.5]",
                "[.nan, .nan]", "''", "'x'", "abc", "epsilon", "v_prediction", "2026-01-01", "[", "{a: 1}", "\"\\n\"",
                "!!python/object/apply:os.system ['true']", "*anchor", "0x10", "1_000", "0o17", "3e-4", "..."]
FUZZ = settings(max_examples=120, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])  # fmt: skip

field_names = st.one_of(st.sampled_from(FIELDS), st.sampled_from(SECTIONS),
                        st.sampled_from(["train.bach_size", "optim", "nope.x", "", "train..seed", "a.b.c"]))
values = st.one_of(st.sampled_from(HOSTILE_TEXT), st.integers(-(2**70), 2**70).map(str),
                   st.floats(allow_nan=True, allow_infinity=True).map(repr), st.text(max_size=12))  # fmt: skip


def dry_run(capsys, extra: list[str]) -> None:
    """The property: exit 0 with the config as JSON, or exit 1 with one error line; --output never created."""
    out = Path(tempfile.mkdtemp(prefix="fuzz-")) / "out"
    capsys.readouterr()
    code = main(["distill", "--teacher", "some/teacher", "--data", "digits", "--output", str(out), *extra,
                 "--dry-run"])  # fmt: skip
    captured = capsys.readouterr()
    assert code in (0, 1), (extra, captured.err[-2000:])
    if code == 0:
        config = json.loads(captured.out)
        assert config["output"] == str(out) and captured.err == ""
    else:
        lines = captured.err.splitlines()
        one_sentence = len(lines) == 1 and lines[0].startswith("scm-distill distill: error: ")
        log_bad_input(extra, one_sentence, not out.exists())
        assert one_sentence, (extra, lines)
    assert not out.exists() and not any(out.parent.iterdir())
    out.parent.rmdir()


@FUZZ
@given(st.lists(st.tuples(field_names, values), min_size=1, max_size=3))
@example([("optim.lr", "inf")])
@example([("optim.grad_clip", "-1")])
@example([("train.log_every", "0")])
@example([("train", "3"), ("train.seed", "1")])
def test_hostile_set_values_are_one_sentence_or_accepted(capsys, assignments):
    dry_run(capsys, [arg for field, value in assignments for arg in ("--set", f"{field}={value}")])


# YAML documents: nested mappings of (possibly unknown) field names to hostile scalars, lists and mappings
scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=8))
leaves = st.one_of(scalars, st.lists(scalars, max_size=3))
recipes = st.one_of(
    st.dictionaries(st.sampled_from(FIELDS + SECTIONS + ["unknown"]), leaves, max_size=4).map(
        lambda d: {k.split(".")[0]: ({k.split(".")[1]: v} if "." in k else v) for k, v in d.items()}),
    st.recursive(leaves, lambda inner: st.dictionaries(st.sampled_from(SECTIONS + FIELDS), inner, max_size=3),
                 max_leaves=6),
)  # fmt: skip
raw_yaml = st.one_of(st.text(max_size=40), st.sampled_from(["- a\n- b", "a: [", "{", "\x00\x01", "!!binary AAAA",
                                                            "train: !!python/name:os.system", "&a [*a]"]))


@FUZZ
@given(st.one_of(recipes.map(lambda r: yaml.safe_dump(r, allow_unicode=True)), raw_yaml))
@example("train:\n  max_steps: .nan\n")
@example("optim:\n  betas: [0.9]\n")
def test_hostile_recipes_are_one_sentence_or_accepted(capsys, text):
    with tempfile.TemporaryDirectory() as folder:
        recipe = Path(folder) / "recipe.yaml"
        recipe.write_text(text, encoding="utf-8", errors="surrogatepass")
        dry_run(capsys, ["--recipe", str(recipe)])
