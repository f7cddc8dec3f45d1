"""The recipe schema: every section, key, type, range and default, and the checks that
span sections (strategies that do not combine). Every section forbids unknown keys, so a
typo is an error naming its dotted path and the closest real key, never a silently ignored
setting.

Reading a file and `--set` overrides: recipe_load.py; enum values YAML reads as booleans:
recipe_booleans.py; where expert parallelism fits: recipe_experts.py. Their public names
are imported from here too, as callers always have.
"""

from __future__ import annotations

from typing import Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, model_validator

from sdtrain.divisors import divisors
from sdtrain.model.size import kv_heads, mlp_width
from sdtrain.errors import RecipeError  # callers import it from here too
from sdtrain.recipe_arch import arch_defaults, arch_problem
from sdtrain.parallel.partition import check_pipeline_layout
from sdtrain.parallel.tp_checks import check_tensor_parallel
from sdtrain.recipe_booleans import YAML_BOOLEAN_WORDS, enum_values, spell_enum_booleans  # noqa: F401
from sdtrain.recipe_experts import LAYOUT_CHECKED_AT_LAUNCH, check_expert_layout, expert_layout_problem  # noqa: F401
from sdtrain.recipe_load import (  # noqa: F401 - reading recipes; it imports the schema only when called
    MAX_RECIPE_BYTES,
    MAX_RECIPE_NODES,
    apply_override,
    load_recipe,
    parse_yaml,
    validate_recipe,
)


class Section(BaseModel):
    # strict: `steps: true` or `lr: "fast"` is an error, not 1 or a crash later; finite:
    # `lr: .inf` is refused here rather than turning the first step into NaN.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _enum_values_yaml_read_as_booleans(cls, data):
        return spell_enum_booleans(cls.model_fields, data)  # `memory_check: off` is "off", not False


class MoEConfig(Section):
    num_experts: int = Field(0, ge=0, description="experts E in each MoE MLP; 0: a dense model (no MoE)")
    top_k: int = Field(2, ge=1, description="experts each token is sent to")
    every_n_layers: int = Field(2, ge=1, description=(
        "an MoE MLP in every n-th block (blocks n-1, 2n-1, ...); 2: every other block, 1: all"))
    capacity_factor: float = Field(1.25, gt=0.0, description=(
        "training capacity per expert: ceil(k x tokens / E x capacity_factor) slots"))
    eval_capacity_factor: float = Field(2.0, gt=0.0, description="capacity factor in evaluation")
    min_capacity: int = Field(4, ge=0, description="slots per expert at least")
    drop_tokens: bool = Field(True, description=(
        "drop what exceeds capacity (the residual carries it); false: dropless, capacity = the largest load"))
    aux_loss_coef: float = Field(0.01, ge=0.0, description="weight of the load-balancing loss")
    z_loss_coef: float = Field(0.0, ge=0.0, description="weight of the router z-loss")
    balance: Literal["aux_loss", "bias"] = Field("aux_loss", description=(
        "`aux_loss`; `bias`: aux-loss-free, a per-expert selection bias nudged toward equal load each step"))

    @model_validator(mode="after")
    def _k_fits(self):
        if self.num_experts and self.top_k > self.num_experts:
            raise ValueError(f"top_k {self.top_k} exceeds num_experts {self.num_experts}; "
                             f"use top_k <= {self.num_experts}")
        return self


class RopeScalingConfig(Section):
    rope_type: Literal["llama3"] = Field("llama3", description="Llama 3's scaling (Llama 3.1 and 3.2 use it)")
    factor: float = Field(8.0, ge=1.0, description="the long wavelengths are slowed down by this")
    low_freq_factor: float = Field(1.0, gt=0.0, description=(
        "wavelengths past original_max_position_embeddings / this are scaled"))
    high_freq_factor: float = Field(4.0, gt=0.0, description=(
        "wavelengths below original_max_position_embeddings / this are left alone; between: interpolated"))
    original_max_position_embeddings: int = Field(8192, ge=1, description="the context of the first training")

    @model_validator(mode="after")
    def _factors_ordered(self):
        if self.high_freq_factor <= self.low_freq_factor:
            raise ValueError(f"high_freq_factor {self.high_freq_factor} must exceed low_freq_factor "
                             f"{self.low_freq_factor}")
        return self


