"""Hugging Face checkpoints in and out of flanjax: LLaMA, Mistral, Qwen2, GPT-2, GPT-Neo, GPT-J.

    model = load_model("path/to/hf_dir", mesh=MeshConfig(fsdp=-1))   # sharded Transformer
    logits, _ = model(tokens)                                          # [batch, length, vocab]
    save_model(model, "out_dir", hf_config)                            # back to safetensors

Each family is a table of `Tensor`s: a Hugging Face tensor name, the flanjax parameters it
holds and the two (view-only) conversions between them. Loading reads one tensor at a time
with positioned reads (no memory map, whose pages would stay resident) and copies each
device's slice straight into its shard, so host memory holds the sharded model plus at most
one tensor. Only safetensors are read unless pickles are explicitly allowed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from flanjax.errors import FlanjaxError
from flanjax.models import stacking
from flanjax.models.transformer import Transformer, TransformerConfig
from flanjax.sharding import MeshConfig, Partitioner, filled, make_mesh, shardings_of

FAMILIES = ("llama", "mistral", "qwen2", "gpt2", "gpt_neo", "gptj")
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "gpt2": "GPT2LMHeadModel",
    "gpt_neo": "GPTNeoForCausalLM",
    "gptj": "GPTJForCausalLM",
}


class HFCheckpointError(FlanjaxError, ValueError):
    """A Hugging Face checkpoint that flanjax cannot read (or write) as asked."""


# --- configs --------------------------------------------------------------------------------


def read_config(path: str) -> dict[str, Any]:
    """config.json of a checkpoint directory, normalised by transformers (defaults filled in,
    legacy RoPE fields moved to `rope_parameters`)."""
    import transformers

    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        raise HFCheckpointError(
            f"{file} not found: point --in / load_model at a Hugging Face model directory (one "
            "holding config.json and *.safetensors, e.g. from `hf download MODEL --local-dir DIR`)."
        )
    try:
        with open(file) as f:
            model_type = json.load(f).get("model_type")
    except json.JSONDecodeError as e:
        raise HFCheckpointError(f"{file} is not valid JSON ({e}); download the checkpoint again.") from None
    if model_type not in FAMILIES:
        raise HFCheckpointError(
            f"{file}: model_type {model_type!r} is not supported; supported architectures: "
            + ", ".join(f"{ARCHITECTURES[f]} ({f})" for f in FAMILIES)
            + "."
        )
    return transformers.AutoConfig.from_pretrained(path).to_dict()


def config_from_hf(hf: Mapping[str, Any], dtype: str = "float32") -> TransformerConfig:
    """The flanjax model of a Hugging Face config dict (`read_config`)."""
    fields = _family_fields(hf)
    try:
        return TransformerConfig(vocab_size=hf["vocab_size"], dtype=dtype, param_dtype=dtype,
                                 tie_embeddings=bool(hf.get("tie_word_embeddings", False)), **fields)  # fmt: skip
    except ValueError as e:  # the config's own validation, e.g. an unsupported RoPE type
        raise HFCheckpointError(f"{hf['model_type']} checkpoint: {e}") from None


def _family_fields(hf: Mapping[str, Any]) -> dict[str, Any]:
    kind = hf["model_type"]
    if kind in ("llama", "mistral", "qwen2"):
        _require(hf, "hidden_act", "silu")
        rope = dict(hf.get("rope_parameters") or {"rope_theta": hf.get("rope_theta", 10_000.0)})
        theta = rope.pop("rope_theta")
        window, window_layers = None, None
        if kind == "mistral" and hf.get("sliding_window"):
            window = hf["sliding_window"]
        types = hf.get("layer_types") or []
        if kind == "qwen2" and "sliding_attention" in types:
            window = hf["sliding_window"]
            window_layers = tuple(i for i, t in enumerate(types) if t == "sliding_attention")
        return dict(
            d_model=hf["hidden_size"], num_layers=hf["num_hidden_layers"], num_heads=hf["num_attention_heads"],
            num_kv_heads=hf.get("num_key_value_heads"), head_dim=hf.get("head_dim"), d_ff=hf["intermediate_size"],
            max_len=hf["max_position_embeddings"], norm_eps=hf["rms_norm_eps"], rope_theta=theta,
            rope_scaling=None if rope.get("rope_type", "default") == "default" else rope,
            sliding_window=window, sliding_window_layers=window_layers,
            qkv_bias=kind == "qwen2" or bool(hf.get("attention_bias")), out_bias=bool(hf.get("attention_bias")),
            mlp_bias=bool(hf.get("mlp_bias")),
        )  # fmt: skip
    _require(hf, "activation_function", "gelu_new")
    d = hf["n_embd"] if kind != "gpt_neo" else hf["hidden_size"]
    d_ff = hf.get("n_inner") or hf.get("intermediate_size") or 4 * d
    gpt = dict(d_model=d, d_ff=d_ff, norm="layer", norm_eps=hf["layer_norm_epsilon"], mlp="gelu", mlp_bias=True)
    if kind == "gpt2":
        if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("reorder_and_upcast_attn"):
            raise HFCheckpointError("GPT-2 checkpoints with scale_attn_by_inverse_layer_idx or reorder_and_upcast_attn are not supported.")
        return dict(
            **gpt, num_layers=hf["n_layer"], num_heads=hf["n_head"], max_len=hf["n_positions"], position="learned",
            qkv_bias=True, out_bias=True, attention_scale=None if hf.get("scale_attn_weights", True) else 1.0,
        )  # fmt: skip
    if kind == "gpt_neo":
        local = tuple(i for i, t in enumerate(hf["attention_layers"]) if t == "local")
        return dict(
            **gpt, num_layers=hf["num_layers"], num_heads=hf["num_heads"], max_len=hf["max_position_embeddings"],
            position="learned", out_bias=True, attention_scale=1.0,  # GPT-Neo does not scale its logits
            sliding_window=hf["window_size"] if local else None, sliding_window_layers=local or None,
        )  # fmt: skip
    return dict(  # gptj
        **gpt, num_layers=hf["n_layer"], num_heads=hf["n_head"], max_len=hf["n_positions"],
        rotary_dim=hf.get("rotary_dim"), parallel_residual=True, lm_head_bias=True,
    )  # fmt: skip


def _require(hf: Mapping[str, Any], key: str, value: Any) -> None:
    if hf.get(key, value) != value:
        raise HFCheckpointError(
            f"{hf['model_type']} checkpoint with {key}={hf[key]!r} is not supported (flanjax implements {value!r})."
        )


def config_to_hf(config: TransformerConfig, base: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The Hugging Face config dict of `config`: `base` (the config it was imported from) with
    the vocabulary size updated, or, for a model trained from scratch, a LLaMA / Qwen2 / GPT-2
    config when the model is one of those."""
    if base is not None:
        return {**base, "vocab_size": config.vocab_size}
    llama_like = config.norm == "rms" and config.position == "rope" and config.mlp == "swiglu"
    gpt2_like = config.norm == "layer" and config.position == "learned" and config.mlp == "gelu"
    plain = not (config.parallel_residual or config.rotary_dim or config.lm_head_bias or config.attention_scale or config.sliding_window)
    if llama_like and plain and config.qkv_bias == config.out_bias:
        kind, extra = "llama", dict(attention_bias=config.qkv_bias, mlp_bias=config.mlp_bias)
    elif llama_like and plain and config.qkv_bias and not (config.out_bias or config.mlp_bias):
        kind, extra = "qwen2", {}
    elif gpt2_like and plain and config.qkv_bias and config.out_bias and config.mlp_bias:
        return {
            "model_type": "gpt2", "architectures": [ARCHITECTURES["gpt2"]], "vocab_size": config.vocab_size,
            "n_embd": config.d_model, "n_layer": config.num_layers, "n_head": config.num_heads, "n_inner": config.d_ff,
            "n_positions": config.max_len, "layer_norm_epsilon": config.norm_eps, "activation_function": "gelu_new",
            "tie_word_embeddings": config.tie_embeddings,
        }  # fmt: skip
    else:
        raise HFCheckpointError(
            f"this model ({config}) matches no Hugging Face architecture flanjax writes from scratch "
            "(LLaMA, Qwen2, GPT-2); models imported from Hugging Face are written back as their own family."
        )
    rope = {"rope_type": "default", **dict(config.rope_scaling or {}), "rope_theta": config.rope_theta}
    return {
        "model_type": kind, "architectures": [ARCHITECTURES[kind]], "vocab_size": config.vocab_size,
        "hidden_size": config.d_model, "num_hidden_layers": config.num_layers, "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.kv_heads, "head_dim": config.head_size, "intermediate_size": config.d_ff,
        "max_position_embeddings": config.max_len, "rms_norm_eps": config.norm_eps, "rope_parameters": rope,
        "hidden_act": "silu", "tie_word_embeddings": config.tie_embeddings, **extra,
    }  # fmt: skip


