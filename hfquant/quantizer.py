"""HfQuantQuantizer: the transformers integration (quantize on load, save, reload)."""
from __future__ import annotations

import logging
import re

import torch
from transformers.core_model_loading import ConversionOps
from transformers.quantizers.base import HfQuantizer
from transformers.quantizers.quantizers_utils import get_module_from_name

from . import _ext, checkpoint
from .config import HfQuantConfig
from .mapped_pages import release_file_range, release_mapped_pages, safetensors_ranges
from .methods import layer_tensor_keys
from .modeling import own_tied_params
from .experts import find_experts, warn_float_leftovers
from .nn import PackedLinear, QuantExperts
from .replace import check_overrides, quantize_in_place, replace_with_empty
from .algorithms.rotation import check_rotatable

logger = logging.getLogger("hfquant")

# A zero-size tensor saved under `<first quantized module>.weight`: transformers without
# `import hfquant` does not know the quant_method, loads the checkpoint as a plain model and
# would leave every quantized layer randomly initialised; the marker's size mismatch makes
# that load fail instead. hfquant ignores it.
MARKER_DTYPE = torch.uint8


def check_cuda_devices(devices) -> None:
    """Raises unless every device named (``cuda``, ``cuda:1``, ``1``) is a visible GPU of compute
    capability 8.0 or newer, the kernels' minimum."""
    if not torch.cuda.is_available():
        raise ValueError(f"hfquant: device_map places layers on {sorted(map(str, devices))}, but torch sees no "
                         "CUDA device")
    for d in devices:
        d = str(d)
        idx = int(d) if d.isdigit() else (torch.device(d).index if d.startswith("cuda") else None)
        if d.startswith(("mps", "xpu", "npu", "hpu")):
            raise ValueError(f"hfquant: device {d} is not supported (CPU and CUDA only)")
        idx = torch.cuda.current_device() if idx is None else idx
        if idx >= torch.cuda.device_count():
            raise ValueError(f"hfquant: device_map names GPU {idx}, but only {torch.cuda.device_count()} are visible")
        major, minor = torch.cuda.get_device_capability(idx)
        if major < 8:
            raise ValueError(
                f"hfquant: GPU {idx} ({torch.cuda.get_device_name(idx)}) has compute capability {major}.{minor}; "
                "the CUDA kernels need 8.0 or newer (Ampere, Ada, Hopper). Load on the CPU instead."
            )


def _load_trim():
    """glibc's malloc_trim, or None elsewhere."""
    try:
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _load_trim()