class ModelConfig(Section):
    n_layers: int = Field(4, ge=1, description="Transformer blocks")
    d_model: int = Field(128, ge=8, description="width of the residual stream")
    n_heads: int = Field(4, ge=1, description="attention heads; divides d_model")
    seq_len: int = Field(128, ge=2, description="tokens per sample (the context length)")
    vocab_size: int = Field(256, ge=2, description="token ids; 256 for the byte tokenizer")
    mlp_ratio: int = Field(4, ge=1, description="MLP hidden width as a multiple of d_model (gpt2)")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout probability")
    bias: Optional[bool] = Field(None, description=(
        "biases in the linear layers and norms; null: true for gpt2, false for llama (which has none)"))
    moe: MoEConfig = MoEConfig()
    arch: Literal["gpt2", "llama"] = Field("gpt2", description=(
        "`gpt2` (LayerNorm, learned positions, GELU MLP, tied head); `llama` (RMSNorm, rotary positions, "
        "grouped-query attention, SwiGLU MLP, no biases)"))
    n_kv_heads: Optional[int] = Field(None, ge=1, description=(
        "llama: key/value heads, dividing n_heads (1: multi-query); null: n_heads"))
    rope_theta: Optional[float] = Field(None, gt=0.0, description="llama: the rotary embedding's base; null: 10000")
    rope_scaling: Optional[RopeScalingConfig] = Field(None, description=(
        "llama: Llama 3's scaling of the rotary embedding's long wavelengths (`rope_type: llama3`); null: none"))
    ffn_hidden: Optional[int] = Field(None, ge=1, description=(
        "llama: the SwiGLU MLP's hidden width; null: 8/3 x d_model rounded up to a multiple of 256 (LLaMA's)"))
    tie_embeddings: Optional[bool] = Field(None, description=(
        "the output head is the token embedding; null: true for gpt2, false for llama"))
    norm_eps: Optional[float] = Field(None, gt=0.0, description="epsilon of the LayerNorms / RMSNorms; null: 1e-5")
    activation: Literal["gelu", "gelu_tanh"] = Field("gelu", description=(
        "gpt2's MLP: `gelu` (exact) or `gelu_tanh` (the tanh approximation OpenAI's GPT-2 weights were trained "
        "with, transformers' gelu_new)"))
    init_from: Optional[str] = Field(None, description=(
        "a Hugging Face model folder (config.json, model.safetensors or its index; GPT-2, LLaMA, Mixtral) whose "
        "weights replace the first ones; its config.json must describe this model"))

    @model_validator(mode="after")
    def _heads_divide_width(self):
        if self.d_model % self.n_heads:
            raise ValueError(
                f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}; "
                f"pick n_heads from {divisors(self.d_model)}"
            )
        if self.moe.num_experts and self.moe.every_n_layers > self.n_layers:
            raise ValueError(f"moe.every_n_layers {self.moe.every_n_layers} exceeds n_layers {self.n_layers}: "
                             f"no block would get experts; use 1..{self.n_layers}")
        problem = arch_problem(self)
        if problem:
            raise ValueError(problem)
        for key, value in arch_defaults(self).items():
            if getattr(self, key) != value:
                setattr(self, key, value)  # validate_assignment runs this again: then it is settled
        return self


class DataConfig(Section):
    # "stdlib" is the embedded corpus (this Python's standard library sources, no download);
    # anything else is a path: a text file, a folder of them, a .jsonl file, or a
    # nanoGPT-style folder / file of uint16 tokens (.bin).
    source: str = Field("stdlib", description=(
        "`stdlib` (embedded corpus: this Python's standard library sources), a text file or folder, a `.jsonl` file "
        '(`"text"` field), a `.bin` file or a nanoGPT folder (`train.bin`, `val.bin`, uint16)'))
    format: Literal["auto", "text", "jsonl", "bin"] = Field("auto", description=(
        "`auto` detects it from the source; `text`, `jsonl`, `bin` override"))
    tokenizer: Optional[str] = Field(None, description=(
        "null: bytes (vocab 256); else a `tokenizer.json` path (needs `pip install 'sdtrain[tokenizers]'`)"))
    val_fraction: float = Field(0.05, gt=0.0, lt=0.5, description="the held-out tail of the data, for eval")
    max_bytes: int = Field(16 * 2**20, ge=1024, description="cap on text read from `stdlib` or a folder (16 MiB)")


