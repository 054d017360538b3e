"""What the README says about flags is what the code does: every default it states, in tables and in prose."""

from __future__ import annotations

import argparse
import re

import pytest
from conftest import REPO, readme_table_row

from dist_mnist.checkpoint import RESUME_FIELDS
from dist_mnist.config import build_parser
from dist_mnist.profiling import BOUND_SHARE, STRAGGLER_MIN_STEP_SHARE, STRAGGLER_RATIO
from dist_mnist.runfiles import trace_window_dir
from dist_mnist.runtext import warmup_steps

README = (REPO / "README.md").read_text()
ACTIONS = build_parser()._option_string_actions
# Defaults the README gives as a word: the value that stands for it.
WORDS = {("--peak-tflops", "measured"): 0.0}  # 0: measure a matmul peak


def table_defaults() -> list[tuple[str, str]]:
    """(flag, default) from every README table with a `flag` and a `default` column; `a` / `b` cells pair up."""
    pairs: list[tuple[str, str]] = []
    for table in re.findall(r"^\| flag \| default \|.*\n\|[-| ]+\|\n((?:\|.*\|\n)+)", README, re.MULTILINE):
        for row in table.splitlines():
            # `\|` is a pipe inside a cell (`--ddp-comm-hook none\|bf16`), not a column's edge.
            flags_cell, default_cell = (cell.strip() for cell in re.split(r"(?<!\\)\|", row.strip("|"))[:2])
            # A flag alone (`--profile`) or with its values (`--grad-accum-steps N`); a default may be code (`bf16`).
            flags = re.findall(r"`(--[\w-]+)[` ]", flags_cell)
            defaults = [default.strip("`") for default in default_cell.split(" / ")]
            if len(defaults) == 1:  # one default for all the row's flags
                defaults *= len(flags)
            assert flags and len(flags) == len(defaults), row  # a row read as no flag would check nothing
            pairs += zip(flags, defaults)
    return pairs


def prose_defaults() -> list[tuple[str, str]]:
    """`--flag` (default X), `--flag` steps (default X), bullets that open with `--flag value`, `--flag` is off,
    `... --flag value` (the default)."""
    pairs = re.findall(r"`(--[\w-]+)`(?: \w+)? \(default ([^),;]+?)[),;]", README)
    pairs += re.findall(r"^- `(--[\w-]+) ([^`\s]+)`", README, re.MULTILINE)
    pairs += re.findall(r"`(--[\w-]+)` is (on|off)\b", README)
    pairs += re.findall(r"`[^`]*(--[\w-]+) ([^`\s]+)` \(the default\)", README)
    return [(flag, value) for flag, value in pairs if flag in ACTIONS]  # torchrun's own flags are not ours


def assert_default(flag: str, text: str) -> None:
    default = ACTIONS[flag].default
    if (flag, text) in WORDS:
        assert default == WORDS[flag, text]
    elif isinstance(ACTIONS[flag], argparse.BooleanOptionalAction) or isinstance(default, bool):
        assert text == ("on" if default else "off"), (flag, text, default)
    elif isinstance(default, (int, float)):
        assert float(text.removesuffix(" s")) == default, (flag, text, default)  # "300 s": seconds
    else:
        assert text == default, (flag, text, default)


def test_the_readme_states_defaults_where_expected() -> None:
    tables, prose = dict(table_defaults()), dict(prose_defaults())
    assert {"--profile", "--profile-wait", "--profile-repeat", "--peak-tflops", "--ddp-comm-hook",
            "--grad-accum-steps"} <= tables.keys()
    # Recipe values (--epochs, --batch-size, ...) are checked against the recipe table by tests/test_recipes.py.
    assert {"--checkpoint-every", "--keep-checkpoints", "--timeout-s", "--train-timeout-s", "--num-workers",
            "--compile", "--log-every"} <= prose.keys()


@pytest.mark.parametrize(("flag", "text"), table_defaults() + prose_defaults())
def test_readme_default_is_the_code_default(flag: str, text: str) -> None:
    assert flag in ACTIONS, f"the README documents {flag}, which launch/train.py does not have"
    assert_default(flag, text)


def test_readme_names_the_python_and_torch_ci_runs_the_suite_under_first() -> None:
    """.ci/run's temporary environment has the GPU machines' Python and torch; the README says which."""
    ci = (REPO / ".ci" / "run").read_text()
    pins = re.search(r'"\$gpu_torch_venv/bin/python" -m pip install --quiet (?:--no-compile )?torch==(\S+) '
                     r'torchvision==(\S+)', ci)
    assert pins, "no torch pin in .ci/run's GPU-torch install"
    python = re.search(r"^for candidate in python(3\.\d+) ", ci, re.MULTILINE)
    assert python, "no Python version in .ci/run's GPU-torch environment"
    assert (f"with the Python and torch our GPU machines run ({python.group(1)} where the machine has a "
            f"`python{python.group(1)}`, and torch {pins.group(1)},") in " ".join(README.split())


