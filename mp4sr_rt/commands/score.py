"""`mp4sr-rt score`: top-k recommendations for the histories of a JSON file, as JSON on stdout.

    mp4sr-rt score examples/history.json --artifacts mp4sr-out/artifacts -k 10
    echo '["item00012", "item00007"]' | mp4sr-rt score -

Output: a JSON list, one result per history in input order:
    {"user": ..., "items": [...], "scores": [...], "unknown_items": [...],
     "fallback": null | "popular"}
With --skip-invalid, an entry that is not a valid history becomes {"user": ..., "error": "..."}.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from mp4sr_rt.commands import user_errors
from mp4sr_rt.errors import UserError
from mp4sr_rt.histories import HistoryRequest, InvalidEntry, parse_histories

if TYPE_CHECKING:
    from mp4sr_rt.scorer import Recommendation, Scorer

MAX_LISTED = 5  # invalid entries named in the error message; the rest are counted
MAX_HISTORY_BYTES = 256 * 2**20  # a history file larger than this is refused, not read to the end
DEFAULT_ARTIFACTS = Path("mp4sr-out/artifacts")


@user_errors
def score(
    history_file: Annotated[str, typer.Argument(
        metavar="HISTORY_FILE",
        help="JSON file of histories, or - for stdin: one history (a list of item ids, or "
             '{"user": ..., "history": [...]}), a list of those, or JSON Lines of those. '
             "Sample: examples/history.json.")],
    artifacts: Annotated[Path, typer.Option(
        "--artifacts", help="Artifact directory written by `mp4sr-rt export`."),
    ] = DEFAULT_ARTIFACTS,
    k: Annotated[int, typer.Option("-k", "--k", min=1, help="Items to return per history.")] = 10,
    backend: Annotated[str, typer.Option(
        "--backend", help="auto | cpu | cuda | tensorrt (auto: the fastest available).")] = "auto",
    exclude_seen: Annotated[bool, typer.Option(
        "--exclude-seen/--include-seen",
        help="Leave the history's own items out of its results.")] = True,
    skip_invalid: Annotated[bool, typer.Option(
        "--skip-invalid", help="Score the valid histories and report the invalid ones in place, "
                               "instead of failing when any is invalid.")] = False,
    exclude: Annotated[list[str] | None, typer.Option(
        "--exclude", help="An item id never to return (repeatable).")] = None,
    allow: Annotated[list[str] | None, typer.Option(
        "--allow", help="An item id that may be returned (repeatable): with it, only those are.")] = None,
    exact: Annotated[bool, typer.Option(
        "--exact", help="Rank by the exact scan even where the artifacts carry an approximate "
                        "(FAISS) index.")] = False,
    new_items: Annotated[Path | None, typer.Option(
        "--new-items", help="items.jsonl of items to add before scoring (item_id, text fields, "
                            "images relative to the file): recommendable and usable in histories "
                            "without retraining. Needs artifacts with the text (and image) encoders.")
    ] = None,
) -> None:
    """Recommend the top-k items for each history of HISTORY_FILE (results on stdout as JSON)."""
    entries = parse_histories(read_text(history_file))
    invalid = [e for e in entries if isinstance(e, InvalidEntry)]
    if invalid and not skip_invalid:
        raise UserError(describe_invalid(invalid) + " (--skip-invalid scores the valid ones)")
    for entry in invalid:
        print(f"warning: skipped {entry.position}: {entry.error}", file=sys.stderr)

    from mp4sr_rt.scorer import Scorer  # numpy and onnxruntime: only once the input is valid

    start = time.perf_counter()
    scorer = Scorer(artifacts, backend=backend, ann=not exact)
    if new_items is not None:
        add_new_items(scorer, new_items)
    valid = [e for e in entries if isinstance(e, HistoryRequest)]
    recommendations = iter(scorer.score([e.items for e in valid], k=k, exclude_seen=exclude_seen,
                                        exclude=exclude or (), allow=allow))
    results = [
        {"user": e.user, "error": f"{e.position}: {e.error}"} if isinstance(e, InvalidEntry)
        else result_json(e, next(recommendations))
        for e in entries
    ]
    write_stdout("[" + ",\n".join(json.dumps(r, ensure_ascii=False) for r in results) + "]\n")
    search = f"{scorer.manifest.ann.kind} index" if scorer.approximate else "exact scan"
    print(f"scored {len(valid)} histories ({len(invalid)} skipped) on {scorer.backend.name}, {search}, in "
          f"{time.perf_counter() - start:.2f} s", file=sys.stderr)


def add_new_items(scorer: Scorer, path: Path) -> None:
    """Add the items of an items.jsonl file through their raw text and images."""
    from mp4sr_rt.items import read_items

    start = time.perf_counter()
    records = read_items(path)
    if not records:
        raise UserError(f"{path}: no items")
    empty = next((r for r in records if not r.fields and not r.images), None)
    if empty is not None:
        raise UserError(f"{path}: item {empty.item_id!r} has neither text nor images to be scored by")
    images = [list(r.images) for r in records] if any(r.images for r in records) else None
    scorer.add_items([r.item_id for r in records], texts=[list(r.fields) for r in records], images=images)
    print(f"added {len(records)} new items from {path} in {time.perf_counter() - start:.2f} s",
          file=sys.stderr)


def write_stdout(text: str) -> None:
    """UTF-8 on stdout. A lone surrogate (valid in a JSON string, not encodable in UTF-8) is
    written as its JSON escape: backslashreplace spells it exactly so inside a JSON string."""
    if sys.stdout is None:
        raise UserError("standard output is closed")
    try:
        sys.stdout.flush()
        sys.stdout.buffer.write(text.encode("utf-8", "backslashreplace"))
        sys.stdout.buffer.flush()
    except (BrokenPipeError, ValueError, OSError) as e:  # ValueError: a closed file
        raise UserError(f"cannot write the results to standard output: {e}") from None


def read_text(history_file: str) -> str:
    """The history file's text ('-': stdin); unreadable or non-UTF-8 input is a UserError."""
    try:
        if history_file == "-":
            if sys.stdin is None:
                raise UserError("standard input is closed: give a history file, or pipe one into -")
            data = sys.stdin.buffer.read(MAX_HISTORY_BYTES + 1)
        else:
            with open(history_file, "rb") as f:
                data = f.read(MAX_HISTORY_BYTES + 1)
        if len(data) > MAX_HISTORY_BYTES:
            raise UserError(f"history file {history_file} is larger than the limit of {MAX_HISTORY_BYTES:,} bytes; "
                            "split it into several files")
        return data.decode("utf-8-sig")
    except OSError as e:
        raise UserError(f"cannot read history file {history_file}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise UserError(f"history file {history_file} is not UTF-8 text (byte {e.start})") from None


def describe_invalid(invalid: list[InvalidEntry]) -> str:
    listed = "; ".join(f"{e.position}: {e.error}" for e in invalid[:MAX_LISTED])
    more = f"; and {len(invalid) - MAX_LISTED} more" if len(invalid) > MAX_LISTED else ""
    noun = "history" if len(invalid) == 1 else "histories"
    return f"{len(invalid)} invalid {noun}: {listed}{more}"


def result_json(request: HistoryRequest, rec: Recommendation) -> dict:
    return {
        "user": request.user,
        "items": rec.items,
        "scores": [round(s, 6) for s in rec.scores],
        "unknown_items": rec.unknown_items,
        "fallback": rec.fallback,
    }