class LossScaleConfig(Section):
    initial_scale_power: int = Field(16, ge=0, le=64, description=(
        "fp16: the loss scale starts at 2^this (DeepSpeed's fp16.initial_scale_power)"))
    window: int = Field(1000, ge=1, description=(
        "fp16: steps without an overflow before the scale doubles (DeepSpeed's loss_scale_window)"))
    hysteresis: int = Field(2, ge=1, description=(
        "fp16: overflows the scale tolerates before it halves; restored when it doubles (DeepSpeed's hysteresis)"))
    min_scale: float = Field(1.0, gt=0.0, description=(
        "fp16: the scale never halves below this; an overflow there stops the run (DeepSpeed's min_loss_scale)"))
    static: float = Field(0.0, ge=0.0, description=(
        "fp16: 0 scales dynamically; else this fixed scale (overflowing steps are still skipped; DeepSpeed's "
        "fp16.loss_scale)"))


class TrainConfig(Section):
    steps: int = Field(100, ge=1, description="optimizer steps")
    seed: int = Field(1337, ge=0, le=2**63 - 1, description=(  # torch takes 64-bit seeds; rank offsets are added
        "first weights, sample order and dropout all follow from it"))
    precision: Literal["fp32", "bf16", "fp16"] = Field("fp32", description=(
        "`fp32`; `bf16` (autocast; bf16 weights with fp32 master under ZeRO); `fp16` (autocast with dynamic loss "
        "scaling, train.loss_scale; fp16 weights with fp32 master under ZeRO)"))
    global_batch_size: Optional[int] = Field(None, ge=1, description=(
        "samples per step; any two of global_batch_size, micro_batch_size, grad_accum_steps decide the third (global = "
        "micro x grad_accum x data parallel)"))
    micro_batch_size: Optional[int] = Field(None, ge=1, description="samples per forward and backward on one rank")
    grad_accum_steps: Optional[int] = Field(None, ge=1, description=(
        "micro-batches per step on each rank (under pipelining, the micro-batches of a step)"))
    lr: float = Field(6e-4, gt=0.0, description="peak learning rate (AdamW)")
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0, description=(
        "the learning rate at the last step, as a fraction of lr"))
    warmup_steps: int = Field(0, ge=0, description="linear warmup from lr/(warmup_steps+1) up to lr")
    decay: Literal["cosine", "linear", "constant"] = Field("cosine", description=(
        "after warmup, down to min_lr_ratio x lr at the last step"))
    weight_decay: float = Field(0.1, ge=0.0, description=(
        "AdamW's decoupled weight decay, on weight matrices (not biases or norms)"))
    beta1: float = Field(0.9, ge=0.0, lt=1.0, description="AdamW's first-moment decay")
    beta2: float = Field(0.95, ge=0.0, lt=1.0, description="AdamW's second-moment decay")
    eps: float = Field(1e-8, gt=0.0, description="AdamW's epsilon")
    grad_clip: float = Field(1.0, ge=0.0, description=(
        "clip the global gradient norm (across all shards) to this; 0 disables"))
    resume: str = Field("never", description=(
        "`never`, `auto` (the run directory's latest checkpoint) or a checkpoint or run directory path"))
    compile: bool = Field(False, description="torch.compile each block (not with ZeRO stage 3)")
    activation_checkpointing: bool = Field(False, description=(
        "recompute each block's activations in backward instead of keeping them"))
    eval_every: int = Field(0, ge=0, description=(
        "evaluate every N steps (and once before training); 0: only at the end"))
    eval_batches: int = Field(4, ge=1, description="batches per evaluation")
    peak_flops: Optional[float] = Field(None, gt=0.0, description=(
        "per-device peak FLOP/s for MFU, where the device is not in sdtrain's table"))
    loss_chunk_tokens: int = Field(1024, ge=0, description=(
        "the output head and the loss go this many tokens at a time, never all the logits at once; 0: all at once"))
    on_nonfinite: Literal["stop", "skip"] = Field("stop", description=(
        "a NaN/inf loss or gradient norm on any rank: `stop` the run (exit 1, the last checkpoint stays the latest), "
        "or `skip` that update on every rank alike (fp16's loss scaler keeps its own handling of gradients)"))
    max_skipped_steps: int = Field(10, ge=0, description=(
        "with on_nonfinite skip: more updates than this skipped in a row stop the run"))
    loss_scale: LossScaleConfig = Field(LossScaleConfig(), description=(
        "fp16's dynamic loss scaling (every strategy): an overflow on any rank skips the step on all of them"))

    @model_validator(mode="after")
    def _warmup_fits(self):
        if self.warmup_steps > self.steps:
            raise ValueError(
                f"warmup_steps {self.warmup_steps} exceeds steps {self.steps}; "
                "lower warmup_steps or raise steps"
            )
        return self


