"""Llama-family checkpoints in the Hugging Face layout: ``config.json`` + safetensors, read and written locally.

``load(directory)`` builds a ``StreamingTransformer`` from a local folder (``model.safetensors``, or shards listed in
``model.safetensors.index.json``) without torch: tensors are read with the ``safetensors`` package into NumPy and
placed one parameter at a time, so the peak host memory is the model plus its largest (stacked) parameter.
``save(model, directory)`` writes the same layout back (round trip exact); ``write_checkpoint`` writes a random
checkpoint of any size from a config alone (tests, notebooks, the import benchmark).

Architectures: ``llama`` (Llama 2 / 3, with Llama 3.1 RoPE scaling and linear scaling), ``mistral`` (its sliding
window is reported in ``HFInfo.sliding_window``: stream it with a ``window:`` / ``sinkwindow:`` policy) and
``qwen2`` (biases on q / k / v); grouped-query attention, tied or separate output embeddings, float32 / bfloat16 /
float16 tensors. A field this importer cannot represent (another activation, biases on the output or MLP
projections, partial rotary, another RoPE scaling, per-layer sliding windows, quantisation) is a ``ValueError``
that names it; so is a tensor the config does not explain, or one that is missing or has the wrong shape.

Mapping (HF ``[out, in]`` weights are transposed into ``nnx.Linear``'s ``[in, out]`` kernels):

* ``self_attn.{q,k,v}_proj`` -> ``attn.qkv_proj`` (concatenated along the output axis; biases too);
* ``self_attn.o_proj`` -> ``attn.o``; ``mlp.{gate,up}_proj`` -> ``mlp.gate_up``; ``mlp.down_proj`` -> ``mlp.down``;
* ``input_layernorm`` / ``post_attention_layernorm`` -> ``attn_norm`` / ``mlp_norm``; ``model.norm`` ->
  ``final_norm``; ``model.embed_tokens`` -> ``embed``; ``lm_head`` -> ``lm_head`` (absent when tied).

Both use RoPE's split-half layout (the one HF's Llama weights are stored for) and query head ``i`` reads kv head
``i // (num_heads // num_kv_heads)``, so no permutation is needed.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re
from collections.abc import Callable, Iterator

import jax
import ml_dtypes
import numpy as np
from flax import nnx

from jstream.config import TransformerConfig
from jstream.models.lm import StreamingTransformer
from jstream.positions import RopeScaling

ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
"""Supported ``model_type`` values and the ``architectures`` entry written on export."""

CONFIG = "config.json"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")  # a buffer older exports saved; recomputed here


@dataclasses.dataclass(frozen=True)
class HFInfo:
  """What a checkpoint's ``config.json`` says beyond the ``TransformerConfig``.

  Attributes:
    model_type: ``"llama"``, ``"mistral"`` or ``"qwen2"``.
    sliding_window: the window the model was trained with (Mistral), or None (full attention).
    max_position_embeddings: the context length the model was trained for.
    bos_token_id, eos_token_id: special ids from the config (``eos_token_id`` may list several), or None.
    dtype: the checkpoint's tensor dtype.
  """

  model_type: str
  sliding_window: int | None
  max_position_embeddings: int | None
  bos_token_id: int | None
  eos_token_id: int | tuple[int, ...] | None
  dtype: str


# --------------------------------------------------------------------------------------------- config


def _field(hf: dict, name: str, default=None):
  value = hf.get(name, default)
  return default if value is None else value


def _rope(hf: dict) -> tuple[float, RopeScaling | None]:
  """``(theta, scaling)`` from transformers 5's ``rope_parameters`` or the older ``rope_theta`` + ``rope_scaling``."""
  params = hf.get("rope_parameters")
  if params is not None and "rope_type" not in params and "type" not in params:
    raise ValueError("config.json: rope_parameters per layer type are not supported")
  params = dict(params or hf.get("rope_scaling") or {})
  theta = float(params.get("rope_theta", _field(hf, "rope_theta", 10_000.0)))
  kind = params.get("rope_type", params.get("type", "default"))
  prf = params.get("partial_rotary_factor", hf.get("partial_rotary_factor"))
  if prf not in (None, 1, 1.0):
    raise ValueError(f"config.json: partial_rotary_factor={prf} is not supported (only full rotary embeddings)")
  if params.get("attention_factor") not in (None, 1, 1.0):
    raise ValueError(f"config.json: rope attention_factor={params['attention_factor']} is not supported")
  if kind == "default":
    return theta, None
  if kind == "linear":
    return theta, RopeScaling("linear", float(params["factor"]))
  if kind == "llama3":
    return theta, RopeScaling(
      "llama3",
      float(params["factor"]),
      float(params["low_freq_factor"]),
      float(params["high_freq_factor"]),
      int(params["original_max_position_embeddings"]),
    )
  raise ValueError(f"config.json: rope_type {kind!r} is not supported (default, linear or llama3)")