# --- the tensor tables ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Tensor:
    """One Hugging Face tensor and the flanjax parameters ("layers/0/attn/q/kernel") it holds."""

    name: str
    params: tuple[str, ...]
    to_flanjax: Callable[[np.ndarray], tuple[np.ndarray, ...]]
    to_hf: Callable[..., np.ndarray]


def _same(name: str, param: str) -> Tensor:
    return Tensor(name, (param,), lambda w: (w,), lambda p: p)


def _linear(name: str, param: str) -> Tensor:
    """torch.nn.Linear stores [out, in]; flanjax kernels are [in, out]."""
    return Tensor(name, (param,), lambda w: (w.T,), lambda p: p.T)


def _heads_in(name: str, param: str, heads: int, head_size: int, perm: np.ndarray | None = None) -> Tensor:
    """Linear [heads * head, d] <-> kernel [d, heads, head] (q, k, v), head dims permuted by `perm`."""
    def to_flanjax(w):
        k = w.T.reshape(w.shape[1], heads, head_size)
        return (k if perm is None else k[..., perm],)

    def to_hf(k):
        k = k if perm is None else k[..., np.argsort(perm)]
        return k.reshape(k.shape[0], heads * head_size).T

    return Tensor(name, (param,), to_flanjax, to_hf)


