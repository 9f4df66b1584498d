"""The Triton Inference Server models (Python backend) that serve the runtime: `mp4sr` ranks
histories, `mp4sr_catalogue` adds and removes items. The repository's model.py files import these
classes (repository.py writes them); Triton's Python backend stub runs them, one process per
instance, so this module is imported only there (triton_python_backend_utils exists nowhere else).

Every instance holds its own Scorer. A catalogue change is committed to the artifact directory
as a new version (mp4sr_rt/catalogue.py) before its response is sent, and every `mp4sr`
instance calls Scorer.refresh() (one stat of manifest.json) before each batch: an item added or
removed is served by every instance from the next request on, and after a restart.
"""

from __future__ import annotations

import json
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from mp4sr_rt import catalogue
from mp4sr_rt.errors import ArtifactError, UserError
from mp4sr_rt.scorer import Scorer
from mp4sr_rt.serving.protocol import FEATURE_INPUTS, RECOMMEND_INPUTS, outputs, parse_change, parse_queries


def _scorer(args: dict) -> Scorer:
    """The Scorer the model config's parameters name (artifacts: relative to the model folder)."""
    config = json.loads(args["model_config"])
    parameters = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
    artifacts = Path(args["model_repository"]) / parameters["artifacts"]
    return Scorer(artifacts.resolve(), backend=parameters.get("backend", "auto"),
                  threads=int(parameters.get("threads", "0")))


def _error(e: Exception) -> pb_utils.InferenceResponse:
    """A request's error response: the request's mistakes are INVALID_ARG (HTTP 400), the rest
    (damaged artifacts included) INTERNAL (HTTP 500), logged with their traceback."""
    users = isinstance(e, UserError) and not isinstance(e, ArtifactError)
    code = pb_utils.TritonError.INVALID_ARG if users else pb_utils.TritonError.INTERNAL
    message = str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}"
    if not users:
        print(traceback.format_exc(), flush=True)
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message, code))


def _inputs(request, names) -> dict[str, np.ndarray]:
    found = {}
    for name in names:
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        if tensor is not None:
            found[name] = tensor.as_numpy()
    return found


def _response(arrays: dict[str, np.ndarray]) -> pb_utils.InferenceResponse:
    return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(n, a) for n, a in arrays.items()])


class RecommendModel:
    """`mp4sr`: the rows of every request of a batch ranked together, grouped by their settings
    (k, exclude_seen, filters): one Scorer.score call per group."""

    def initialize(self, args: dict) -> None:
        self.scorer = _scorer(args)

    def execute(self, requests: list) -> list:
        try:
            self.scorer.refresh()
        except Exception as e:  # a damaged new version: this batch fails, the next one retries
            return [_error(e) for _ in requests]
        responses: list = [None] * len(requests)
        queries = {}
        for i, request in enumerate(requests):
            try:
                queries[i] = parse_queries(_inputs(request, RECOMMEND_INPUTS), self.scorer.num_items)
            except UserError as e:
                responses[i] = _error(e)
        groups: dict[tuple, list[tuple[int, int]]] = {}
        for i, rows in queries.items():
            for b, query in enumerate(rows):
                groups.setdefault(query.settings(), []).append((i, b))
        results: dict[int, list] = {i: [None] * len(rows) for i, rows in queries.items()}
        for (k, exclude_seen, exclude, allow), members in groups.items():
            try:
                recs = self.scorer.score([queries[i][b].history for i, b in members], k=k,
                                         exclude_seen=exclude_seen, exclude=exclude, allow=allow)
            except Exception as e:
                for i, _ in members:
                    responses[i] = _error(e)
                continue
            for (i, b), rec in zip(members, recs, strict=True):
                results[i][b] = rec
        for i, recs in results.items():
            if responses[i] is None:
                responses[i] = _response(outputs(recs))
        return responses


class CatalogueModel:
    """`mp4sr_catalogue`: one change per request, committed as a new catalogue version."""

    def initialize(self, args: dict) -> None:
        self.scorer = _scorer(args)

    def execute(self, requests: list) -> list:
        responses = []
        for request in requests:
            try:
                change = parse_change(_inputs(request, ("action", "ids", "texts", "images", *FEATURE_INPUTS)))
                version = catalogue.update(self.scorer, _apply(change))
                responses.append(_response({"version": np.array([version], np.int64),
                                            "num_items": np.array([self.scorer.num_items], np.int64)}))
            except Exception as e:
                responses.append(_error(e))
        return responses


def _apply(change) -> Callable[[Scorer], None]:
    def apply(scorer: Scorer) -> None:
        if change.action == "remove":
            scorer.remove_items(change.ids)
        else:
            scorer.add_items(change.ids, texts=change.texts, images=change.images, **(change.features or {}))
    return apply