class ZeroConfig(Section):
    reduce_bucket_mb: float = Field(25.0, gt=0.0, description="stages 1/2: gradient bucket size in MB (2^20 bytes)")
    overlap_comm: bool = Field(True, description="stages 2/3: reduce-scatter gradients while backward goes on")
    prefetch_blocks: int = Field(1, ge=0, description="stage 3: blocks gathered ahead of the one running")
    persistence_threshold: int = Field(0, ge=0, description=(
        "stage 3: parameters with fewer elements than this stay whole on every rank"))
    offload_optimizer: Literal["none", "cpu", "nvme"] = Field("none", description=(
        "where the fp32 master weights and Adam moments live and step (ZeRO-Offload / -Infinity): `none` beside "
        "the model; `cpu` in host memory, stepped on the host (on a machine without a GPU the same as none); "
        "`nvme` in files under nvme_path, stepped in sub-groups streamed through a bounded double buffer"))
    offload_params: Literal["none", "cpu", "nvme"] = Field("none", description=(
        "stage 3: where each rank's weight shards live between gathers (`cpu`: host memory; `nvme`: files "
        "under nvme_path, read ahead of the block's gather)"))
    nvme_path: Optional[str] = Field(None, max_length=4096, description=(
        "folder for nvme offload files (removed at exit; never the checkpoint); null: offload/ in the run "
        "directory. Point it at a fast local disk"))
    sub_group_mb: float = Field(64.0, gt=0.0, description=(
        "nvme: optimizer state is read, stepped and written back this many MB (2^20 bytes) of parameters at a "
        "time; resident memory holds buffer_count such groups, not the state (DeepSpeed's sub_group_size)"))
    buffer_count: int = Field(3, ge=2, le=16, description=(
        "nvme: sub-group buffers in flight (3: read the next, step this one, write the last back)"))
    pin_memory: bool = Field(True, description=(
        "cpu / nvme on a GPU: page-locked host buffers, so copies to and from the device overlap compute"))


class PipelineConfig(Section):
    stages: int = Field(1, ge=1, description=(
        "pipeline stages P; the micro-batches of a step are train.grad_accum_steps"))
    schedule: Literal["gpipe", "1f1b", "interleaved", "zero_bubble"] = Field("1f1b", description=(
        "the order of forward and backward micro-batches on each stage"))
    virtual_stages: int = Field(1, ge=1, description="chunks of layers per rank (schedule `interleaved`)")
    # uniform: the remainder of n_layers / (P x V) goes to the first stages; parameters:
    # balance parameter counts (embeddings and head included); or layer counts per chunk.
    partition: Union[Literal["uniform", "parameters"], list[int]] = Field("uniform", description=(
        "layers per stage: `uniform`, `parameters` (balance parameter counts), or a list of layer counts per chunk"))

    @model_validator(mode="after")
    def _virtual_stages_go_with_interleaving(self):
        if self.schedule == "interleaved" and self.virtual_stages < 2:
            raise ValueError("schedule interleaved needs virtual_stages >= 2 (chunks of layers per rank); "
                             "with one chunk per rank use schedule 1f1b")
        if self.schedule != "interleaved" and self.virtual_stages > 1:
            raise ValueError(f"virtual_stages {self.virtual_stages} goes with schedule interleaved, not {self.schedule}")
        return self


