"""DeepSpeed config keys that have no sdtrain recipe key, each with the reason it is left out.

`SAME_NUMBERS` keys change where memory lives, how fast a step runs, or what is logged, but
not the values a training step computes: leaving them out is safe. `OTHER_NUMBERS` keys
change what is computed (an optimizer, a precision, a data schedule sdtrain does not have):
an import that meets one stops (exit 2) unless the user says `--lenient`. Every key DeepSpeed
reads (deepspeed_known.py) is in one of the two or has a converter; a name DeepSpeed does not
read either is most likely a typo, which DeepSpeed ignores at the top level: it counts as
changing the numbers until the user has looked. (Offload's keys are converted:
deepspeed_offload.py.)
"""

from __future__ import annotations

_DCP = "sdtrain writes DCP checkpoints, which load on any world size and stage"
_IMPL = "a DeepSpeed implementation detail: no effect on the values a step computes"
_PARAMETER_CACHE = ("a bound on DeepSpeed's parameter cache; sdtrain keeps the forward's last "
                     "1 + prefetch_blocks blocks whole into backward and frees every other block after use")

SAME_NUMBERS = {
    "wall_clock_breakdown": "timing printout; metrics.jsonl has step time and tokens/s at every logged step",
    "dump_state": "a debug printout of DeepSpeed's engine",
    "memory_breakdown": "a memory printout; metrics.jsonl has mem_gib at every logged step",
    "flops_profiler": "a profiler; metrics.jsonl reports MFU",
    "comms_logger": "communication logging; metrics.jsonl has comm_bytes, and `sdtrain bench comm` measures the links",
    "wandb": "a monitoring backend sdtrain lacks; metrics.jsonl holds the numbers",
    "csv_monitor": "a monitoring backend sdtrain lacks; metrics.jsonl holds the numbers",
    "comet": "a monitoring backend sdtrain lacks; metrics.jsonl holds the numbers",
    "autotuning": "sdtrain does not autotune; `sdtrain bench` measures the strategies side by side",
    "zero_allow_untested_optimizer": "a DeepSpeed guard for client optimizers; sdtrain's ZeRO runs its own AdamW",
    "zero_force_ds_cpu_optimizer": "a guard that DeepSpeed's own CPU Adam steps offloaded state; sdtrain steps it with "
                                   "torch's fused AdamW",
    "aio": "DeepSpeed's async-I/O (libaio) settings for NVMe offload: sdtrain reads and writes its offload files "
           "with threads and pread/pwrite",
    "checkpoint": _DCP,
    "prescale_gradients": "divides gradients before the all-reduce instead of after: the same average up to rounding",
    "gradient_predivide_factor": "splits the gradient averaging around the all-reduce: the same average up to rounding",
    "sparse_gradients": "sparse embedding gradients: the same values, dense in sdtrain",
    "dataloader_drop_last": "sdtrain's data order is its own, fixed by seed and step",
    "timers": "DeepSpeed's timers; metrics.jsonl has the step times",
    "nebula": "a checkpoint service; " + _DCP,
    "elasticity": "elastic batch sizes; sdtrain keeps train.global_batch_size fixed across world sizes",
    "graph_harvesting": "CUDA-graph capture of short kernel sequences: speed, not values",
    "disable_allgather": "ZeRO-1 broadcasts partitions instead of all-gathering them: the same values",
    "vocabulary_size": "a size hint for DeepSpeed's embedding handling; the recipe's vocabulary is model.vocab_size",
    "use_data_before_expert_parallelism": "the rank order of expert and data groups, a layout: sdtrain carves expert "
                                          "groups out of the data-parallel ranks",
    "seq_parallel_communication_data_type": "the gradient dtype of Ulysses sequence parallelism, which sdtrain does not "
                                            "have: nothing it would apply to",
    "tensor_parallel": "AutoTP tensor parallelism of the script's model: a layout sdtrain does not apply here (every rank "
                       "holds whole layers: the same values, more memory per rank)",
}

OTHER_NUMBERS = {
    "amp": "Apex AMP, which sdtrain lacks (train.precision fp16 is torch autocast with dynamic loss scaling)",
    "communication_data_type": "gradients are reduced in another dtype than sdtrain's (their own dtype)",
    "fp32_allreduce": "gradients are all-reduced in fp32; sdtrain reduces them in their own dtype",
    "data_types": "gradient accumulation in another dtype than sdtrain's",
    "sparse_attention": "a sparse attention pattern; sdtrain's GPT attends densely (causal)",
    "curriculum_learning": "a sequence-length curriculum; sdtrain trains at model.seq_len throughout",
    "data_efficiency": "data sampling and routing schedules sdtrain lacks",
    "progressive_layer_drop": "layer dropping during training, which sdtrain lacks",
    "compression_training": "quantization/pruning during training, which sdtrain lacks",
    "quantize_training": "quantized training, which sdtrain lacks",
    "weight_quantization": "quantized weights, which sdtrain lacks",
    "eigenvalue": "eigenvalue-based layer scaling, which sdtrain lacks",
    "hybrid_engine": "RLHF generation engine, which sdtrain lacks",
    "torch_autocast": "torch autocast over DeepSpeed's module list (lower_precision_safe_modules); sdtrain autocasts the "
                      "whole forward: choose it with --set train.precision=bf16 (or fp16)",
}