def _heads_bias(name: str, param: str, heads: int, head_size: int) -> Tensor:
    return Tensor(name, (param,), lambda b: (b.reshape(heads, head_size),), lambda p: p.reshape(-1))


def _heads_out(name: str, param: str, heads: int, head_size: int) -> Tensor:
    """Linear [d, heads * head] <-> kernel [heads, head, d] (attention output)."""
    return Tensor(name, (param,), lambda w: (w.T.reshape(heads, head_size, w.shape[0]),), lambda k: k.reshape(-1, k.shape[-1]).T)


def _norm(name: str, param: str, config: TransformerConfig) -> list[Tensor]:
    tensors = [_same(f"{name}.weight", f"{param}/scale")]
    return tensors + [_same(f"{name}.bias", f"{param}/bias")] if config.norm == "layer" else tensors


def _llama_tensors(c: TransformerConfig) -> list[Tensor]:
    n, k, h = c.num_heads, c.kv_heads, c.head_size
    tensors = [_same("model.embed_tokens.weight", "embed/embedding"), _same("model.norm.weight", "final_norm/scale")]
    for i in range(c.num_layers):
        hf, fj = f"model.layers.{i}.", f"layers/{i}/"
        tensors += [_same(hf + "input_layernorm.weight", fj + "attn_norm/scale"),
                    _same(hf + "post_attention_layernorm.weight", fj + "mlp_norm/scale")]  # fmt: skip
        for name, heads in (("q", n), ("k", k), ("v", k)):
            tensors.append(_heads_in(hf + f"self_attn.{name}_proj.weight", fj + f"attn/{name}/kernel", heads, h))
            if c.qkv_bias:
                tensors.append(_heads_bias(hf + f"self_attn.{name}_proj.bias", fj + f"attn/{name}/bias", heads, h))
        tensors.append(_heads_out(hf + "self_attn.o_proj.weight", fj + "attn/o/kernel", n, h))
        if c.out_bias:
            tensors.append(_same(hf + "self_attn.o_proj.bias", fj + "attn/o/bias"))
        for name in ("gate", "up", "down"):
            tensors.append(_linear(hf + f"mlp.{name}_proj.weight", fj + f"mlp/{name}/kernel"))
            if c.mlp_bias:
                tensors.append(_same(hf + f"mlp.{name}_proj.bias", fj + f"mlp/{name}/bias"))
    return tensors