class ParallelConfig(Section):
    zero_stage: int = Field(0, ge=0, le=3, description=(
        "0 data parallel; 1 shards optimizer state; 2 and gradients; 3 and weights"))
    zero: ZeroConfig = ZeroConfig()
    pipeline: PipelineConfig = PipelineConfig()
    expert_parallel: int = Field(1, ge=1, description=(
        "EP: the experts of each MoE MLP split over this many ranks of each data-parallel group"))
    tensor_parallel: int = Field(1, ge=1, description=(
        "TP: each layer's heads, MLP width and vocabulary split over this many consecutive ranks (Megatron-style; "
        "keep them inside one node); data parallel is world / (pipeline stages x tensor_parallel)"))
    sequence_parallel: Optional[bool] = Field(None, description=(
        "with tensor_parallel > 1, norms, dropout and residuals split along the sequence too (their activations / "
        "T; all-gathers and reduce-scatters in place of all-reduces); null: true when tensor_parallel > 1; at "
        "tensor_parallel 1 there is nothing to split and it resolves to false"))

    @model_validator(mode="after")
    def _offload_goes_with_zero(self):
        zero = self.zero
        if self.zero_stage == 0 and (zero.offload_optimizer != "none" or zero.offload_params != "none"):
            raise ValueError("parallel.zero.offload_optimizer / offload_params need ZeRO: set parallel.zero_stage "
                             "1, 2 or 3 (offload_params: 3), or offload none")
        if zero.offload_params != "none" and self.zero_stage != 3:
            raise ValueError(f"parallel.zero.offload_params {zero.offload_params} offloads stage 3's weight shards; "
                             f"set parallel.zero_stage 3 (it is {self.zero_stage}) or offload_params none")
        return self

    @model_validator(mode="after")
    def _sequence_parallel_resolved(self):
        # Resolved here, not at use, so recipe.yaml in the run directory says what ran. An
        # explicit true at T = 1 is harmless (there is no group to split over): false.
        resolved = self.tensor_parallel > 1 and self.sequence_parallel is not False
        if self.sequence_parallel is not resolved:
            self.sequence_parallel = resolved  # validate_assignment runs this again: then it is settled
        return self


class LaunchSection(Section):
    nproc_per_node: Union[int, Literal["auto"]] = Field("auto", description=(
        "workers per node; `auto`: one per GPU, or 1 on CPU"))
    backend: Literal["auto", "gloo", "nccl"] = Field("auto", description="`auto`: NCCL on CUDA, gloo on CPU")
    master_port: Optional[int] = Field(None, ge=1024, le=65535, description=(
        "rendezvous port of a multi-node job (a job on one machine listens on none); null: a free port (29500 "
        "when the master is another machine)"))
    timeout_s: int = Field(300, ge=10, description=(
        "collective timeout: how long a hang may last before it fails the run"))
    memory_check: Literal["error", "warn", "off"] = Field("error", description=(
        "before starting workers, the memory estimate per rank against what each rank may have: `error` refuses a "
        "plan that will not fit (exit 2, with the changes that would fit), `warn` only says so, `off` skips it"))
    hang_timeout_s: float = Field(300.0, gt=0, description=(
        "a rank that begins no step and completes no collective for this long (3x on a process's first step) "
        "is a hang: every rank's stack and last collectives go to hang/, the launcher names the stuck rank "
        "and stops the job"))
    max_restarts: int = Field(0, ge=0, le=100, description=(
        "a failed worker stops every worker of the job, which then restarts from the latest verified checkpoint "
        "(or step 0), up to this many times, waiting 1 s, 2 s, 4 s ... (at most 60 s) before each; "
        "each restart goes to restarts.jsonl"))

    @model_validator(mode="after")
    def _positive_procs(self):
        if isinstance(self.nproc_per_node, int) and self.nproc_per_node < 1:
            raise ValueError("nproc_per_node must be at least 1 (or 'auto')")
        return self


