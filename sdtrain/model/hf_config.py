"""A Hugging Face config.json and a recipe's model section, both ways. Torch-free: the
launcher checks `model.init_from` against the recipe with it before anything starts.

- `model_section(folder)`: the recipe keys a config.json decides (`sdtrain recipe from-hf`),
  or a refusal naming what sdtrain's model cannot reproduce (GPT-2's tanh-approximated GELU,
  scaled RoPE, sliding-window attention, ...).
- `check_init_from(model)`: the recipe's model against its init_from folder's config.json;
  a mismatch names the key and both values.
- `hf_config(model)`: the config.json of an exported model (with `export_problems`, the MoE
  settings no transformers model has).

The keys a recipe may leave null (n_kv_heads, ffn_hidden, rope_theta, tie_embeddings,
norm_eps, bias) are compared as size.py resolves them.
"""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

from sdtrain.errors import RecipeError, printable
from sdtrain.model.hf_files import HFFolderError, read_json, tensor_index
from sdtrain.model.size import (DEFAULT_NORM_EPS, DEFAULT_ROPE_THETA, arch_of, has_bias, is_llama, kv_heads, mlp_width,
                                moe_of, ties_embeddings)

ARCHITECTURES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "mixtral": "MixtralForCausalLM"}
CONFIG = "config.json"
LLAMA3_SCALING = {"factor": float, "low_freq_factor": float, "high_freq_factor": float,
                  "original_max_position_embeddings": int}
# transformers' names of GPT-2's activations -> model.activation (the three tanh forms are one formula)
GPT2_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh"}
WHAT = "a transformers config.json"


def read_config(folder: str | Path) -> dict:
    folder = Path(folder)
    if not folder.is_dir():
        raise HFFolderError(f"model.init_from {printable(folder)} is not a folder; give a Hugging Face model folder "
                            f"(config.json and model.safetensors)")
    config = read_json(folder / CONFIG, WHAT)
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise HFFolderError(f"{printable(folder / CONFIG)}: model_type {printable(model_type)[:40]!r} is not one sdtrain "
                            f"builds; it reads {', '.join(ARCHITECTURES)}")
    return config


class ConfigReader:
    """Values of one config.json, each checked for its type as it is taken."""

    def __init__(self, folder: Path):
        self.where = printable(folder / CONFIG)
        self.config = read_config(folder)

    def take(self, key: str, default=None, kind: type = int, required: bool = True):
        value = self.config.get(key, default)
        if value is None and not required:
            return None
        if kind is float and type(value) is int:
            value = float(value)
        valid = type(value) is kind and (kind is not int or value >= 1) and (kind is not float or math.isfinite(value))
        if not valid:
            raise HFFolderError(f"{self.where}: {key} is {printable(value)[:40]!r}; "
                                f"expected a {'positive ' if kind is int else ''}{kind.__name__}")
        return value

    def refuse_unless(self, ok: bool, why: str) -> None:
        if not ok:
            raise HFFolderError(f"{self.where}: {why}; sdtrain's model would compute other logits")


