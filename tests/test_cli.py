"""The command line: generated flags round-trip into their config dataclasses, renamed flags
are refused, and every subcommand's --help shows an example."""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys

import pytest

from logit2prompt.cli import commands
from logit2prompt.cli.args import VALUE, add_dataclass_args, config_from_args
from logit2prompt.cli.main import build_parser
from logit2prompt.defenses.sweep import DEFAULT_SPECS, SweepConfig
from logit2prompt.evaluation.evaluate import EvalConfig
from logit2prompt.recipes.quickstart import QuickstartConfig
from logit2prompt.training.config import TrainConfig

SUBCOMMANDS = (
    "data",
    "collect",
    "train",
    "invert",
    "quickstart",
    "defend-sweep",
    "evaluate",
    "train-text",
    "serve",
    "info",
)
EVAL = ["evaluate", "--checkpoint", "ck", "--prompts", "p.jsonl", "--out", "o"]
SWEEP = ["defend-sweep", "--checkpoint", "ck", "--train-data", "tr", "--test-data", "te"]
TEXT = ["train-text", "--data", "d", "--out", "o", "--like", "ck"]


@pytest.fixture(scope="module")
def parser() -> argparse.ArgumentParser:
    return build_parser()


def parse(parser: argparse.ArgumentParser, *argv: str) -> argparse.Namespace:
    return parser.parse_args(list(argv))