def _gpt2_tensors(c: TransformerConfig) -> list[Tensor]:
    """GPT-2's Conv1D stores [in, out] already; q, k and v are one fused `c_attn`."""
    d, n, h = c.d_model, c.num_heads, c.head_size
    tensors = [_same("transformer.wte.weight", "embed/embedding"), _same("transformer.wpe.weight", "positions/embedding"),
               *_norm("transformer.ln_f", "final_norm", c)]  # fmt: skip
    for i in range(c.num_layers):
        hf, fj = f"transformer.h.{i}.", f"layers/{i}/"
        qkv = tuple(fj + f"attn/{x}/kernel" for x in "qkv")
        qkv_bias = tuple(fj + f"attn/{x}/bias" for x in "qkv")
        tensors += [
            *_norm(hf + "ln_1", fj + "attn_norm", c), *_norm(hf + "ln_2", fj + "mlp_norm", c),
            Tensor(hf + "attn.c_attn.weight", qkv, lambda w: tuple(x.reshape(d, n, h) for x in np.split(w, 3, axis=1)),
                   lambda *ks: np.concatenate([k.reshape(d, n * h) for k in ks], axis=1)),
            Tensor(hf + "attn.c_attn.bias", qkv_bias, lambda b: tuple(x.reshape(n, h) for x in np.split(b, 3)),
                   lambda *bs: np.concatenate([b.reshape(-1) for b in bs])),
            Tensor(hf + "attn.c_proj.weight", (fj + "attn/o/kernel",), lambda w: (w.reshape(n, h, d),), lambda k: k.reshape(n * h, d)),
            _same(hf + "attn.c_proj.bias", fj + "attn/o/bias"),
            _same(hf + "mlp.c_fc.weight", fj + "mlp/up/kernel"), _same(hf + "mlp.c_fc.bias", fj + "mlp/up/bias"),
            _same(hf + "mlp.c_proj.weight", fj + "mlp/down/kernel"), _same(hf + "mlp.c_proj.bias", fj + "mlp/down/bias"),
        ]  # fmt: skip
    return tensors


def _gpt_neo_tensors(c: TransformerConfig) -> list[Tensor]:
    n, h = c.num_heads, c.head_size
    tensors = [_same("transformer.wte.weight", "embed/embedding"), _same("transformer.wpe.weight", "positions/embedding"),
               *_norm("transformer.ln_f", "final_norm", c)]  # fmt: skip
    for i in range(c.num_layers):
        hf, fj = f"transformer.h.{i}.", f"layers/{i}/"
        tensors += [
            *_norm(hf + "ln_1", fj + "attn_norm", c), *_norm(hf + "ln_2", fj + "mlp_norm", c),
            *(_heads_in(hf + f"attn.attention.{x}_proj.weight", fj + f"attn/{x}/kernel", n, h) for x in "qkv"),
            _heads_out(hf + "attn.attention.out_proj.weight", fj + "attn/o/kernel", n, h),
            _same(hf + "attn.attention.out_proj.bias", fj + "attn/o/bias"),
            _linear(hf + "mlp.c_fc.weight", fj + "mlp/up/kernel"), _same(hf + "mlp.c_fc.bias", fj + "mlp/up/bias"),
            _linear(hf + "mlp.c_proj.weight", fj + "mlp/down/kernel"), _same(hf + "mlp.c_proj.bias", fj + "mlp/down/bias"),
        ]  # fmt: skip
    return tensors