def config_from_hf(
  hf: dict, *, dtype: str | None = None, scan_layers: bool = True, attention_impl: str | tuple[str, ...] = "auto"
) -> tuple[TransformerConfig, HFInfo]:
  """A ``TransformerConfig`` (and ``HFInfo``) from a parsed ``config.json``, or a ``ValueError`` naming the field
  that cannot be represented.

  Args:
    hf: the parsed ``config.json``.
    dtype: parameter and compute dtype (default: the checkpoint's ``dtype`` / ``torch_dtype``, else float32).
    scan_layers: stack the layers' weights (one ``lax.scan``) or keep one set per layer (see ``TransformerConfig``).
    attention_impl: the attention implementation (see ``TransformerConfig``).
  """
  model_type = hf.get("model_type")
  if model_type not in ARCHITECTURES:
    raise ValueError(f"config.json: model_type {model_type!r} is not supported (one of {sorted(ARCHITECTURES)})")
  act = _field(hf, "hidden_act", "silu")
  if act != "silu":
    raise ValueError(f"config.json: hidden_act {act!r} is not supported (only 'silu', SwiGLU)")
  for name in ("attention_bias", "mlp_bias"):
    if hf.get(name):
      raise ValueError(f"config.json: {name}=true is not supported (biases on the output / MLP projections)")
  if hf.get("quantization_config"):
    raise ValueError("config.json: quantization_config is not supported (dequantise the checkpoint first)")
  sliding = None
  if model_type == "mistral":
    sliding = hf.get("sliding_window")
  elif model_type == "qwen2" and hf.get("use_sliding_window"):
    raise ValueError("config.json: use_sliding_window=true (Qwen2's per-layer windows) is not supported")
  layer_types = set(hf.get("layer_types") or ())
  if layer_types - {"full_attention"}:
    raise ValueError(f"config.json: layer_types {sorted(layer_types)} are not supported (only full_attention)")
  theta, scaling = _rope(hf)
  heads = int(hf["num_attention_heads"])
  ckpt_dtype = str(_field(hf, "dtype", _field(hf, "torch_dtype", "float32"))).removeprefix("torch.")
  if ckpt_dtype not in _DTYPES:
    raise ValueError(f"config.json: dtype {ckpt_dtype!r} is not supported (one of {sorted(_DTYPES)})")
  dt = dtype or ckpt_dtype
  cfg = TransformerConfig(
    vocab_size=int(hf["vocab_size"]),
    num_layers=int(hf["num_hidden_layers"]),
    num_heads=heads,
    num_kv_heads=int(_field(hf, "num_key_value_heads", heads)),
    head_dim=int(_field(hf, "head_dim", int(hf["hidden_size"]) // heads)),
    embed_dim=int(hf["hidden_size"]),
    mlp_dim=int(hf["intermediate_size"]),
    rope_base=theta,
    rope_scaling=scaling,
    norm_eps=float(_field(hf, "rms_norm_eps", 1e-6)),
    tie_embeddings=bool(_field(hf, "tie_word_embeddings", False)),
    qkv_bias=model_type == "qwen2",
    param_dtype=dt,
    dtype=dt,
    scan_layers=scan_layers,
    attention_impl=attention_impl,
  )
  eos = hf.get("eos_token_id")
  info = HFInfo(
    model_type=model_type,
    sliding_window=None if sliding is None else int(sliding),
    max_position_embeddings=hf.get("max_position_embeddings"),
    bos_token_id=hf.get("bos_token_id"),
    eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
    dtype=ckpt_dtype,
  )
  return cfg, info


def config_to_hf(cfg: TransformerConfig, model_type: str | None = None, **extra) -> dict:
  """The ``config.json`` of ``cfg`` (``model_type`` default: ``qwen2`` with q/k/v biases, else ``llama``); ``extra``
  fields (``bos_token_id``, ``max_position_embeddings``, ...) are added. A ``ValueError`` names a field of ``cfg``
  that the format cannot hold."""
  model_type = model_type or ("qwen2" if cfg.qkv_bias else "llama")
  if model_type not in ARCHITECTURES:
    raise ValueError(f"model_type {model_type!r} is not supported (one of {sorted(ARCHITECTURES)})")
  if cfg.learned_sink != "none":
    raise ValueError(f"learned_sink={cfg.learned_sink!r} has no Hugging Face equivalent")
  if cfg.cond_dim:
    raise ValueError(f"cond_dim={cfg.cond_dim} (a conditioned model) has no Hugging Face equivalent")
  if cfg.qkv_bias != (model_type == "qwen2"):
    raise ValueError(f"qkv_bias={cfg.qkv_bias} does not fit model_type {model_type!r} (q/k/v biases are qwen2's)")
  if cfg.param_dtype not in _DTYPES:
    raise ValueError(f"param_dtype {cfg.param_dtype!r} cannot be saved (one of {sorted(_DTYPES)})")
  rope = {"rope_type": "default", "rope_theta": cfg.rope_base}
  if cfg.rope_scaling is not None:
    s = cfg.rope_scaling
    rope.update(rope_type=s.kind, factor=s.factor)
    if s.kind == "llama3":
      rope.update(
        low_freq_factor=s.low_freq_factor,
        high_freq_factor=s.high_freq_factor,
        original_max_position_embeddings=s.original_max_position,
      )
  out = {
    "architectures": [ARCHITECTURES[model_type]],
    "model_type": model_type,
    "vocab_size": cfg.vocab_size,
    "hidden_size": cfg.embed_dim,
    "intermediate_size": cfg.mlp_dim,
    "num_hidden_layers": cfg.num_layers,
    "num_attention_heads": cfg.num_heads,
    "num_key_value_heads": cfg.num_kv_heads,
    "head_dim": cfg.head_dim,
    "hidden_act": "silu",
    "rms_norm_eps": cfg.norm_eps,
    "rope_theta": cfg.rope_base,  # read by transformers 4
    "rope_parameters": rope,  # read by transformers 5
    "tie_word_embeddings": cfg.tie_embeddings,
    "dtype": cfg.param_dtype,
    "torch_dtype": cfg.param_dtype,
  }
  if cfg.rope_scaling is not None:
    out["rope_scaling"] = dict(rope)
  if model_type == "llama":
    out.update(attention_bias=False, mlp_bias=False)
  if model_type == "mistral":
    out["sliding_window"] = None
  if model_type == "qwen2":
    out["use_sliding_window"] = False
  out.update(extra)
  return out


# ---------------------------------------------------------------------------------------------- names

# (our path inside a block, HF names inside ``model.layers.{i}.``, how they combine)
_LAYER = (
  (("attn_norm", "scale"), ("input_layernorm.weight",), "copy"),
  (("attn", "qkv_proj", "kernel"), tuple(f"self_attn.{n}_proj.weight" for n in "qkv"), "t"),
  (("attn", "qkv_proj", "bias"), tuple(f"self_attn.{n}_proj.bias" for n in "qkv"), "copy"),
  (("attn", "o", "kernel"), ("self_attn.o_proj.weight",), "t"),
  (("mlp_norm", "scale"), ("post_attention_layernorm.weight",), "copy"),
  (("mlp", "gate_up", "kernel"), ("mlp.gate_proj.weight", "mlp.up_proj.weight"), "t"),
  (("mlp", "down", "kernel"), ("mlp.down_proj.weight",), "t"),
)
_TOP = {
  ("embed", "embedding"): "model.embed_tokens.weight",
  ("final_norm", "scale"): "model.norm.weight",
  ("lm_head", "kernel"): "lm_head.weight",
}


def tensor_shapes(cfg: TransformerConfig) -> dict[str, tuple[int, ...]]:
  """Every tensor a Hugging Face checkpoint of ``cfg`` holds, with its shape."""
  d, f, h = cfg.embed_dim, cfg.mlp_dim, cfg.head_dim
  q, kv = cfg.num_heads * h, cfg.num_kv_heads * h
  per = {
    "input_layernorm.weight": (d,),
    "self_attn.q_proj.weight": (q, d),
    "self_attn.k_proj.weight": (kv, d),
    "self_attn.v_proj.weight": (kv, d),
    "self_attn.o_proj.weight": (d, q),
    "post_attention_layernorm.weight": (d,),
    "mlp.gate_proj.weight": (f, d),
    "mlp.up_proj.weight": (f, d),
    "mlp.down_proj.weight": (d, f),
  }
  if cfg.qkv_bias:
    per.update({"self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,), "self_attn.v_proj.bias": (kv,)})
  out = {"model.embed_tokens.weight": (cfg.vocab_size, d), "model.norm.weight": (d,)}
  if not cfg.tie_embeddings:
    out["lm_head.weight"] = (cfg.vocab_size, d)
  for i in range(cfg.num_layers):
    out.update({f"model.layers.{i}.{k}": v for k, v in per.items()})
  return out


# -------------------------------------------------------------------------------------------- reading


class _Reader:
  """Tensors of a checkpoint folder by name, read lazily from whichever shard holds them."""

  def __init__(self, directory: pathlib.Path):
    from safetensors import safe_open

    index = directory / INDEX
    if index.exists():
      weight_map = json.loads(index.read_text())["weight_map"]
    else:
      files = sorted(directory.glob("*.safetensors"))
      if not files:
        raise FileNotFoundError(f"{directory}: no {SINGLE}, {INDEX} or *.safetensors file")
      weight_map = {}
      for file in files:
        with safe_open(file, framework="numpy") as f:
          weight_map.update(dict.fromkeys(f.keys(), file.name))
    self.weight_map = {k: v for k, v in weight_map.items() if not _IGNORED.match(k)}
    self._open = lambda name: safe_open(directory / name, framework="numpy")

  def get(self, name: str) -> np.ndarray:
    """The tensor, copied out of its file. The file is opened (memory-mapped) for this read only: mapped pages
    that stayed open would count in the process's RSS beside the imported parameters, doubling the peak."""
    if name not in self.weight_map:
      raise ValueError(f"checkpoint has no tensor {name!r} (the config.json implies it)")
    with self._open(self.weight_map[name]) as f:
      return f.get_tensor(name)


def _combine(parts: list[np.ndarray], how: str, dtype) -> np.ndarray:
  """HF tensors -> one of our parameters: transposed (``"t"``) and joined along the last axis, in ``dtype``."""
  if how == "t":
    parts = [p.T for p in parts]
  if len(parts) == 1:
    return np.asarray(parts[0], dtype=dtype)
  out = np.empty((*parts[0].shape[:-1], sum(p.shape[-1] for p in parts)), dtype)
  start = 0
  for p in parts:  # written in place: no concatenated copy beside the parts
    out[..., start : start + p.shape[-1]] = p
    start += p.shape[-1]
  return out


def _param_builder(cfg: TransformerConfig, get: Callable[[str], np.ndarray], dtype) -> Callable[[tuple], np.ndarray]:
  """``build(path) -> value`` for every parameter path of a ``StreamingTransformer`` of ``cfg``."""
  layer = {sub: (names, how) for sub, names, how in _LAYER}

  def one(i: int, sub: tuple) -> np.ndarray:
    names, how = layer[sub]
    return _combine([get(f"model.layers.{i}.{n}") for n in names], how, dtype)

  def build(path: tuple) -> np.ndarray:
    if path[0] != "blocks":
      value = get(_TOP[path])
      return np.asarray(value.T if path == ("lm_head", "kernel") else value, dtype=dtype)
    if not cfg.scan_layers:
      return one(path[1], path[2:])
    first = one(0, path[1:])
    out = np.empty((cfg.num_layers, *first.shape), dtype)
    out[0] = first
    for i in range(1, cfg.num_layers):
      out[i] = one(i, path[1:])
    return out

  return build


def _path(p: tuple) -> tuple:
  return tuple(int(x) if isinstance(x, (int, np.integer)) else str(x) for x in p)


def load(
  directory: str | pathlib.Path,
  *,
  dtype: str | None = None,
  scan_layers: bool = True,
  attention_impl: str | tuple[str, ...] = "auto",
) -> tuple[StreamingTransformer, HFInfo]:
  """A ``StreamingTransformer`` with a local Llama-family checkpoint's weights, and its ``HFInfo``.

  Args:
    directory: a folder with ``config.json`` and ``model.safetensors`` (or shards listed in
      ``model.safetensors.index.json``, or any ``*.safetensors`` files).
    dtype: parameter and compute dtype (default: the checkpoint's); tensors are cast on the host while reading.
    scan_layers: stacked layers (one ``lax.scan``; default) or one set of weights per layer (faster single-token
      decode on CPU: see ``TransformerConfig.scan_layers``).
    attention_impl: see ``TransformerConfig``.

  Raises:
    FileNotFoundError: no config or weights in ``directory``.
    ValueError: an unsupported architecture or field (named), a missing, unexpected or misshapen tensor (named).
  """
  directory = pathlib.Path(directory)
  if not (directory / CONFIG).exists():
    raise FileNotFoundError(f"{directory}: no {CONFIG} (a Hugging Face checkpoint folder holds config.json)")
  hf = json.loads((directory / CONFIG).read_text())
  cfg, info = config_from_hf(hf, dtype=dtype, scan_layers=scan_layers, attention_impl=attention_impl)
  np_dtype = _DTYPES[cfg.param_dtype] if cfg.param_dtype in _DTYPES else np.dtype(cfg.param_dtype)
  reader = _Reader(directory)
  expected = tensor_shapes(cfg)
  extra = sorted(set(reader.weight_map) - set(expected))
  if extra:
    raise ValueError(f"checkpoint tensors the config does not explain: {extra[:5]}{' ...' if len(extra) > 5 else ''}")
  seen: dict[str, tuple] = {}

  def get(name: str) -> np.ndarray:
    value = reader.get(name)
    if tuple(value.shape) != expected[name]:
      raise ValueError(f"tensor {name!r} has shape {tuple(value.shape)}, the config implies {expected[name]}")
    seen[name] = value.shape
    return value

  build = _param_builder(cfg, get, np_dtype)
  abstract = nnx.eval_shape(lambda: StreamingTransformer(cfg, rngs=nnx.Rngs(0)))
  flat = []
  for path, var in nnx.to_flat_state(nnx.state(abstract)):
    value = build(_path(path))
    if value.shape != tuple(var.shape):  # pragma: no cover (the mapping and the module disagree)
      raise AssertionError(f"{path}: built {value.shape}, the module holds {var.shape}")
    flat.append((path, var.replace(jax.device_put(value))))
    del value
  nnx.update(abstract, nnx.from_flat_state(flat))
  missing = sorted(set(expected) - set(seen))
  if missing:  # pragma: no cover (every expected tensor is read by some parameter)
    raise AssertionError(f"tensors never read: {missing[:5]}")
  return abstract, info


# -------------------------------------------------------------------------------------------- writing


def _hf_tensors(model: StreamingTransformer) -> Iterator[tuple[str, np.ndarray]]:
  """The model's parameters as HF tensors ``(name, [out, in] array)``, one at a time."""
  cfg = model.config
  state = {_path(p): v.get_value() for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  for path, name in _TOP.items():
    if path in state:
      value = np.asarray(state[path])
      yield name, np.ascontiguousarray(value.T if path == ("lm_head", "kernel") else value)
  kv = cfg.num_kv_heads * cfg.head_dim
  splits = {
    ("attn", "qkv_proj"): (cfg.num_heads * cfg.head_dim, kv, kv),
    ("mlp", "gate_up"): (cfg.mlp_dim, cfg.mlp_dim),
  }
  for i in range(cfg.num_layers):
    for sub, names, how in _LAYER:
      key = ("blocks", *sub) if cfg.scan_layers else ("blocks", i, *sub)
      if key not in state:
        continue
      value = np.asarray(state[key][i] if cfg.scan_layers else state[key])
      sizes = splits.get(sub[:2], (value.shape[-1],))
      parts = np.split(value, np.cumsum(sizes)[:-1], axis=-1)
      for n, part in zip(names, parts, strict=True):
        yield f"model.layers.{i}.{n}", np.ascontiguousarray(part.T if how == "t" else part)


def _write(
  directory: pathlib.Path, config: dict, tensors: Iterator[tuple[str, np.ndarray]], max_shard_bytes: int | None
) -> list[pathlib.Path]:
  """Writes ``config.json`` and the tensors, in shards of at most ``max_shard_bytes`` (one file when None) with an
  index; returns the weight files. A shard is written as soon as it is full, so memory holds one shard."""
  from safetensors.numpy import save_file

  directory.mkdir(parents=True, exist_ok=True)
  for old in (*directory.glob("model*.safetensors"), directory / INDEX):
    old.unlink(missing_ok=True)
  (directory / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
  shards: list[dict[str, np.ndarray]] = [{}]
  names: list[pathlib.Path] = []
  weight_map: dict[str, int] = {}
  total = 0

  def flush():
    name = directory / f"model-{len(names) + 1:05d}.safetensors"
    save_file(shards[-1], name, metadata={"format": "pt"})
    names.append(name)
    shards[-1] = {}

  size = 0
  for name, value in tensors:
    if max_shard_bytes and shards[-1] and size + value.nbytes > max_shard_bytes:
      flush()
      size = 0
    shards[-1][name] = value
    weight_map[name] = len(names)
    size += value.nbytes
    total += value.nbytes
  if max_shard_bytes is None:
    save_file(shards[-1], directory / SINGLE, metadata={"format": "pt"})
    return [directory / SINGLE]
  flush()
  n = len(names)
  final = [directory / f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
  for src, dst in zip(names, final, strict=True):
    src.rename(dst)
  index = {"metadata": {"total_size": total}, "weight_map": {k: final[v].name for k, v in sorted(weight_map.items())}}
  (directory / INDEX).write_text(json.dumps(index, indent=2) + "\n")
  return final


def save(
  model: StreamingTransformer,
  directory: str | pathlib.Path,
  *,
  model_type: str | None = None,
  max_shard_bytes: int | None = None,
  **config_fields,
) -> list[pathlib.Path]:
  """Writes ``model`` as a Hugging Face checkpoint folder that ``load`` (and transformers) read back.

  Args:
    model: a ``StreamingTransformer`` (stacked or per-layer weights; no learned sink or conditioning).
    directory: the folder (created; earlier weights there are replaced).
    model_type: ``"llama"`` / ``"mistral"`` / ``"qwen2"`` (default: qwen2 when the model has q/k/v biases).
    max_shard_bytes: split the weights into shards of at most this size, with ``model.safetensors.index.json``.
    config_fields: extra ``config.json`` fields (``bos_token_id``, ``eos_token_id``, ``max_position_embeddings``).

  Returns:
    The weight files written.
  """
  config = config_to_hf(model.config, model_type, **config_fields)
  return _write(pathlib.Path(directory), config, _hf_tensors(model), max_shard_bytes)


def write_checkpoint(
  directory: str | pathlib.Path,
  cfg: TransformerConfig,
  *,
  model_type: str | None = None,
  seed: int = 0,
  scale: float = 0.02,
  max_shard_bytes: int | None = None,
  **config_fields,
) -> list[pathlib.Path]:
  """A checkpoint of ``cfg`` with random weights (normal, std ``scale``; norms 1), written tensor by tensor in
  ``cfg.param_dtype`` without building a model: a stand-in for a real checkpoint of any size."""
  rng = np.random.default_rng(seed)
  dtype = _DTYPES[cfg.param_dtype]

  def tensors():
    for name, shape in tensor_shapes(cfg).items():
      if name.endswith("norm.weight"):
        yield name, np.ones(shape, dtype)
      else:
        yield name, (rng.standard_normal(shape, np.float32) * scale).astype(dtype)

  config = config_to_hf(cfg, model_type, **config_fields)
  return _write(pathlib.Path(directory), config, tensors(), max_shard_bytes)


def checkpoint_bytes(directory: str | pathlib.Path) -> int:
  """Total size of a checkpoint folder's weight files."""
  return sum(p.stat().st_size for p in pathlib.Path(directory).glob("*.safetensors"))


__all__ = [
  "ARCHITECTURES",
  "HFInfo",
  "checkpoint_bytes",
  "config_from_hf",
  "config_to_hf",
  "load",
  "save",
  "tensor_shapes",
  "write_checkpoint",
]
