"""What one rank runs, in numbers: the input of every term (no torch, no recipe objects).

plan.py fills it from a recipe; suggest.py changes one field at a time (a ZeRO stage,
checkpointing, a smaller micro-batch) to see what each change would save.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass(frozen=True)
class RankShape:
    params: int  # parameters this rank's model part holds, whole (before ZeRO sharding; its tp piece under TP)
    layers: int  # Transformer blocks on this rank
    block_params: int  # the largest block's parameters (a ZeRO-3 gather unit)
    root_params: int  # embeddings / final norm / head on this rank (ZeRO-3's root unit)
    first: bool  # holds the embeddings
    last: bool  # holds the head and the loss
    d_model: int
    n_heads: int
    seq_len: int
    vocab_size: int
    mlp_ratio: int
    micro_batch: int
    in_flight: int  # micro-batches whose activations are alive at once (pipelines: more than 1)
    dp: int  # data-parallel ranks sharing ZeRO shards
    zero_stage: int
    reduce_bucket_mb: float
    prefetch_blocks: int
    precision: str  # fp32 | bf16 | fp16
    checkpointing: bool
    attention: str  # flash (no T x T scores kept) | math
    dropout: float
    device: str  # cpu | cuda
    loss_chunk_tokens: int
    data_bytes: int  # text the worker reads into memory (0 for token files, which are mapped)
    expert_params: int = 0  # of `params`, the experts' weights (all E of them)
    ep: int = 1  # expert-parallel ranks: each holds expert_params / ep of them whole
    moe_layers: int = 0  # blocks on this rank whose MLP is a mixture of experts
    expert_slots: int = 0  # capacity slots of one MoE layer for one micro-batch (E x C)
    tp: int = 1  # tensor-parallel ranks splitting each layer (params, block_params, root_params: one rank's)
    sequence_parallel: bool = False
    grad_accum: int = 1  # micro-batches of a step (every one passes every stage)
    pipelined: bool = False  # a pipeline stage: its DDP replicas average in step, not in DDP's buckets
    # under SP, the column-parallel layers gather their input again in backward (gpt2's; llama's
    # q/k/v and gate/up keep the one gather they share)
    regathered_inputs: bool = True
    # ZeRO-Offload / -Infinity (recipe parallel.zero): where the optimizer state and stage 3's
    # weight shards live. Effective values: `cpu` on a CPU rank is already `none` (plan.py).
    offload_optimizer: str = "none"
    offload_params: str = "none"
    sub_group_mb: float = 64.0
    buffer_count: int = 3

    @property
    def params_held(self) -> int:
        """Parameters this rank holds whole (before ZeRO sharding): the dense ones and its
        E / ep experts. Sharded, the experts are split over dp / ep ranks, so a rank's
        shard is params / dp either way."""
        return self.params - self.expert_params + self.expert_params // self.ep

    @property
    def tokens(self) -> int:
        """Tokens of one micro-batch."""
        return self.micro_batch * self.seq_len

    @property
    def sequence_split(self) -> int:
        """What divides the activations that stay whole under TP alone: T under SP, else 1."""
        return self.tp if self.sequence_parallel else 1

    @property
    def weight_bytes(self) -> int:
        """Bytes per element of the weights forward reads: bf16 / fp16 under ZeRO with bf16 /
        fp16 (beside fp32 master shards), else fp32 (DDP under autocast keeps fp32 weights and
        casts on the fly)."""
        return 2 if self.zero_stage and self.precision in ("bf16", "fp16") else 4

    def but(self, **changes) -> RankShape:
        return replace(self, **changes)