# Of those, the ones that only choose the autocast precision: a --set train.precision settles
# them (the user has chosen sdtrain's). Gradient and communication dtypes are another matter.
PRECISION_KEYS = {"amp", "torch_autocast"}

# Inside zero_optimization.
ZERO_SAME_NUMBERS = {
    "contiguous_gradients": "always on: sdtrain's gradients live in flat buffers",
    "allgather_partitions": "sdtrain gathers each bucket or block in one all_gather",
    "allgather_bucket_size": "sdtrain gathers each bucket (stages 1/2) or block (stage 3) whole",
    "reduce_scatter": "sdtrain reduce-scatters gradients (an all-reduce on gloo): the same average",
    "round_robin_gradients": "the order DeepSpeed copies gradients to the host under CPU offload: speed, not values",
    "stage3_max_live_parameters": _PARAMETER_CACHE,
    "max_live_parameters": _PARAMETER_CACHE,
    "stage3_max_reuse_distance": _PARAMETER_CACHE,
    "max_reuse_distance": _PARAMETER_CACHE,
    "stage3_gather_16bit_weights_on_model_save": "`sdtrain export` writes consolidated weights from any checkpoint",
    "stage3_gather_fp16_weights_on_model_save": "`sdtrain export` writes consolidated weights from any checkpoint",
    "gather_16bit_weights_on_model_save": "`sdtrain export` writes consolidated weights from any checkpoint",
    "elastic_checkpoint": _DCP,
    "load_from_fp32_weights": "sdtrain's checkpoints hold the fp32 master weights and resume from them",
    "ignore_unused_parameters": "every parameter of sdtrain's GPT receives a gradient",
    "legacy_stage1": _IMPL,
    "use_multi_rank_bucket_allreduce": _IMPL,
    "memory_efficient_linear": _IMPL,
    "stage3_module_granularity_threshold": _IMPL,
    "module_granularity_threshold": _IMPL,
    "use_all_reduce_for_fetch_params": _IMPL,
    "log_trace_cache_warnings": _IMPL,
    "pipeline_loading_checkpoint": _IMPL,
    "override_module_apply": _IMPL,
    "zero_hpz_partition_size": "hierarchical partitioning (ZeRO++ hpZ): a layout, not other values",
    "mics_shard_size": "MiCS sharding groups: a layout, not other values",
    "mics_hierarchical_params_gather": "MiCS gathering: a layout, not other values",
    "stage3_use_all_reduce_for_fetch_params": _IMPL,
    "model_persistence_threshold": "a bound on parameters kept whole on every rank: memory, not values",
    "stage3_model_persistence_threshold": "a bound on parameters kept whole on every rank: memory, not values",
}

ZERO_OTHER_NUMBERS = {
    "zero_quantized_weights": "ZeRO++ quantized weight gathering changes the values; sdtrain gathers in full precision",
    "zero_quantized_gradients": "ZeRO++ quantized gradients change the values; sdtrain reduces in full precision",
    "zero_quantized_nontrainable_weights": "quantized frozen weights; sdtrain trains every weight in full precision",
    "zeropp_loco_param": "ZeRO++ LoCo error feedback for quantized gradients; sdtrain reduces in full precision",
    "zenflow": "ZenFlow's CPU optimizer applies some updates steps late; sdtrain updates every weight each step",
}

# Inside activation_checkpointing: how DeepSpeed's checkpointing stores what it keeps.
CHECKPOINTING_SAME_NUMBERS = {
    "partition_activations": "splits checkpoints across model-parallel ranks; sdtrain has no tensor parallelism",
    "cpu_checkpointing": "keeps checkpoints in CPU memory: where memory lives, not what is computed",
    "contiguous_memory_optimization": _IMPL,
    "number_checkpoints": _IMPL,
    "synchronize_checkpoint_boundary": _IMPL,
    "profile": "timing printout",
}

# Inside fp16, beside the loss-scaler keys train.loss_scale takes (deepspeed_precision.py):
# what sdtrain's scaler does not do. Dynamic scaling skips the steps that overflow either way;
# these only move which steps that is, so they are listed but do not stop the import.
FP16_SCALER = {
    "consecutive_hysteresis": "true: sdtrain's scaler restores its chances only when the scale doubles "
                              "(DeepSpeed's default, false)",
    "auto_cast": "sdtrain's fp16 autocasts the forward pass always",
    "fp16_master_weights_and_grads": "sdtrain keeps fp32 weights under fp16 autocast",
}

# Parameters of Adam/AdamW that are the implementation, not the math.
ADAM_IMPLEMENTATION = {"torch_adam", "fused", "foreach", "capturable", "differentiable", "set_grad_none"}