def test_readme_names_what_the_first_ci_pass_leaves_out_and_each_marker_is_registered() -> None:
    """The first pass's `-m` expression leaves out markers; the README's paragraph on .ci/run names each of them in
    parentheses, as `(`marker`` and no other, and pyproject.toml registers each (an unknown marker selects nothing)."""
    ci = (REPO / ".ci" / "run").read_text()
    expression = re.search(r'-m "((?:not \w+)(?: and not \w+)*)"', ci)
    assert expression, "no marker expression in .ci/run's first pass"
    left_out = set(re.findall(r"not (\w+)", expression.group(1)))
    paragraph = " ".join(README.split("bash .ci/run\n```", 1)[1].split("\n## ", 1)[0].split())
    assert set(re.findall(r"\(`(\w+)`", paragraph)) == left_out
    # Not tomllib: the project supports Python 3.10, which lacks it.
    markers = (REPO / "pyproject.toml").read_text().split("\nmarkers = [\n", 1)[1].split("\n]", 1)[0]
    assert left_out <= set(re.findall(r'^\s*"(\w+): ', markers, re.MULTILINE))


def test_the_readme_module_map_lists_every_module_and_no_other() -> None:
    """The README's Development section maps each file of the package to its concern: none missing, none stale."""
    listed = set(re.findall(r"^(dist_mnist/\w+\.py) ", README, re.MULTILINE))
    on_disk = {f"dist_mnist/{path.name}" for path in (REPO / "dist_mnist").glob("*.py") if path.name != "__init__.py"}
    assert listed == on_disk, {"not in the README": on_disk - listed, "not in the package": listed - on_disk}


PITFALLS = (REPO / "docs" / "pitfalls.md").read_text()


@pytest.mark.parametrize("path, name", sorted(set(re.findall(r"`((?:dist_mnist|tests)/\w+\.py):+([\w.]+)`", PITFALLS))))
def test_every_place_docs_pitfalls_names_exists(path: str, name: str) -> None:
    """docs/pitfalls.md says where each pitfall is handled and which test guards it: `file.py:Class.method` and
    `tests/file.py::test_name` must name a definition that file has."""
    source = (REPO / path).read_text()
    for part in name.split("."):  # a class, then its method, each defined in the file
        assert re.search(rf"^\s*(?:async\s+)?(?:def|class)\s+{re.escape(part)}\b", source, re.MULTILINE), \
            f"docs/pitfalls.md names {path}:{name}, which {path} does not define"


def test_the_readme_names_the_checkpoint_fields_a_resume_must_share() -> None:
    """README, "Preemption and restarts": the flags whose values a resumed checkpoint must share are RESUME_FIELDS."""
    text = " ".join(README.split())
    listed = re.search(r"A checkpoint from another model or another recipe \((.*?), compared as resolved", text)
    assert listed, "the README's list of the flags a checkpoint must share is gone"
    assert set(re.findall(r"`--([\w-]+)`", listed.group(1))) == {f.replace("_", "-") for f in RESUME_FIELDS}


def test_the_readme_lists_every_phase_a_failed_collective_is_named_by() -> None:
    """README, "Hung or lost peers": the phase names an error line can carry are train.py's, and no others."""
    text = " ".join(README.split())
    sentence = re.search(r"The phases: (.*?)\. torchrun then", text)
    assert sentence, "the README's list of collective phases is gone"
    source = (REPO / "dist_mnist" / "train.py").read_text()
    names = set(re.findall(r'self\.phase\("([^"]+)"[,)]', source)) | set(re.findall(r'collectives\.phase\("([^"]+)"',
                                                                                   source))
    assert len(names) >= 7
    listed = sentence.group(1)
    for name in sorted(names, key=len, reverse=True):  # the longest first: one name may hold another
        assert name in listed, name
        listed = listed.replace(name, "", 1)
    # What is left is the separators and the start-up phase's explanation: no name the code lacks.
    assert re.sub(r"\([^)]*\)", "", listed).replace(",", "").split() == [], listed


def test_the_readme_defaults_given_in_words() -> None:
    assert ACTIONS["--output-dir"].default == "profiles" and "(default `profiles/<timestamp>/`" in README
    resume = re.search(r"\*\*Resuming \(`--resume`\):\*\*\n- `(\w+)` \(default\)", README)
    assert resume and resume.group(1) == ACTIONS["--resume"].default
    assert "(`--backend auto`;" in README and ACTIONS["--backend"].default == "auto"
    assert "`--recipe auto|cpu|cuda`" in README and ACTIONS["--recipe"].default == "auto"