def refused(parser, capsys, *argv: str) -> str:
    """argparse's exit status 2 and its message."""
    with pytest.raises(SystemExit) as exc:
        parser.parse_args(list(argv))
    assert exc.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_subcommand_help_shows_an_example(parser, capsys, command):
    with pytest.raises(SystemExit) as exc:
        parser.parse_args([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out
    assert f"logit2prompt {command} " in out.split("examples:")[1]


def test_generated_defaults_equal_the_dataclass_defaults(parser):
    train = commands.train_config(parse(parser, "train", "--data", "d", "--out", "o"))
    assert train == TrainConfig(data="d", out="o")
    evaluation = commands.eval_config(parse(parser, *EVAL))
    assert evaluation == EvalConfig(checkpoint="ck", prompts="p.jsonl", out="o")
    sweep = commands.sweep_config(parse(parser, *SWEEP, "--out", "o"))
    assert sweep == SweepConfig(checkpoint="ck", train_data="tr", test_data="te", out="o")
    assert commands.quickstart_config(parse(parser, "quickstart")) == QuickstartConfig()


def test_every_config_field_has_a_flag(parser):
    """A field the CLI cannot set is a field added without a flag; fail rather than drift."""
    train = vars(parse(parser, "train", "--data", "d", "--out", "o"))
    assert {f.name for f in dataclasses.fields(TrainConfig)} - set(train) == {
        "overrides",
        "progress",
    }
    evaluation = vars(parse(parser, *EVAL))
    assert {f.name for f in dataclasses.fields(EvalConfig)} - set(evaluation) == {"progress"}
    sweep = vars(parse(parser, *SWEEP, "--out", "o"))
    assert {f.name for f in dataclasses.fields(SweepConfig)} <= set(sweep)


def test_train_flags_parse_as_before(parser, capsys):
    args = parse(
        parser,
        *("train", "--data", "d", "--out", "o", "--neighbour-copy", "false", "--lr", "3e-4"),
        *("--per-device-batch-size", "8", "--val-data", "v", "--set", "d_model=512"),
    )
    cfg = commands.train_config(args)
    assert cfg.neighbour_copy is False
    assert cfg.lr == 3e-4 and cfg.per_device_batch_size == 8 and cfg.val_data == "v"
    assert cfg.overrides == {"d_model": 512}
    yes = parse(parser, "train", "--data", "d", "--out", "o", "--neighbour-copy", "on")
    assert yes.neighbour_copy is True
    assert "expected true or false" in refused(
        parser, capsys, "train", "--data", "d", "--out", "o", "--neighbour-copy", "maybe"
    )
    refused(parser, capsys, "train", "--out", "o")  # --data is required: no default


def test_bool_switches_and_tuples(parser):
    cfg = commands.eval_config(
        parse(
            parser,
            *EVAL,
            *("--baselines", "nn,extraction", "--rerank", "--no-semantic", "--split", "test"),
            *("--predictions", "a.jsonl", "b,c.jsonl"),
        )
    )
    assert cfg.baselines == ("nn", "extraction")
    assert cfg.rerank is True and cfg.semantic is False and cfg.functional is True
    assert cfg.split == "test"
    assert cfg.predictions == ("a.jsonl", "b,c.jsonl")  # file names: never split on commas
    assert commands.eval_config(parse(parser, *EVAL, "--baselines", "")).baselines == ()
    sweep = commands.sweep_config(
        parse(parser, *SWEEP, "--out", "o", "--defenses", "topk:20,noise:gauss:0.5;topk:5")
    )
    assert sweep.specs == ("topk:20,noise:gauss:0.5", "topk:5")
    assert commands.sweep_config(parse(parser, *SWEEP, "--out", "o", "--defenses", "")).specs == (
        DEFAULT_SPECS
    )
    quick = commands.quickstart_config(
        parse(parser, "quickstart", "--no-bf16-decoding", "--prompts", "c.jsonl", "--no-progress")
    )
    assert (quick.bf16_decoding, quick.corpus, quick.progress) == (False, "c.jsonl", False)


def test_evaluate_sample_size_is_the_sample_field(parser, capsys):
    assert commands.eval_config(parse(parser, *EVAL, "--sample-size", "5")).sample == 5
    assert "--sample-size" in refused(parser, capsys, *EVAL, "--sample", "5")
    assert parse(parser, "invert", "--checkpoint", "ck", "--data", "s", "--sample").sample is True


def test_train_text_max_steps(parser, capsys):
    assert parse(parser, *TEXT, "--max-steps", "15").max_steps == 15
    assert parse(parser, *TEXT).max_steps is None
    assert "--max-steps" in refused(parser, capsys, *TEXT, "--steps", "15")
    collect = ["collect", "--prompts", "p.jsonl", "--out", "s", "--steps", "4"]
    assert parse(parser, *collect).steps == 4  # generation steps per prompt, as before


def test_add_dataclass_args_generic(capsys):
    @dataclasses.dataclass
    class Config:
        name: str = dataclasses.field(metadata={"help": "required: no default"})
        rate: float = 0.5
        path: str | None = None
        sizes: tuple[int, ...] = (1, 2)
        fast: bool = False
        mode: str = dataclasses.field(default="a", metadata={"choices": ("a", "b")})

    p = argparse.ArgumentParser()
    add_dataclass_args(p, Config, rename={"sizes": "widths"})
    assert config_from_args(Config, p.parse_args(["--name", "x"])) == Config(name="x")
    got = config_from_args(
        Config,
        p.parse_args(["--name", "x", "--rate", "2", "--widths", "3,4", "--fast", "--mode", "b"]),
    )
    assert got == Config(name="x", rate=2.0, sizes=(3, 4), fast=True, mode="b")
    assert config_from_args(Config, p.parse_args(["--name", "x"]), rate=1.0).rate == 1.0
    for bad in (["--name", "x", "--widths", "3,z"], ["--name", "x", "--mode", "c"], []):
        with pytest.raises(SystemExit):
            p.parse_args(bad)
    capsys.readouterr()

    values = argparse.ArgumentParser()
    add_dataclass_args(values, Config, bools=VALUE)
    assert values.parse_args(["--name", "x", "--fast", "yes"]).fast is True
    help_text = values.format_help()
    assert "required: no default" in help_text and "(default: 1,2)" in help_text


def test_module_entry_point():
    done = subprocess.run(
        [sys.executable, "-m", "logit2prompt.cli", "info", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "logit2prompt info stores/train" in done.stdout


def test_commands_pass_the_parsed_config_on(monkeypatch, tmp_path, capsys):
    """`main` hands defend-sweep and quickstart the config their flags describe."""
    from logit2prompt.cli.main import main
    from logit2prompt.defenses import sweep
    from logit2prompt.recipes import quickstart

    seen = {}
    clean = {"spec": "none", "kind": "none", "adaptive": {"bleu": 9.0}, "utility": {"tv": 0.0}}

    def fake_sweep(cfg, progress):
        seen["sweep"] = (cfg, progress)
        return {"rows": [clean]}

    monkeypatch.setattr(sweep, "run_sweep", fake_sweep)
    monkeypatch.setattr(quickstart, "run_quickstart", lambda cfg: seen.setdefault("quick", cfg))
    monkeypatch.setattr(quickstart, "format_report", lambda report: f"TABLE for {report.out}")
    out = str(tmp_path / "sweep")
    assert main([*SWEEP, "--out", out, "--limit", "7", "--no-semantic", "--no-progress"]) == 0
    cfg, progress = seen["sweep"]
    assert (cfg.out, cfg.test_limit, cfg.semantic, progress) == (out, 7, False, False)
    assert "results.json" in capsys.readouterr().out
    assert main(["quickstart", "--scale", "0.5", "--base-steps", "12", "--target", "t"]) == 0
    assert (seen["quick"].scale, seen["quick"].base_steps, seen["quick"].target) == (0.5, 12, "t")
    # The command, not the library, prints the quickstart's table.
    assert "TABLE for runs/quickstart" in capsys.readouterr().out