def release_freed_memory() -> None:
    """Hands the heap pages freed by quantizing one weight back to the OS. glibc keeps them
    otherwise: after the first large block is freed it serves blocks up to that size from
    its heaps, which it seldom shrinks, so the float32 temporaries of every layer would
    stay resident and quantize-on-load would peak near the float model's size."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


class HfQuantQuantize(ConversionOps):
    """Quantize-on-load: one float checkpoint weight -> qweight, scales (and zeros)."""

    def __init__(self, hf_quantizer: "HfQuantQuantizer"):
        self.hf_quantizer = hf_quantizer

    def convert(self, input_dict, model=None, missing_keys=None, **kwargs):
        target_key, value = next(iter(input_dict.items()))
        value = value[0] if isinstance(value, list) else value
        module, tensor_name = get_module_from_name(model, target_key)
        name = target_key[: -len(tensor_name) - 1]
        if isinstance(module, QuantExperts):
            # a 3-D expert tensor (transformers may have merged it from per-expert checkpoint tensors)
            tensors = self.hf_quantizer.quantization_config.impl.quantize_experts(
                name, module, tensor_name.removesuffix("_proj"), value)
            self._release_source(value, kwargs.get("source_patterns"))
            del module._parameters[tensor_name], value
            if missing_keys is not None:
                missing_keys.discard(target_key)
            release_freed_memory()
            return {f"{name}.{k}": t for k, t in tensors.items()}
        w = value.t() if module.float_weight_transposed else value
        tensors = self.hf_quantizer.quantization_config.impl.quantize_weight(name, module, w)
        self._release_source(value, kwargs.get("source_patterns"))
        out = {f"{name}.{k}": t for k, t in tensors.items()}
        # The float weight was a placeholder: drop it so it is neither materialised nor reported missing.
        del module._parameters["weight"]
        if missing_keys is not None:
            missing_keys.discard(target_key)
        del tensors, w, value
        release_freed_memory()
        return out

    def _release_source(self, value, source_patterns) -> int:
        """Takes the quantized weight's pages of the mmapped checkpoint out of the resident set
        (hfquant/mapped_pages.py); they would otherwise stay until loading ends, and the
        resident set would peak at the whole float checkpoint. The weight is usually a view
        of the mapping; where transformers handed over a copy (a dtype cast, a GPU), the
        source bytes are found by the checkpoint key in the safetensors headers."""
        released = release_mapped_pages(value)
        if released:
            return released
        where = None
        if source_patterns and len(source_patterns) == 1:
            where = self.hf_quantizer.source_ranges.get(source_patterns[0])
        return release_file_range(*where) if where else 0


class HfQuantQuantizer(HfQuantizer):
    requires_calibration = False
    quantization_config: HfQuantConfig

    def __init__(self, quantization_config, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self.modules_to_not_convert: list[str] = []
        self.source_ranges: dict[str, tuple[str, int, int]] = {}

    def validate_environment(self, *args, device_map=None, **kwargs):
        if isinstance(device_map, dict):
            devices = {str(d) for d in device_map.values()}
        elif device_map is not None:
            devices = {str(device_map)}
        else:
            devices = set()
        gpu = [d for d in devices if d not in ("cpu", "disk", "auto", "meta") and not d.startswith("cpu")]
        if "auto" in devices and torch.cuda.is_available():
            gpu.append("cuda")
        if gpu and not _ext._C.cuda_built:
            raise ValueError(
                f"hfquant: device_map places layers on {sorted(gpu)}, but this hfquant build has no CUDA "
                "kernels; load on the CPU (device_map=None or 'cpu'), or rebuild with HFQUANT_CUDA=1"
            )
        if gpu:
            check_cuda_devices(gpu)

    def update_dtype(self, dtype):
        return dtype

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        if self.pre_quantized:
            checkpoint.check_safetensors_only(checkpoint_files)
        if self.quantization_config.needs_float_model and not self.pre_quantized:
            # Calibration / norm folding need the float model: the layers are quantized after loading.
            check_overrides(model, self.quantization_config)  # a misspelt module name fails before loading
            find_experts(model, self.quantization_config)  # experts the method cannot quantize: refused now
            check_rotatable(model, self.quantization_config)  # a model the rotation cannot serve, too
            return model
        self.modules_to_not_convert = replace_with_empty(model, self.quantization_config,
                                                         expect_float_weights=not self.pre_quantized)
        if not self.pre_quantized:
            # where each float weight lies in the checkpoint files (HfQuantQuantize._release_source)
            self.source_ranges = safetensors_ranges(checkpoint_files)
        tied = [n for n, m in model.named_modules() if getattr(m, "tied_source", None)]
        if tied:
            missing = set(getattr(model, "_keys_to_ignore_on_load_missing", None) or ())
            model._keys_to_ignore_on_load_missing = missing | {
                "^" + re.escape(n) + r"\.(qweight|scales|zeros|codebook)$" for n in tied}
        if self.pre_quantized:
            first = _first_quantized(model)
            ignore = set(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ())
            model._keys_to_ignore_on_load_unexpected = ignore | {"^" + re.escape(first + ".weight") + "$"}
            checkpoint.check_keys(model, checkpoint_files)
        return model

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        module, tensor_name = get_module_from_name(model, param_name)
        if isinstance(module, QuantExperts):
            if self.pre_quantized:
                return tensor_name in module.tensor_keys()
            return tensor_name in ("gate_up_proj", "down_proj") and tensor_name in module._parameters
        if not isinstance(module, PackedLinear):
            return False
        if self.pre_quantized:
            # Saying True for the quantized tensors only skips transformers' generic shape
            # check: they are validated after loading, with the tensor named in the error.
            return tensor_name in layer_tensor_keys()
        return tensor_name == "weight"

    def get_quantize_ops(self):
        return HfQuantQuantize(self)

    def _process_model_after_weight_loading(self, model, **kwargs):
        config = self.quantization_config
        if config.needs_float_model and not self.pre_quantized:
            self.modules_to_not_convert = quantize_in_place(model, config)
            _finish(model, config)
            return model
        for name, module in model.named_modules():
            if not isinstance(module, PackedLinear):
                continue
            source = getattr(module, "tied_source", None)
            if source is not None:
                # a layer tied to another's weight: quantized from it now that it has loaded
                w = model.get_parameter(source).detach()
                module.load_quantized(**config.impl.quantize_weight(
                    name, module, w.t() if module.float_weight_transposed else w))
                del module.tied_source
                module.pack()
                own_tied_params(model, name)  # its bias, if tied, too: the saved config ties nothing of it
                continue
            if module._offloaded():
                # accelerate keeps this layer's tensors on disk (or in CPU memory) and loads them
                # for each call; they are checked and laid out for the kernels then
                continue
            if "weight" in module._parameters:
                raise ValueError(f"hfquant: the checkpoint has no weight for {name}")
            _check_loaded_and_pack(name, module, layer_tensor_keys())
        for name, module in model.named_modules():
            if not isinstance(module, QuantExperts):
                continue
            left = [p for p in ("gate_up_proj", "down_proj") if p in module._parameters]
            if left:
                raise ValueError(f"hfquant: the checkpoint has no tensor {name}.{left[0]}")
            if module._offloaded():  # as for the linear layers above: checked and laid out per call
                continue
            _check_loaded_and_pack(name, module, module.tensor_keys())
        _warn_buffers_not_offloaded(model)
        _finish(model, config)
        return model

    def get_state_dict_and_metadata(self, model):
        from .verify import checksum_metadata

        state_dict = model.state_dict()
        first = _first_quantized(model)
        if first is not None:
            state_dict[first + ".weight"] = torch.zeros(0, dtype=MARKER_DTYPE)
        # transformers gives every shard this metadata: each holds the checksums of all tensors
        return state_dict, {"hfquant_format_version": str(self.quantization_config.format_version),
                            **checksum_metadata(state_dict)}

    def is_serializable(self):
        return True

    @property
    def is_trainable(self) -> bool:
        # Weight-only uniform layers pass gradients to their input (hfquant/qat/autograd.py):
        # adapters (LoRA through peft) train on them. Int8 activations and codebooks do not.
        return self.quantization_config.impl.trainable

    @property
    def is_qat_trainable(self) -> bool:
        # the model trains without adapters once hfquant.enable_scale_training made its scales parameters
        return self.is_trainable and getattr(self, "scale_training", False)

    @property
    def is_compileable(self) -> bool:
        # every hfquant module traces without a graph break (fake kernels in hfquant/ops.py),
        # so generate may compile the forward (static cache + compile_config)
        return self.quantization_config.impl.compileable

    def _dequantize(self, model, dtype=None):
        from .modeling import set_module

        from .nn import TiedQuantLinear

        heads = {}
        for name, module in list(model.named_modules()):
            if isinstance(module, TiedQuantLinear):
                heads[name] = module.source_name
            elif isinstance(module, PackedLinear):
                set_module(model, name, module.to_linear(dtype))
        for head, emb in heads.items():
            # the float lm_head shares the float embedding's weight again
            source = model.get_submodule(emb)
            lin = torch.nn.Linear(source.embedding_dim, source.num_embeddings, bias=False, device="meta")
            lin.weight = source.weight
            set_module(model, head, lin)
        return model


def _check_loaded_and_pack(name: str, module, keys) -> None:
    """Raises naming the first of ``keys`` (the module's quantized tensors) the checkpoint did not
    fill, then validates the module and derives its kernel layout."""
    for key in keys:
        t = getattr(module, key, None)
        if t is None:
            continue
        if t.device.type == "meta" or not getattr(t, "_is_hf_initialized", False):
            raise ValueError(f"hfquant: the checkpoint has no tensor {name}.{key} "
                             "(missing from the safetensors files, or a truncated checkpoint)")
    module.validate(name)
    module.pack()
    release_freed_memory()


def _finish(model, config: HfQuantConfig) -> None:
    """What every quantized model gets once its layers are in place: a warning naming any large
    weight matrix left in float that the config did not exclude (warn_float_leftovers), and the
    load-time check of what the config asks of generate: a KV cache the model's layers can
    hold. One they cannot is a warning naming the model and layer type, never a failed load
    (hfquant.quantized_cache(model) then gives None). generate, given no cache, takes the
    model's hfquant cache (hfquant/generation.py: the QuantizedKVCache of kv_cache_bits, else
    transformers' DynamicCache appending into preallocated buffers; a rotated one is read in
    its rotated space by the model's attention, hfquant/attention.py), and RMSNorm modules
    run as one op at inference (hfquant/fusion.py)."""
    from .algorithms.rotation import install_online_rotations
    from .fusion import fuse_norms
    from .generation import bind_generate_cache

    install_online_rotations(model, config)  # a reloaded rotated checkpoint's online transforms
    warn_float_leftovers(model, config)
    bind_generate_cache(model)
    fuse_norms(model)
    if config.kv_cache_bits is not None and hasattr(model, "config"):
        from .attention import enable_rotated_attention
        from .kv_cache import QuantizedKVCache, warn_unserved

        try:  # one cache of these settings says whether the model can use it and whether it rotates
            cache = QuantizedKVCache(model.config, config.kv_cache_bits, config.kv_cache_group_size,
                                     config.kv_cache_residual_length, config.kv_cache_rotation)
        except ValueError as e:
            warn_unserved(model.config, config.kv_cache_bits, str(e))
        else:
            if cache.rotation == "hadamard":
                # attention reads the rotated cache as stored (hfquant/attention.py)
                enable_rotated_attention(model)


def _warn_buffers_not_offloaded(model) -> None:
    device_map = getattr(model, "hf_device_map", None) or {}
    if "disk" in set(map(str, device_map.values())) and not any(
            isinstance(m, (PackedLinear, QuantExperts)) and m._offloaded() for m in model.modules()):
        logger.warning("hfquant: the device_map offloads layers to disk, but the quantized tensors are buffers, "
                       "which accelerate keeps in memory unless from_pretrained gets offload_buffers=True")


def attach_quantizer(model, config: HfQuantConfig, kept: list[str]) -> None:
    """Makes a model quantized in memory (quantize_model, qat.convert) look as from_pretrained
    leaves it, so that save_pretrained writes the quantization_config and reloading works."""
    if not (hasattr(model, "config") and hasattr(model, "save_pretrained")):
        return
    model.config.quantization_config = config
    quantizer = HfQuantQuantizer(config, pre_quantized=True)
    quantizer.modules_to_not_convert = kept
    model.hf_quantizer = quantizer
    model.is_quantized = True
    model.quantization_method = "hfquant"
    model.config._is_quantized = True
    _finish(model, config)


def _first_quantized(model) -> str | None:
    return next((n for n, m in model.named_modules() if isinstance(m, PackedLinear)), None)