def _gptj_tensors(c: TransformerConfig) -> list[Tensor]:
    """GPT-J rotates interleaved pairs (x0, x1), (x2, x3), ... of its first `rotary_dim` head
    dims; permuting q's and k's head dims to (x0, x2, ..., x1, x3, ...) turns that into
    flanjax's rotate-half RoPE and leaves q.k unchanged."""
    n, h, r = c.num_heads, c.head_size, c.rotary_dim or c.head_size
    perm = np.concatenate([np.arange(0, r, 2), np.arange(1, r, 2), np.arange(r, h)])
    tensors = [_same("transformer.wte.weight", "embed/embedding"), *_norm("transformer.ln_f", "final_norm", c),
               _linear("lm_head.weight", "lm_head/kernel"), _same("lm_head.bias", "lm_head/bias")]  # fmt: skip
    for i in range(c.num_layers):
        hf, fj = f"transformer.h.{i}.", f"layers/{i}/"
        tensors += [
            *_norm(hf + "ln_1", fj + "attn_norm", c),
            _heads_in(hf + "attn.q_proj.weight", fj + "attn/q/kernel", n, h, perm),
            _heads_in(hf + "attn.k_proj.weight", fj + "attn/k/kernel", n, h, perm),
            _heads_in(hf + "attn.v_proj.weight", fj + "attn/v/kernel", n, h),
            _heads_out(hf + "attn.out_proj.weight", fj + "attn/o/kernel", n, h),
            _linear(hf + "mlp.fc_in.weight", fj + "mlp/up/kernel"), _same(hf + "mlp.fc_in.bias", fj + "mlp/up/bias"),
            _linear(hf + "mlp.fc_out.weight", fj + "mlp/down/kernel"), _same(hf + "mlp.fc_out.bias", fj + "mlp/down/bias"),
        ]  # fmt: skip
    return tensors


def tensors(config: TransformerConfig, model_type: str) -> list[Tensor]:
    """The table of `model_type` for `config`; every flanjax parameter appears exactly once."""
    table = {"gpt2": _gpt2_tensors, "gpt_neo": _gpt_neo_tensors, "gptj": _gptj_tensors}.get(model_type, _llama_tensors)(config)
    if not config.tie_embeddings and model_type != "gptj":
        table.append(_linear("lm_head.weight", "lm_head/kernel"))
    return table


# Buffers some checkpoints carry that are not parameters (causal masks, RoPE tables).
_BUFFER_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".attention.bias", ".attention.masked_bias", "rotary_emb.inv_freq")


# --- reading safetensors ----------------------------------------------------------------------

_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
           "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}  # fmt: skip


class SafetensorsReader:
    """The tensors of a checkpoint directory (one model.safetensors, or shards listed in
    model.safetensors.index.json), read one at a time with positioned reads.

    safetensors' own `safe_open` memory-maps the file, and the pages a read touches stay in
    the process's resident memory until the file is closed: loading a large tensor would
    then cost twice its size. The format is a little-endian u64 header length, a JSON header
    ({name: {dtype, shape, data_offsets}}) and the raw bytes.
    """

    def __init__(self, path: str, allow_pickle: bool = False):
        self.path = path
        self.entries: dict[str, tuple[str, dict]] = {}  # name -> (file, header entry)
        self._pickled: dict[str, Any] | None = None
        index = os.path.join(path, "model.safetensors.index.json")
        single = os.path.join(path, "model.safetensors")
        if os.path.isfile(index):
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        elif os.path.isfile(single):
            files = ["model.safetensors"]
        else:
            self._pickled = _load_pickle(path, allow_pickle)
            return
        for name in files:
            file = os.path.join(path, name)
            if not os.path.isfile(file):
                raise HFCheckpointError(f"{file} is listed in {index} but missing; download the checkpoint again.")
            with open(file, "rb") as f:
                (size,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(size))
            header.pop("__metadata__", None)
            for tensor, entry in header.items():
                entry["start"] = 8 + size + entry["data_offsets"][0]
                self.entries[tensor] = (file, entry)

    def names(self) -> list[str]:
        return list(self._pickled if self._pickled is not None else self.entries)

    def nbytes(self, name: str) -> int:
        if self._pickled is not None:
            return self._pickled[name].nbytes
        start, end = self.entries[name][1]["data_offsets"]
        return end - start

    def read(self, name: str) -> np.ndarray:
        if self._pickled is not None:
            return self._pickled[name]
        file, entry = self.entries[name]
        if entry["dtype"] not in _DTYPES:
            raise HFCheckpointError(f"{file}: tensor {name} has dtype {entry['dtype']}, which flanjax does not read.")
        count = int(np.prod(entry["shape"], dtype=np.int64))
        data = np.fromfile(file, dtype=np.dtype(_DTYPES[entry["dtype"]]), count=count, offset=entry["start"])
        if data.size != count:
            raise HFCheckpointError(f"{file}: tensor {name} is truncated (the file ends early); download the checkpoint again.")
        return data.reshape(entry["shape"])