def _gpt2_keys(c: ConfigReader) -> list[tuple[str, object, str]]:
    width = c.take("n_embd")
    act = c.config.get("activation_function", "gelu_new")
    c.refuse_unless(act in GPT2_ACTIVATIONS, f"activation_function {printable(act)[:20]!r} (sdtrain's GPT-2 MLP takes "
                                             f"{', '.join(GPT2_ACTIVATIONS)})")
    c.refuse_unless(c.config.get("scale_attn_weights", True) is True, "scale_attn_weights is false")
    c.refuse_unless(not c.config.get("scale_attn_by_inverse_layer_idx"), "scale_attn_by_inverse_layer_idx is true")
    c.refuse_unless(not c.config.get("add_cross_attention"), "add_cross_attention is true")
    inner = c.take("n_inner", required=False) or 4 * width
    c.refuse_unless(inner % width == 0, f"n_inner {inner} is not a multiple of n_embd {width} (model.mlp_ratio)")
    return [("arch", "gpt2", "model_type"), ("n_layers", c.take("n_layer"), "n_layer"),
            ("d_model", width, "n_embd"), ("n_heads", c.take("n_head"), "n_head"),
            ("vocab_size", c.take("vocab_size"), "vocab_size"), ("seq_len", c.take("n_positions"), "n_positions"),
            ("mlp_ratio", inner // width, "n_inner"), ("bias", True, "model_type"),
            ("activation", GPT2_ACTIVATIONS[act], "activation_function"),
            ("norm_eps", c.take("layer_norm_epsilon", 1e-5, float), "layer_norm_epsilon"),
            ("tie_embeddings", c.take("tie_word_embeddings", True, bool), "tie_word_embeddings")]


def _llama_keys(c: ConfigReader) -> list[tuple[str, object, str]]:
    width, heads = c.take("hidden_size"), c.take("num_attention_heads")
    act = c.config.get("hidden_act", "silu")
    c.refuse_unless(act == "silu", f"hidden_act {printable(act)[:20]!r} (sdtrain's SwiGLU uses silu)")
    c.refuse_unless(not c.config.get("attention_bias") and not c.config.get("mlp_bias"),
                    "attention_bias or mlp_bias is true")
    head_dim = c.take("head_dim", required=False)
    c.refuse_unless(head_dim in (None, width // heads), f"head_dim {head_dim} is not hidden_size / num_attention_heads")
    c.refuse_unless(c.config.get("sliding_window") is None, "sliding_window attention is set")
    # transformers 5 writes rope_parameters, 4 rope_theta and rope_scaling
    rope = c.config.get("rope_parameters") or c.config.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else None
    c.refuse_unless(kind in ("default", "llama3"), f"rope scaling {printable(rope)[:60]} (sdtrain's RoPE is the "
                                                   f"default one or Llama 3's, rope_type llama3)")
    scaling = None
    if kind == "llama3":
        scaling = {"rope_type": "llama3"}
        for key, kind_of in LLAMA3_SCALING.items():
            value = rope.get(key)
            value = float(value) if kind_of is float and type(value) is int else value
            if type(value) is not kind_of or not math.isfinite(value) or value <= 0:
                raise HFFolderError(f"{c.where}: llama3 rope scaling's {key} is {printable(value)[:40]!r}; "
                                    f"expected a positive {kind_of.__name__}")
            scaling[key] = value
    theta = rope.get("rope_theta", c.config.get("rope_theta", 10000.0))
    theta = float(theta) if type(theta) is int else theta
    if type(theta) is not float or not math.isfinite(theta) or theta <= 0:
        raise HFFolderError(f"{c.where}: rope_theta {printable(theta)[:40]!r} is not a positive number")
    keys = [("arch", "llama", "model_type"), ("n_layers", c.take("num_hidden_layers"), "num_hidden_layers"),
            ("d_model", width, "hidden_size"), ("n_heads", heads, "num_attention_heads"),
            ("n_kv_heads", c.take("num_key_value_heads", heads), "num_key_value_heads"),
            ("vocab_size", c.take("vocab_size"), "vocab_size"),
            ("seq_len", c.take("max_position_embeddings"), "max_position_embeddings"),
            ("ffn_hidden", c.take("intermediate_size"), "intermediate_size"), ("bias", False, "attention_bias"),
            ("rope_theta", theta, "rope_theta"), ("rope_scaling", scaling, "rope_parameters"),
            ("norm_eps", c.take("rms_norm_eps", 1e-6, float), "rms_norm_eps"),
            ("tie_embeddings", c.take("tie_word_embeddings", False, bool), "tie_word_embeddings")]
    if c.config["model_type"] == "mixtral":
        keys += [("moe.num_experts", c.take("num_local_experts"), "num_local_experts"),
                 ("moe.top_k", c.take("num_experts_per_tok"), "num_experts_per_tok"),
                 ("moe.every_n_layers", 1, "model_type mixtral"), ("moe.drop_tokens", False, "model_type mixtral"),
                 ("moe.aux_loss_coef", c.take("router_aux_loss_coef", 0.001, float), "router_aux_loss_coef")]
    return keys


def model_section(folder: str | Path) -> tuple[dict, dict[str, str]]:
    """The recipe's model keys the folder's config.json decides (moe as a nested dict), and
    for each dotted key the config key it came from."""
    reader = ConfigReader(Path(folder))
    keys = _gpt2_keys(reader) if reader.config["model_type"] == "gpt2" else _llama_keys(reader)
    section: dict = {}
    source = {}
    for key, value, hf_key in keys:
        parent, _, leaf = key.rpartition(".")
        (section.setdefault(parent, {}) if parent else section)[leaf] = value
        source[key] = hf_key
    return section, source


# Keys that decide the model's shape and its numbers: they must agree with the folder. The
# others config.json suggests (seq_len up to its positions, moe.drop_tokens, the aux loss's
# weight) are training choices the recipe keeps.
CHECKED = ("arch", "n_layers", "d_model", "n_heads", "n_kv_heads", "vocab_size", "mlp_ratio", "activation", "ffn_hidden",
           "bias", "rope_theta", "rope_scaling", "norm_eps", "tie_embeddings", "moe.num_experts", "moe.top_k", "moe.every_n_layers")


def resolved(model, key: str):
    """The value a recipe's model (a ModelConfig, a GPTConfig or a dumped section) has for
    `key` ("moe.top_k" for an MoE setting), its null defaults resolved by size.py's rules."""
    if isinstance(model, dict):
        model = SimpleNamespace(**model)
    if key.startswith("moe."):
        moe = moe_of(model)
        return (moe or {}).get(key[4:], 0 if key == "moe.num_experts" else None)
    rules = {"arch": arch_of, "n_kv_heads": kv_heads, "tie_embeddings": ties_embeddings, "bias": has_bias,
             "norm_eps": lambda m: getattr(m, "norm_eps", None) or DEFAULT_NORM_EPS,
             "activation": lambda m: getattr(m, "activation", None) or "gelu",  # a section older than the key
             "rope_scaling": lambda m: _as_dict(getattr(m, "rope_scaling", None)),
             "ffn_hidden": lambda m: mlp_width(m) if is_llama(m) else None,
             "rope_theta": lambda m: (getattr(m, "rope_theta", None) or DEFAULT_ROPE_THETA) if is_llama(m) else None}
    return rules[key](model) if key in rules else getattr(model, key, None)


def _as_dict(value) -> dict | None:
    """A rope_scaling as a dict, whether a recipe's section, GPTConfig's dataclass or a dict."""
    if value is None or isinstance(value, dict):
        return value
    return value.model_dump() if hasattr(value, "model_dump") else value.as_dict()


def check_init_from(model) -> None:
    """RecipeError unless the folder `model.init_from` holds a model this recipe's model is."""
    folder = Path(model.init_from)
    section, source = model_section(folder)
    tensor_index(folder)  # the weights are there, their headers sound (shapes: checked by each rank before it reads)
    where = f"{printable(folder / CONFIG)}"
    if "moe" not in section:  # a dense checkpoint: a recipe with experts has nothing to read them from
        section["moe"], source["moe.num_experts"] = {"num_experts": 0}, "a dense model_type"
    for key in CHECKED:
        if key not in source:
            continue
        theirs = section["moe"][key[4:]] if key.startswith("moe.") else section[key]
        ours = resolved(model, key)
        same = math.isclose(ours, theirs, rel_tol=1e-9) if isinstance(theirs, float) and ours is not None else ours == theirs
        if not same:
            raise RecipeError(f"model.{key} is {ours!r} but {where} says {theirs!r} ({source[key]}): the weights would not "
                              f"fit; set model.{key}: {_yaml(theirs)} (`sdtrain recipe from-hf {printable(folder)}` "
                              f"prints the whole model section)")
    if section["arch"] == "gpt2" and model.seq_len > section["seq_len"]:
        raise RecipeError(f"model.seq_len {model.seq_len} is longer than the {section['seq_len']} positions "
                          f"{where} has (n_positions); use model.seq_len <= {section['seq_len']}")


def _yaml(value) -> str:
    return "true" if value is True else "false" if value is False else str(value)


def hf_model_type(model: dict) -> str:
    """gpt2, llama, or mixtral (llama blocks with experts) for a recipe's model section."""
    if resolved(model, "arch") == "gpt2":
        return "gpt2"
    return "mixtral" if resolved(model, "moe.num_experts") else "llama"


def export_problems(model: dict) -> list[str]:
    """What of a recipe's model no transformers model computes alike (export refuses it).
    Mixtral routes every token to the top-k of a softmax over all experts, renormalised over
    those k: sdtrain's router is that with k >= 2, no capacity limit and no selection bias."""
    if not resolved(model, "moe.num_experts"):
        return []
    if resolved(model, "arch") == "gpt2":
        return ["experts in a gpt2-arch model (GELU experts) have no transformers equivalent; Mixtral's are SwiGLU "
                "experts on llama blocks (model.arch llama)"]
    problems = []
    if resolved(model, "moe.every_n_layers") != 1:
        problems.append(f"model.moe.every_n_layers {resolved(model, 'moe.every_n_layers')}: Mixtral has experts in "
                        "every block (every_n_layers 1)")
    if resolved(model, "moe.drop_tokens"):
        problems.append("model.moe.drop_tokens true: sdtrain drops the tokens past an expert's capacity, Mixtral "
                        "routes every token (drop_tokens false)")
    if resolved(model, "moe.balance") == "bias":
        problems.append("model.moe.balance bias: the learned selection bias changes which experts a token goes to, "
                        "and Mixtral's router has none")
    if resolved(model, "moe.top_k") == 1:
        problems.append("model.moe.top_k 1: sdtrain weighs the one expert by its router probability, Mixtral "
                        "renormalises it to 1")
    return problems


def hf_config(model: dict, dtype: str = "float32") -> dict:
    """config.json for a recipe's model section (checked with export_problems first), its
    weights saved in `dtype`."""
    model_type, get = hf_model_type(model), (lambda key: resolved(model, key))
    common = {"architectures": [ARCHITECTURES[model_type]], "model_type": model_type, "vocab_size": get("vocab_size"),
              "tie_word_embeddings": bool(get("tie_embeddings")), "dtype": dtype, "torch_dtype": dtype,
              "bos_token_id": None, "eos_token_id": None, "pad_token_id": None, "use_cache": True}
    if model_type == "gpt2":
        dropout = get("dropout") or 0.0
        return {**common, "n_layer": get("n_layers"), "n_embd": get("d_model"), "n_head": get("n_heads"),
                "n_positions": get("seq_len"), "n_inner": get("mlp_ratio") * get("d_model"),
                "activation_function": "gelu_new" if get("activation") == "gelu_tanh" else "gelu",
                "layer_norm_epsilon": get("norm_eps"), "resid_pdrop": dropout,
                "embd_pdrop": dropout, "attn_pdrop": dropout, "scale_attn_weights": True,
                "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False}
    config = {**common, "num_hidden_layers": get("n_layers"), "hidden_size": get("d_model"),
              "num_attention_heads": get("n_heads"), "num_key_value_heads": get("n_kv_heads"),
              "head_dim": get("d_model") // get("n_heads"), "intermediate_size": get("ffn_hidden"),
              "max_position_embeddings": get("seq_len"), "hidden_act": "silu", "rms_norm_eps": get("norm_eps"),
              "attention_bias": False, "mlp_bias": False, "attention_dropout": get("dropout") or 0.0,
              # both spellings: transformers 5 reads rope_parameters, 4 reads rope_theta
              "rope_theta": get("rope_theta"),
              "rope_parameters": {"rope_type": "default", **(get("rope_scaling") or {}), "rope_theta": get("rope_theta")}}
    if get("rope_scaling"):
        config["rope_scaling"] = get("rope_scaling")
    if model_type == "mixtral":
        config.update(num_local_experts=get("moe.num_experts"), num_experts_per_tok=get("moe.top_k"),
                      router_aux_loss_coef=get("moe.aux_loss_coef"), router_jitter_noise=0.0, sliding_window=None,
                      output_router_logits=False)
    return config
