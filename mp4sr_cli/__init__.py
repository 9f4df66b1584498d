"""The `mp4sr-rt` command line, the one layer above the three packages it assembles:

    mp4sr_cli  ->  train/commands.py   train, features, benchmark   (torch, inside the commands)
               ->  export/commands.py  export                       (torch, inside the command)
               ->  mp4sr_rt/commands/  score, serve, catalogue      (numpy + onnxruntime only)

The serving runtime (mp4sr_rt) never imports train, export or torch; this module is the only place
that knows all three. Every command imports its heavy dependencies inside itself, so `--help` and
`score` start fast, and `score` works in an install without torch.
"""

from __future__ import annotations

import typer
from mp4sr_export import commands as export_commands
from mp4sr_train import commands as train_commands

from mp4sr_rt.commands import score as score_command
from mp4sr_rt.commands import serve as serve_command

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="MP4SR multimodal sequential recommender: train, export, score.",
)
app.command("train")(train_commands.train)
app.command("features")(train_commands.features)
app.command("export")(export_commands.export)
app.command("score")(score_command.score)
app.command("benchmark")(train_commands.benchmark)
app.command("serve")(serve_command.serve)
app.add_typer(serve_command.catalogue_app, name="catalogue")


def main() -> None:
    app()
