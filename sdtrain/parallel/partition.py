"""Which layers each pipeline stage holds, and which schedules a layout allows. Torch-free:
the recipe checks it, `--dry-run` prints it, and every worker builds only its own layers.

The model is cut into P x V chunks of consecutive blocks (V > 1: interleaved, chunk c runs on
rank c mod P, so each rank holds V chunks spread over the depth). The first chunk also holds
the embeddings, the last the final norm and the output head (a copy of the tied embedding).
"""

from __future__ import annotations

from sdtrain.errors import RecipeError
from sdtrain.model.size import block_params, embedding_params, final_norm_params, head_params

SCHEDULES_NEEDING_P_MICRO_BATCHES = ("1f1b", "interleaved", "zero_bubble")


def chunk_count(pipeline) -> int:
    return pipeline.stages * pipeline.virtual_stages


def check_pipeline_layout(pipeline, n_layers: int) -> None:
    """ValueError (the recipe's validation turns it into a message with the key's path)."""
    chunks = chunk_count(pipeline)
    where = f"stages {pipeline.stages} x virtual_stages {pipeline.virtual_stages}" if pipeline.virtual_stages > 1 \
        else f"stages {pipeline.stages}"
    if chunks > n_layers:
        raise ValueError(f"parallel.pipeline: {where} = {chunks} chunks of layers, but model.n_layers is "
                         f"{n_layers}; every chunk needs a layer: use at most {n_layers}")
    partition = pipeline.partition
    if isinstance(partition, list):
        if len(partition) != chunks or min(partition) < 1 or sum(partition) != n_layers:
            raise ValueError(f"parallel.pipeline.partition {partition}: give {chunks} layer counts ({where}), each "
                             f"at least 1, adding up to model.n_layers {n_layers}")
    elif pipeline.schedule == "interleaved" and partition == "uniform":
        per_rank, rest = divmod(n_layers, pipeline.stages)
        if rest or per_rank % pipeline.virtual_stages:
            raise ValueError(
                f"parallel.pipeline: interleaved with uniform partition needs n_layers {n_layers} to split evenly "
                f"into {pipeline.stages} ranks x {pipeline.virtual_stages} virtual stages; "
                "change virtual_stages, or give partition as a list of layer counts"
            )


def check_schedule(pipeline, micro_batches: int) -> None:
    """The schedule against the step's micro-batches (train.grad_accum_steps), at launch."""
    P, M = pipeline.stages, micro_batches
    if P == 1:
        return
    if pipeline.schedule in SCHEDULES_NEEDING_P_MICRO_BATCHES and M < P:
        raise RecipeError(
            f"parallel.pipeline.schedule {pipeline.schedule} with {P} stages needs at least {P} micro-batches per "
            f"step, and train.grad_accum_steps is {M}: raise grad_accum_steps to {P} or more (a smaller "
            "micro_batch_size for the same global batch), or use schedule gpipe"
        )
    if pipeline.schedule == "interleaved" and M % P:
        raise RecipeError(
            f"parallel.pipeline.schedule interleaved runs micro-batches in groups of the {P} stages, and "
            f"train.grad_accum_steps {M} is not a multiple of {P}; use {(M // P + 1) * P}"
        )


def partition_layers(pipeline, model_cfg) -> list[list[int]]:
    """Global block indices of each chunk, in chunk order."""
    counts = _layer_counts(pipeline, model_cfg)
    chunks, start = [], 0
    for count in counts:
        chunks.append(list(range(start, start + count)))
        start += count
    return chunks


def chunks_of_rank(stage: int, pipeline) -> list[int]:
    """The chunks a pipeline stage (rank of the pipeline) runs, first to last."""
    return [v * pipeline.stages + stage for v in range(pipeline.virtual_stages)]


def stage_layers(pipeline, model_cfg, stage: int, partition: list[list[int]] | None = None,
                 ) -> tuple[list[int], bool, bool]:
    """What one pipeline stage builds: its blocks' global indices, and whether it holds the
    embeddings (the first chunk) and the final norm and head (the last). `partition`: the
    chunks' layers if already made (the worker makes them once, for the model and the pipeline)."""
    layers = partition if partition is not None else partition_layers(pipeline, model_cfg)
    mine = chunks_of_rank(stage, pipeline)
    return [i for c in mine for i in layers[c]], 0 in mine, chunk_count(pipeline) - 1 in mine


def chunk_params(chunk: int, layers: list[int], chunks: int, model_cfg) -> int:
    """Parameters a chunk holds: its blocks, plus the embeddings on the first and the final
    norm and head on the last (a tied head: its copy, none where the embedding is there too)."""
    total = sum(block_params(model_cfg, i) for i in layers)
    if chunk == 0:
        total += embedding_params(model_cfg)
    if chunk == chunks - 1:
        total += final_norm_params(model_cfg) + head_params(model_cfg, first=chunk == 0)
    return total


def _layer_counts(pipeline, model_cfg) -> list[int]:
    chunks, L = chunk_count(pipeline), model_cfg.n_layers
    if isinstance(pipeline.partition, list):
        return list(pipeline.partition)
    if pipeline.partition == "uniform":
        base, rest = divmod(L, chunks)
        return [base + (1 if c < rest else 0) for c in range(chunks)]  # the remainder goes first
    return _balanced_counts(chunks, model_cfg)


def _balanced_counts(chunks: int, model_cfg) -> list[int]:
    """Consecutive layer counts that minimise the largest chunk's parameters (embeddings on
    the first chunk and the head on the last count too); ties go to the earlier split."""
    L = model_cfg.n_layers

    def cost(chunk: int, count: int) -> int:
        return chunk_params(chunk, range(count), chunks, model_cfg)

    # best[c][n]: the smallest possible largest chunk when chunks 0..c hold the first n layers
    INF = float("inf")
    best = [[INF] * (L + 1) for _ in range(chunks)]
    choice = [[0] * (L + 1) for _ in range(chunks)]
    for n in range(1, L + 1):
        best[0][n] = cost(0, n)
        choice[0][n] = n
    for c in range(1, chunks):
        for n in range(c + 1, L + 1):
            for last in range(1, n - c + 1):
                value = max(best[c - 1][n - last], cost(c, last))
                if value < best[c][n]:
                    best[c][n], choice[c][n] = value, last
    counts, n = [], L
    for c in range(chunks - 1, -1, -1):
        counts.append(choice[c][n])
        n -= choice[c][n]
    return counts[::-1]


def describe_stages(pipeline, model_cfg) -> list[dict]:
    """Per pipeline stage: its chunks' layers and parameter count (for --dry-run)."""
    layers = partition_layers(pipeline, model_cfg)
    chunks = chunk_count(pipeline)
    rows = []
    for stage in range(pipeline.stages):
        mine = chunks_of_rank(stage, pipeline)
        rows.append({
            "stage": stage,
            "layers": [layers[c] for c in mine],
            "params": sum(chunk_params(c, layers[c], chunks, model_cfg) for c in mine),
        })
    return rows
