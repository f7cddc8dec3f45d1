"""YAML recipe -> validated Recipe.

Every section forbids unknown keys, so a typo is an error naming its dotted path and the
closest real key, never a silently ignored setting. `--set a.b=c` overrides are applied to
the raw YAML before validation, so they get exactly the same checks.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from sdtrain.errors import RecipeError, decode_utf8, excerpt

MAX_RECIPE_BYTES = 1 << 20  # a recipe is a page of YAML; anything near this is a mistake
MAX_RECIPE_NODES = 10_000  # values after YAML aliases are expanded: refuses "billion laughs"


class Section(BaseModel):
    # strict: `steps: true` or `lr: "fast"` is an error, not 1 or a crash later; finite:
    # `lr: .inf` is refused here rather than turning the first step into NaN.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True, allow_inf_nan=False)


class ModelConfig(Section):
    n_layers: int = Field(4, ge=1)
    d_model: int = Field(128, ge=8)
    n_heads: int = Field(4, ge=1)
    seq_len: int = Field(128, ge=2)
    vocab_size: int = Field(256, ge=2)
    mlp_ratio: int = Field(4, ge=1)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    bias: bool = True

    @model_validator(mode="after")
    def _heads_divide_width(self):
        if self.d_model % self.n_heads:
            raise ValueError(
                f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}; "
                f"pick n_heads from {_divisors(self.d_model)}"
            )
        return self


class DataConfig(Section):
    # "stdlib" is the embedded corpus (this Python's standard library sources, no download);
    # anything else is a path: a text file, a folder of them, a .jsonl file, or a
    # nanoGPT-style folder / file of uint16 tokens (.bin).
    source: str = "stdlib"
    format: Literal["auto", "text", "jsonl", "bin"] = "auto"
    tokenizer: Optional[str] = None  # None: bytes (vocab 256); else a tokenizer.json path
    val_fraction: float = Field(0.05, gt=0.0, lt=0.5)
    max_bytes: int = Field(16 * 2**20, ge=1024)  # cap on text read from stdlib / folders


class TrainConfig(Section):
    steps: int = Field(100, ge=1)
    seed: int = Field(1337, ge=0, le=2**63 - 1)  # torch takes 64-bit seeds; rank offsets are added
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    global_batch_size: Optional[int] = Field(None, ge=1)
    micro_batch_size: Optional[int] = Field(None, ge=1)
    grad_accum_steps: Optional[int] = Field(None, ge=1)
    lr: float = Field(6e-4, gt=0.0)
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0)
    warmup_steps: int = Field(0, ge=0)
    decay: Literal["cosine", "linear", "constant"] = "cosine"
    weight_decay: float = Field(0.1, ge=0.0)
    beta1: float = Field(0.9, ge=0.0, lt=1.0)
    beta2: float = Field(0.95, ge=0.0, lt=1.0)
    eps: float = Field(1e-8, gt=0.0)
    grad_clip: float = Field(1.0, ge=0.0)  # 0 disables clipping
    resume: str = "never"  # never | auto | path to a checkpoint directory
    compile: bool = False
    activation_checkpointing: bool = False
    eval_every: int = Field(0, ge=0)  # 0: evaluate only at the end
    eval_batches: int = Field(4, ge=1)
    peak_flops: Optional[float] = Field(None, gt=0.0)  # per device, for MFU where unknown

    @model_validator(mode="after")
    def _warmup_fits(self):
        if self.warmup_steps > self.steps:
            raise ValueError(
                f"warmup_steps {self.warmup_steps} exceeds steps {self.steps}; "
                "lower warmup_steps or raise steps"
            )
        return self


class ZeroConfig(Section):
    reduce_bucket_mb: float = Field(25.0, gt=0.0)  # stages 1/2: gradient bucket size
    overlap_comm: bool = True  # stages 2/3: reduce-scatter while backward goes on
    prefetch_blocks: int = Field(1, ge=0)  # stage 3: blocks gathered ahead of the one running
    persistence_threshold: int = Field(0, ge=0)  # stage 3: parameters smaller than this stay whole


class ParallelConfig(Section):
    zero_stage: int = Field(0, ge=0, le=3)
    zero: ZeroConfig = ZeroConfig()


class LaunchSection(Section):
    nproc_per_node: Union[int, Literal["auto"]] = "auto"
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    master_port: Optional[int] = Field(None, ge=1024, le=65535)  # None: a free port
    timeout_s: int = Field(300, ge=10)  # collective timeout: how long a hang may last

    @model_validator(mode="after")
    def _positive_procs(self):
        if isinstance(self.nproc_per_node, int) and self.nproc_per_node < 1:
            raise ValueError("nproc_per_node must be at least 1 (or 'auto')")
        return self


class CheckpointConfig(Section):
    every: int = Field(0, ge=0)  # 0: only at the end
    keep: int = Field(2, ge=1)
    at_end: bool = True


class LogConfig(Section):
    every: int = Field(10, ge=1)
    tensorboard: bool = False


class Recipe(Section):
    name: str = Field("run", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=128)  # a folder name
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    parallel: ParallelConfig = ParallelConfig()
    launch: LaunchSection = LaunchSection()
    checkpoint: CheckpointConfig = CheckpointConfig()
    log: LogConfig = LogConfig()

    @model_validator(mode="after")
    def _strategy_options_compatible(self):
        stage, train = self.parallel.zero_stage, self.train
        if stage >= 1 and train.precision == "fp16":
            raise ValueError(
                f"parallel.zero_stage {stage} with train.precision fp16: ZeRO keeps bf16 or fp32 "
                "weights (no loss scaling across shards); use precision bf16, or zero_stage 0"
            )
        if stage == 3 and train.compile:
            raise ValueError(
                "parallel.zero_stage 3 with train.compile: stage 3 gathers and frees each block's "
                "weights in hooks around it, which torch.compile cannot trace; use zero_stage 2, "
                "or compile: false"
            )
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


class RecipeLoader(yaml.SafeLoader):
    """YAML 1.1 reads `3e-4` as a string (it wants `3.0e-4`); a recipe means a number."""


RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def parse_yaml(text: str, source: str):
    """Safe YAML (data only, never objects), bounded in what its aliases expand to."""
    try:
        value = yaml.load(text, Loader=RecipeLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise RecipeError(f"{source} is not valid YAML: {exc}") from None
    if _expanded_size(value, MAX_RECIPE_NODES) > MAX_RECIPE_NODES:
        raise RecipeError(
            f"{source} expands to more than {MAX_RECIPE_NODES:,} values (YAML aliases nested into "
            "each other?); a recipe is a few dozen keys: write them out"
        )
    return value


def _expanded_size(value, limit: int) -> int:
    """How many values `value` holds with every alias written out, counting stops past `limit`."""
    count, stack = 0, [value]
    while stack and count <= limit:
        item = stack.pop()
        count += 1
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return count


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Read, override and validate a recipe; RecipeError says what is wrong and where."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe {path} does not exist (pass the path to a .yaml recipe)")
    if path.stat().st_size > MAX_RECIPE_BYTES:
        raise RecipeError(f"recipe {path} is {path.stat().st_size:,} bytes; a recipe is YAML of at most {MAX_RECIPE_BYTES:,}")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise RecipeError(f"cannot read recipe {path}: {exc.strerror}") from None
    raw = parse_yaml(decode_utf8(data, f"recipe {path}", RecipeError), f"recipe {path}") or {}
    if not isinstance(raw, dict):
        raise RecipeError(f"recipe {path} must be a mapping of sections, got {type(raw).__name__}")
    for override in overrides:
        apply_override(raw, override)
    return validate_recipe(raw, source=str(path))


def validate_recipe(raw: dict, source: str = "recipe") -> Recipe:
    try:
        return Recipe.model_validate(raw)
    except ValidationError as exc:
        raise RecipeError(f"{source}: " + "; ".join(_explain(err) for err in exc.errors())) from None


def apply_override(raw: dict, override: str) -> None:
    """Apply one `dotted.key=value` to the raw recipe; the value is parsed as YAML."""
    key, sep, text = override.partition("=")
    if not sep or not key:
        raise RecipeError(f"--set {excerpt(override)} must look like dotted.key=value, e.g. train.steps=50")
    parts = key.split(".")
    _check_path(parts)
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise RecipeError(f"--set {key}: {part} is not a section")
    node[parts[-1]] = parse_yaml(text, f"--set {key}") if text else ""


def _check_path(parts: list[str]) -> None:
    model: type[BaseModel] = Recipe
    for depth, part in enumerate(parts):
        fields = model.model_fields
        if part not in fields:
            where = ".".join(parts[: depth + 1])
            raise RecipeError(f"--set {where}: unknown key{_suggest(part, fields)}")
        annotation = fields[part].annotation
        if depth < len(parts) - 1:
            if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
                raise RecipeError(f"--set {'.'.join(parts)}: {part} is a value, not a section")
            model = annotation


def _explain(err: dict) -> str:
    loc = [str(p) for p in err["loc"]]
    where = ".".join(loc) or "recipe"
    if err["type"] == "extra_forbidden":
        return f"unknown key {where}{_suggest(loc[-1], _fields_at(loc[:-1]))}"
    message = err["msg"].removeprefix("Value error, ")
    if err["type"] != "value_error" and "input" in err:
        message += f" (got {excerpt(err['input'])})"
    return f"{where}: {message}"


def _fields_at(loc: list[str]) -> dict:
    model: type[BaseModel] = Recipe
    for part in loc:
        annotation = model.model_fields.get(part)
        if annotation is None or not isinstance(annotation.annotation, type):
            return {}
        model = annotation.annotation
        if not issubclass(model, BaseModel):
            return {}
    return model.model_fields


def _suggest(word: str, candidates) -> str:
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    if close:
        return f" (did you mean {close[0]!r}?)"
    return f" (known keys: {', '.join(candidates)})" if candidates else ""


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0 and d <= 64]