def test_the_readme_states_the_straggler_and_diagnosis_thresholds_the_summary_applies() -> None:
    """README, summary.json: a straggler is over STRAGGLER_RATIO x the other ranks' median own work, by over
    STRAGGLER_MIN_STEP_SHARE of a step; a run is bound by what takes at least BOUND_SHARE of a step."""
    text = " ".join(README.split())
    straggler = re.search(r"is over ([\d.]+)× the median of the other ranks' and the extra time is over (\d+)% of a "
                          r"step", text)
    assert straggler, "the README's straggler rule is gone"
    assert (float(straggler.group(1)), int(straggler.group(2)) / 100) == (STRAGGLER_RATIO, STRAGGLER_MIN_STEP_SHARE)
    bound = re.search(r"takes at least (\d+)% of a step \(averaged over ranks\)", text)
    assert bound, "the README's diagnosis rule is gone"
    assert int(bound.group(1)) / 100 == BOUND_SHARE
    # The steps left out as warm-up, and the fewest timed steps a diagnosis is made from.
    left_out = re.search(r"leave out the first fifth of the timed steps, at most (\d+),", text)
    fewest = re.search(r"A rank that timed fewer than (\d+) steps \(none left out\) gets no diagnosis", text)
    assert left_out and fewest, "the README's warm-up rule is gone"
    assert [warmup_steps(n) for n in range(60)] == [min(n // 5, int(left_out.group(1))) for n in range(60)]
    assert warmup_steps(int(fewest.group(1)) - 1) == 0 < warmup_steps(int(fewest.group(1)))


DOCS = {"README.md": README, **{f"docs/{path.name}": path.read_text() for path in sorted((REPO / "docs").glob("*.md"))}}


def heading_anchors(markdown: str) -> set[str]:
    """GitHub's anchors for a page's headings: lower case, characters other than letters, digits, spaces, `-` and `_`
    dropped, spaces to `-`. A `#` line inside a fenced block is a shell comment, not a heading."""
    outside_fences = re.sub(r"^```.*?^```", "", markdown, flags=re.MULTILINE | re.DOTALL)
    return {re.sub(r"[^a-z0-9 _-]", "", title.lower()).replace(" ", "-")
            for title in re.findall(r"^#{1,6} (.+?)\s*$", outside_fences, re.MULTILINE)}


@pytest.mark.parametrize(("page", "target", "anchor"), sorted(
    (page, target, anchor) for page, text in DOCS.items()
    for target, anchor in re.findall(r"\]\(([\w./-]*\.md)?#([\w-]+)\)", text)))
def test_every_link_to_a_heading_resolves(page: str, target: str, anchor: str) -> None:
    """`[text](#anchor)` and `[text](file.md#anchor)` in README.md and docs/ name a heading of their page: a heading
    renamed or a section never written leaves a link that goes nowhere."""
    file = (REPO / page).parent / target if target else REPO / page
    assert anchor in heading_anchors(file.read_text()), f"{page} links to {target}#{anchor}, which is no heading there"


# Launcher flags the README leaves to `--help` on purpose, each with why. Empty: every flag is named at least once.
FLAGS_THE_README_LEAVES_OUT: frozenset[str] = frozenset()


def test_the_readme_names_every_launcher_flag() -> None:
    """A flag a user needs but finds only in `--help` is a gap: each of launch/train.py's flags is named in the README
    at least once, either form of an on/off flag (`--no-tensorboard` names `--tensorboard`)."""
    flags = [action.option_strings for action in build_parser()._actions if "--help" not in action.option_strings]
    assert len(flags) >= 50
    unnamed = {forms[-1] for forms in flags if not any(re.search(rf"{re.escape(flag)}(?![\w-])", README)
                                                      for flag in forms)}
    assert unnamed == FLAGS_THE_README_LEAVES_OUT


def test_the_readme_gives_the_pytest_parallel_options_ci_uses() -> None:
    """README, Development: the pytest-xdist options that spread the suite "as CI does" are .ci/run's, all of them
    (`--no-loadscope-reorder` keeps the real-MNIST file first); only the worker count differs (`-n $(nproc)`)."""
    ci = (REPO / ".ci" / "run").read_text()
    parallel = re.search(r"^parallel=\((.*)\)$", ci, re.MULTILINE)
    assert parallel, "no parallel=(...) in .ci/run"
    options = re.sub(r'-n "\$\(nproc\)"', "", parallel.group(1)).split()
    assert len(options) >= 2, parallel.group(1)
    development = " ".join(README.split("\n## Development\n", 1)[1].split())
    stated = re.search(r"add `-n 2 ([^`]+)`", development)
    assert stated, "README, Development: the `-n 2 ...` pytest options are gone"
    assert stated.group(1).split() == options


GPU_CHECK = (REPO / "launch" / "gpu_check.sh").read_text()


def test_docs_benchmarks_names_every_recipe_candidate_gpu_check_times() -> None:
    """docs/benchmarks.md says what gpu_check.sh's sweep times; each candidate's name (its table row) is there."""
    candidates = re.search(r"^candidates=\(\n(.*?)^\)", GPU_CHECK, re.MULTILINE | re.DOTALL)
    assert candidates, "no candidates=(...) in launch/gpu_check.sh"
    names = re.findall(r'^\s*"(\w+) ', candidates.group(1), re.MULTILINE)
    assert len(names) >= 2
    assert [name for name in names if f"`{name}`" not in DOCS["docs/benchmarks.md"]] == []


def test_the_docs_give_gpu_check_shs_arguments_as_the_script_does() -> None:
    """`launch/gpu_check.sh DATA_DIR OUT_DIR [...]` in the docs is the script's own usage line, argument names too."""
    usage = re.search(r"^# Usage: bash (launch/gpu_check\.sh [^\n]+)$", GPU_CHECK, re.MULTILINE)
    assert usage, "no usage line in launch/gpu_check.sh"
    stated = {(page, words) for page, text in DOCS.items()
              for words in re.findall(r"launch/gpu_check\.sh [A-Z_]+ [A-Z_]+ \[[A-Z_]+\]", text)}
    assert {page for page, _ in stated} >= {"README.md", "docs/benchmarks.md"}
    assert {words for _, words in stated} == {usage.group(1)}, sorted(stated)


def test_the_docs_quote_the_phase_sample_rate_the_code_has() -> None:
    """The run's table prints "phase shares from one step in N" with N the --phase-timer-every default; a quote of
    that line with another N was true of an older default."""
    quoted = re.findall(r'"phase shares from one step in (\d+)"', " ".join("".join(DOCS.values()).split()))
    assert quoted
    assert {int(n) for n in quoted} == {ACTIONS["--phase-timer-every"].default}


def test_docs_benchmarks_states_the_profiler_run_steps_the_bench_refuses() -> None:
    """bench.py refuses a --profiler-run-steps that ends the profiled runs before the launcher's default profiler
    window closes (wait + warm-up + active steps); 0, the recipe's whole schedule, is allowed."""
    wait, warmup, active = (ACTIONS[f"--profile-{part}"].default for part in ("wait", "warmup", "active"))
    end = wait + warmup + active
    text = " ".join(DOCS["docs/benchmarks.md"].split())
    assert (f"`--profiler-run-steps` from 1 to {end - 1} (the profiled runs would end before their window, steps "
            f"{wait + 1}-{end}, closes; 0 means the recipe's whole schedule)") in text


def test_the_readme_defines_the_metrics_records_train_loss_and_samples_per_sec_as_the_code_computes_them() -> None:
    """README called samples_per_sec "global training throughput" and left train_loss undefined; both are of the
    interval since the previous evaluation (Trainer.evaluate_and_record), and the record files stay strict JSON."""
    row = readme_table_row("metrics.jsonl")
    assert "`train_loss` (the mean training loss over all ranks since the previous evaluation)" in row
    assert "`samples_per_sec` (global training throughput since the previous evaluation" in row
    assert "never as a bare `NaN`" in README and "so `tail -f` follows on" in README


def test_the_readme_gives_each_viewer_the_trace_folder_it_reads_as_the_profiler_writes_them() -> None:
    """A folder per window (runfiles.trace_window_dir): HTA takes one window's folder, TensorBoard's plugin lists each
    window as a run and reads it once (restart it to see later windows), HTA drops each trace's last step, and the
    memory scalars are MiB (review_outputs F2, F4, F7)."""
    hta = next(line for line in README.splitlines() if line.startswith("| Holistic Trace Analysis |"))
    assert 'trace_dir="profiles/<run-name>/traces/step<S>"' in hta
    tensorboard = next(line for line in README.splitlines() if line.startswith("| TensorBoard, PyTorch Profiler tab |"))
    assert "each window is listed as a run" in tensorboard and "restart" in tensorboard
    assert "include_last_profiler_step=True" in README and "both in MiB" in README
    assert trace_window_dir(3) == "step00000003" and "`traces/step<S>/rank<N>.pt.trace.json.gz`" in README