def _load_pickle(path: str, allow_pickle: bool) -> dict[str, np.ndarray]:
    files = sorted(f for f in os.listdir(path) if f.endswith(".bin") and f.startswith("pytorch_model"))
    if not files:
        raise HFCheckpointError(f"{path} holds no model weights (model.safetensors, its index, or pytorch_model*.bin).")
    if not allow_pickle:
        raise HFCheckpointError(
            f"{path} holds only pickle-based weights ({files[0]}); unpickling can run arbitrary code, so "
            "flanjax reads safetensors only. Convert them once where you trust the file: "
            "`python -c \"import transformers as t; t.AutoModelForCausalLM.from_pretrained('DIR')"
            ".save_pretrained('DIR_safetensors')\"`, or pass allow_pickle=True (--allow_pickle) to "
            "load them with torch.load(weights_only=True)."
        )
    import torch

    state: dict[str, np.ndarray] = {}
    for file in files:
        for name, t in torch.load(os.path.join(path, file), map_location="cpu", weights_only=True).items():
            state[name] = t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy()
    return state


# --- loading --------------------------------------------------------------------------------


def _partitioner(mesh: jax.sharding.Mesh | MeshConfig | Partitioner | None) -> Partitioner:
    if isinstance(mesh, Partitioner):
        return mesh
    if isinstance(mesh, MeshConfig):
        return Partitioner.from_config(mesh)
    if mesh is None:  # one device: never a copy per device of a replicated model
        return Partitioner(make_mesh(MeshConfig(data=1), devices=jax.devices()[:1]))
    return Partitioner(mesh)


def _place(value: np.ndarray, target: jax.ShapeDtypeStruct) -> jax.Array:
    """`value` as a global array in `target`'s sharding, copying each device's slice only."""
    shards = [
        jax.device_put(np.ascontiguousarray(value[index], dtype=target.dtype), device)
        for device, index in target.sharding.addressable_devices_indices_map(target.shape).items()
    ]
    return jax.make_array_from_single_device_arrays(target.shape, target.sharding, shards)


def _match(path: str, names: list[str], table: list[Tensor], tied: bool) -> list[tuple[Tensor, str]]:
    """Each table entry with the checkpoint's name for it, checked before anything is read.
    Old GPT-2 checkpoints store names without the `transformer.` prefix."""
    available = set(names)
    short = lambda name: name.removeprefix("transformer.")  # noqa: E731
    used = {n for t in table for n in (t.name, short(t.name))}
    extra = sorted(n for n in available - used if not n.endswith(_BUFFER_SUFFIXES) and not (tied and n == "lm_head.weight"))
    if extra:
        raise HFCheckpointError(
            f"{path}: the checkpoint has tensors flanjax does not know, e.g. {extra[:3]}: it is a variant "
            "of its architecture that flanjax does not implement."
        )
    matched = []
    for t in table:
        name = t.name if t.name in available else short(t.name) if short(t.name) in available else None
        if name is None:
            raise HFCheckpointError(f"{path}: tensor {t.name} is missing; the checkpoint is incomplete or of another architecture.")
        matched.append((t, name))
    return matched


