"""The `mp4sr-rt` command line: a thin typer layer. Each command lives in mp4sr_rt/commands/ and
imports its heavy dependencies inside the command, so `--help` and `score` start fast."""

from __future__ import annotations

import typer

from mp4sr_rt.commands import benchmark as benchmark_cmd
from mp4sr_rt.commands import export as export_cmd
from mp4sr_rt.commands import features as features_cmd
from mp4sr_rt.commands import score as score_cmd
from mp4sr_rt.commands import train as train_cmd

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="MP4SR multimodal sequential recommender: train, export, score.",
)
app.command("train")(train_cmd.train)
app.command("features")(features_cmd.features)
app.command("export")(export_cmd.export)
app.command("score")(score_cmd.score)
app.command("benchmark")(benchmark_cmd.benchmark)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
