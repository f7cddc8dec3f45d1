"""The keys DeepSpeed itself reads from a ds_config, as data.

An importer that does not know a key must not call it a typo when DeepSpeed documents it: this
table decides between "a DeepSpeed key sdtrain leaves out (with the reason, deepspeed_keys.py)"
and "a name DeepSpeed does not read either" (which DeepSpeed ignores at the top level, so a
typo there goes unnoticed). Written from DeepSpeed's own source and docs: the keys that
deepspeed/runtime/config.py (`DeepSpeedConfig._initialize_params`) and the sub-configs it
builds read (monitor, comms, profiler, autotuning, compression, data pipeline, elasticity,
nebula, aio, tensor parallel), docs/_pages/config-json.md, up to DeepSpeed 0.16.5, plus the
keys later releases added (`torch_autocast` and `compile`, 0.16.6-0.17), and a few older
ones that configs still carry (`fp32_allreduce`).
"""

from __future__ import annotations

import difflib

# Top level. Grouped as DeepSpeed's config documentation groups them.
TOP_LEVEL = frozenset({
    # batch
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
    # optimizer and schedule
    "optimizer", "scheduler", "gradient_clipping", "zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer",
    # precision
    "fp16", "bf16", "bfloat16", "amp", "torch_autocast", "communication_data_type", "fp32_allreduce",
    "seq_parallel_communication_data_type", "data_types",
    # gradients and communication
    "prescale_gradients", "gradient_predivide_factor", "sparse_gradients", "disable_allgather",
    # parallelism and memory
    "zero_optimization", "pipeline", "tensor_parallel", "activation_checkpointing", "aio", "sparse_attention",
    "use_data_before_expert_parallelism", "compile", "graph_harvesting", "vocabulary_size",
    # logging and profiling
    "steps_per_print", "wall_clock_breakdown", "dump_state", "memory_breakdown", "flops_profiler", "comms_logger",
    "tensorboard", "wandb", "csv_monitor", "comet", "timers",
    # checkpoints and data
    "checkpoint", "nebula", "dataloader_drop_last", "elasticity", "autotuning",
    # training techniques
    "curriculum_learning", "data_efficiency", "progressive_layer_drop", "compression_training", "quantize_training",
    "weight_quantization", "eigenvalue", "hybrid_engine",
})

# Inside zero_optimization (DeepSpeedZeroConfig's fields and their aliases). DeepSpeed's
# pydantic model forbids other keys: a misspelled one there stops DeepSpeed too.
ZERO = frozenset({
    "stage", "contiguous_gradients", "reduce_scatter", "reduce_bucket_size", "use_multi_rank_bucket_allreduce",
    "allgather_partitions", "allgather_bucket_size", "overlap_comm", "load_from_fp32_weights", "elastic_checkpoint",
    "offload_param", "offload_optimizer", "sub_group_size", "cpu_offload_param", "cpu_offload_use_pin_memory",
    "cpu_offload", "prefetch_bucket_size", "stage3_prefetch_bucket_size", "param_persistence_threshold",
    "stage3_param_persistence_threshold", "model_persistence_threshold", "stage3_model_persistence_threshold",
    "max_live_parameters", "stage3_max_live_parameters", "max_reuse_distance", "stage3_max_reuse_distance",
    "gather_16bit_weights_on_model_save", "stage3_gather_16bit_weights_on_model_save",
    "stage3_gather_fp16_weights_on_model_save", "module_granularity_threshold", "stage3_module_granularity_threshold",
    "use_all_reduce_for_fetch_params", "stage3_use_all_reduce_for_fetch_params", "ignore_unused_parameters",
    "legacy_stage1", "round_robin_gradients", "zero_hpz_partition_size", "zero_quantized_weights",
    "zero_quantized_nontrainable_weights", "zero_quantized_gradients", "zeropp_loco_param", "mics_shard_size",
    "mics_hierarchical_params_gather", "memory_efficient_linear", "pipeline_loading_checkpoint",
    "override_module_apply", "log_trace_cache_warnings", "zenflow",
})


def closest(key: str, known: frozenset[str]) -> str:
    """' (did you mean X?)' for the nearest real key, or ''."""
    match = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.75)
    return f" (did you mean {match[0]!r}?)" if match else ""