def load_state(path: str, config: TransformerConfig, model_type: str, abstract: nnx.State, allow_pickle: bool = False) -> nnx.State:
    """The parameters of the checkpoint in `path`, placed in the shardings `abstract` carries."""
    reader = SafetensorsReader(path, allow_pickle)
    wanted = nnx.to_pure_dict(abstract)
    # Hugging Face names one tensor per layer: read into the unrolled layout, stack on device after.
    unrolled = nnx.traversals.flatten_mapping(stacking.unstack(wanted))
    targets = {"/".join(map(str, p)): (p, v) for p, v in unrolled.items()}  # name -> (path, shape)
    pure: dict[tuple, jax.Array] = {}
    matched = _match(path, reader.names(), tensors(config, model_type), config.tie_embeddings)
    # Largest first: the one-tensor transient comes while little of the model is resident.
    for tensor, name in sorted(matched, key=lambda m: -reader.nbytes(m[1])):
        raw = reader.read(name)
        expected = [targets[p][1].shape for p in tensor.params]
        try:
            values = tensor.to_flanjax(raw)
            bad = any(v.shape != s for v, s in zip(values, expected))
        except ValueError:
            bad = True
        if bad:
            raise HFCheckpointError(
                f"{path}: tensor {name} has shape {list(raw.shape)}, which does not fit the model that "
                f"config.json describes (flanjax parameter {', '.join(tensor.params)} of shape {', '.join(map(str, expected))}). "
                "The weights and config.json disagree."
            )
        for param, value in zip(tensor.params, values):
            key, target = targets[param]
            pure[key] = _place(value, target)
        del raw, values
    return filled(abstract, stacking.relayout(nnx.traversals.unflatten_mapping(pure), wanted))


def load_model(
    path: str,
    *,
    mesh: jax.sharding.Mesh | MeshConfig | Partitioner | None = None,
    dtype: str = "float32",
    allow_pickle: bool = False,
    scan_layers: bool = False,
) -> Transformer:
    """The flanjax `Transformer` of a local Hugging Face checkpoint directory, its parameters
    sharded over `mesh` (a Mesh, a MeshConfig or a Partitioner; None: the first device), its
    layers stacked for a scan if `scan_layers`."""
    hf = read_config(path)
    config = dataclasses.replace(config_from_hf(hf, dtype), scan_layers=scan_layers)
    partitioner = _partitioner(mesh)
    graphdef, abstract = partitioner.abstract_state(lambda: Transformer(config, rngs=nnx.Rngs(0)))
    return nnx.merge(graphdef, load_state(path, config, hf["model_type"], abstract, allow_pickle))


# --- writing --------------------------------------------------------------------------------