class CheckpointConfig(Section):
    every: int = Field(0, ge=0, description="save every N steps; 0: only at the end")
    keep: int = Field(2, ge=1, description="checkpoints kept (older ones are removed)")
    at_end: bool = Field(True, description="save after the last step")
    on_preempt: bool = Field(False, description=(
        "SIGTERM/SIGUSR1 to the launcher (or SIGUSR1 to the node agents, as Slurm's --signal sends it): the workers "
        "finish the step, save a checkpoint there, and the launcher exits 3 (launcher/slurm.sbatch requeues on it)"))
    async_save: bool = Field(False, description=(
        "save checkpoints in the background (torch.distributed.checkpoint.async_save): training goes on while "
        "the files are written; the manifest and `latest` follow when they are complete"))

    @model_validator(mode="after")
    def _preempt_needs_checkpoints(self):
        if self.on_preempt and not (self.every or self.at_end):
            raise ValueError("on_preempt saves a checkpoint to resume from, but checkpointing is off (every 0, "
                             "at_end false): set checkpoint.every (or at_end true), or on_preempt false")
        return self


class LogConfig(Section):
    every: int = Field(10, ge=1, description="write metrics every N steps")
    tensorboard: bool = Field(False, description=(
        "also write TensorBoard logs (needs `pip install 'sdtrain[tensorboard]'`)"))


class Recipe(Section):
    name: str = Field("run", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=128, description=(
        "the run directory's name under `runs/`"))
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    parallel: ParallelConfig = ParallelConfig()
    launch: LaunchSection = LaunchSection()
    checkpoint: CheckpointConfig = CheckpointConfig()
    log: LogConfig = LogConfig()

    @model_validator(mode="after")
    def _strategy_options_compatible(self, info: ValidationInfo):
        stage, train = self.parallel.zero_stage, self.train
        if stage == 3 and train.compile:
            raise ValueError(
                "parallel.zero_stage 3 with train.compile: stage 3 gathers and frees each block's "
                "weights in hooks around it, which torch.compile cannot trace; use zero_stage 2, "
                "or compile: false"
            )
        self._check_experts(checked_at_launch=bool((info.context or {}).get(LAYOUT_CHECKED_AT_LAUNCH)))
        self._check_tensor_parallel()
        pipeline = self.parallel.pipeline
        if pipeline.stages > 1:
            check_pipeline_layout(pipeline, self.model.n_layers)
            if pipeline.schedule == "zero_bubble" and (train.activation_checkpointing or train.compile):
                raise ValueError("parallel.pipeline.schedule zero_bubble splits each block's backward through hooks "
                                 "on its layers, which activation checkpointing and torch.compile would bypass; "
                                 "turn those off, or use schedule 1f1b")
        return self

    def _check_experts(self, checked_at_launch: bool):
        moe, ep = self.model.moe, self.parallel.expert_parallel
        if not moe.num_experts:
            if ep > 1:
                raise ValueError(f"parallel.expert_parallel {ep} without experts (model.moe.num_experts 0): there "
                                 "is nothing to split; set model.moe.num_experts, or expert_parallel 1")
            return
        if moe.num_experts % ep and not checked_at_launch:  # the launcher checks it with the world size known
            raise ValueError(expert_layout_problem(moe.num_experts, ep))
        pipeline = self.parallel.pipeline
        if pipeline.stages > 1 and pipeline.schedule == "zero_bubble":
            raise ValueError("model.moe with parallel.pipeline.schedule zero_bubble: its split backward defers the "
                             "weight gradients of Linear and LayerNorm layers only, and the experts' batched "
                             "weights would get none; use schedule 1f1b")

    def _check_tensor_parallel(self):
        """The model's shape against T (heads, MLP width, vocabulary, sequence): facts of the
        recipe alone, so every command refuses them before anything starts."""
        model, parallel = self.model, self.parallel
        try:
            check_tensor_parallel(parallel.tensor_parallel, model.n_heads, mlp_width(model),
                                  model.vocab_size, model.seq_len, parallel.sequence_parallel,
                                  *((kv_heads(model), "model.ffn_hidden") if model.arch == "llama" else ()))
        except RecipeError as exc:
            raise ValueError(str(exc)) from None  # worded as every other recipe error, with its source

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)