def _host(x: jax.Array) -> np.ndarray:
    if not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def save_model(model: Transformer, directory: str, hf_config: Mapping[str, Any] | None = None, max_shard_bytes: int = 4 << 30) -> str:
    """Writes `model` as a Hugging Face checkpoint (config.json + safetensors, sharded with an
    index above `max_shard_bytes`) that `transformers.AutoModelForCausalLM` loads.

    `hf_config`: the config it was imported from (kept, with the vocabulary size updated); None
    derives one (LLaMA, Qwen2 or GPT-2). Only process 0 writes.
    """
    from safetensors.numpy import save_file

    config = config_to_hf(model.config, hf_config)
    params = stacking.unstack(nnx.to_pure_dict(nnx.state(model, nnx.Param)))  # HF: a tensor per layer
    values = {"/".join(map(str, p)): v for p, v in nnx.traversals.flatten_mapping(params).items()}
    writing = jax.process_index() == 0
    if writing:
        os.makedirs(directory, exist_ok=True)
    # Shards are written as they fill (host memory holds one shard), then renamed -of-N.
    shards: list[list[str]] = []
    shard: dict[str, np.ndarray] = {}
    dtype = None

    def flush():
        if shard and writing:
            save_file(shard, os.path.join(directory, f"part-{len(shards)}.safetensors"), metadata={"format": "pt"})
        shards.append(list(shard))
        shard.clear()

    for tensor in tensors(model.config, config["model_type"]):
        array = np.ascontiguousarray(tensor.to_hf(*(_host(values[p]) for p in tensor.params)))
        dtype = dtype or str(array.dtype)
        if shard and sum(a.nbytes for a in shard.values()) + array.nbytes > max_shard_bytes:
            flush()
        shard[tensor.name] = array
    flush()
    if not writing:
        return directory
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump({**config, "torch_dtype": dtype, "dtype": dtype}, f, indent=2)
    names = ["model.safetensors"] if len(shards) == 1 else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for i, name in enumerate(names):
        os.replace(os.path.join(directory, f"part-{i}.safetensors"), os.path.join(directory, name))
    if len(shards) > 1:
        weight_map = {tensor: name for name, shard_names in zip(names, shards) for tensor in shard_names}
        with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=2)
    return directory


# --- tokenizers -------------------------------------------------------------------------------


def check_tokenizer(tokenizer, vocab_size: int, where: str = "the tokenizer") -> None:
    if len(tokenizer) > vocab_size:
        raise HFCheckpointError(
            f"{where} has {len(tokenizer)} tokens but the model's vocabulary has {vocab_size} rows: "
            "ids past the table would index nothing. Use the model's own tokenizer, or add tokens with "
            "`add_tokens` (--add_tokens), which grows the model to fit."
        )


def add_tokens(
    model: Transformer, tokenizer, tokens: list[str], partitioner: Partitioner | None = None, pad_to_multiple_of: int = 128
) -> Transformer:
    """Adds `tokens` (e.g. an end-of-turn token) to `tokenizer` as special tokens and returns
    the model with rows for them: the embedding and output rows of the new ids are the mean of
    the existing tokens' rows (Hewitt 2021: new tokens start as an average word, not as noise).
    The table grows only if the new ids do not fit the model's (often padded) one, and then to
    a multiple of `pad_to_multiple_of` rows so that it still splits over the mesh; rows past the
    tokenizer's get the mean too."""
    check_tokenizer(tokenizer, model.config.vocab_size)
    old = len(tokenizer)
    tokenizer.add_tokens(list(tokens), special_tokens=True)
    new = len(tokenizer)
    size = model.config.vocab_size if new <= model.config.vocab_size else -(-new // pad_to_multiple_of) * pad_to_multiple_of
    config = dataclasses.replace(model.config, vocab_size=size)
    if partitioner is None:
        partitioner = Partitioner(model.embed.embedding.value.sharding.mesh)
    graphdef, abstract = partitioner.abstract_state(lambda: Transformer(config, rngs=nnx.Rngs(0)))

    def grow(table: jax.Array, axis: int) -> jax.Array:  # `axis` indexes tokens
        table = jnp.moveaxis(table, axis, 0)
        pad = jnp.zeros((config.vocab_size - table.shape[0], *table.shape[1:]), table.dtype)
        mean = jnp.mean(table[:old], axis=0)
        return jnp.moveaxis(jnp.concatenate([table, pad]).at[old:new].set(mean).at[len(table):].set(mean), 0, axis)

    def resized(params: dict) -> dict:  # a fresh dict inside jit: updating it in place is safe
        params["embed"]["embedding"] = grow(params["embed"]["embedding"], 0)
        head = params.get("lm_head", {})
        for name, axis in (("kernel", 1), ("bias", 0)):
            if name in head:
                head[name] = grow(head[name], axis)
        return params

    with partitioner.activate():
        shardings = shardings_of(nnx.to_pure_dict(abstract))
        params = jax.jit(resized, out_shardings=shardings)(nnx.to_pure_dict(nnx.state(model)))
    return nnx.merge(graphdef, filled(abstract, params))
